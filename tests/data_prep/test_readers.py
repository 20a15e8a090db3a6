"""Every bad-input kind becomes one counted record with file and line; the rest of the file
is still read; a file that cannot be opened is a one-line error naming it."""
import gzip
from pathlib import Path
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.clean import Cleaner
from data_prep.config import CleanConfig
from data_prep.readers import ReadError, read_file

GOOD = {"text": "A perfectly ordinary document.", "id": "good"}


def _jsonl_with_every_bad_kind(path):
    lines = [
        json.dumps(GOOD).encode(),                                   # 1 ok
        b'{"text": "unterminated',                                    # 2 malformed_json
        b'{"text": "caf\xe9 latin-1 byte"}',                          # 3 invalid_utf8
        json.dumps({"content": "no text field"}).encode(),            # 4 missing_text
        json.dumps({"text": 42}).encode(),                            # 5 text_not_string
        json.dumps({"text": None}).encode(),                          # 6 missing_text
        json.dumps([1, 2]).encode(),                                  # 7 not_an_object
        b"",                                                          # 8 empty line
        json.dumps({"text": "x" * (3 << 20)}).encode(),               # 9 too_large (3 MB)
        json.dumps({"text": "   \n\t  "}).encode(),                   # 10 whitespace only -> cleaned to empty
        json.dumps({"text": "NUL\u0000 and \u001b[31mescape\u001b[0m codes"}).encode(),  # 11 cleaned, kept
        json.dumps({"text": "last line still read", "id": 7}).encode(),                  # 12 ok, numeric id
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_every_bad_kind_is_reported_with_its_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    _jsonl_with_every_bad_kind(p)
    recs = list(read_file("jsonl", str(p), "src/bad.jsonl", "text", "id", 2 << 20))
    assert [r.line for r in recs] == list(range(1, 13))
    assert {r.line: r.bad for r in recs if r.bad} == {
        2: "malformed_json", 3: "invalid_utf8", 4: "missing_text", 5: "text_not_string",
        6: "missing_text", 7: "not_an_object", 8: "empty", 9: "too_large"}
    assert all(r.file == "src/bad.jsonl" for r in recs)
    assert recs[0].id == "good" and recs[11].id == "7" and recs[10].id == "src/bad.jsonl:11"
    cleaner = Cleaner(CleanConfig())
    assert cleaner(recs[9]) == "empty"
    assert cleaner(recs[10]) is None and recs[10].text == "NUL and escape codes"


def test_huge_line_is_skipped_in_bounded_reads(tmp_path):
    p = tmp_path / "huge.jsonl"
    p.write_text(json.dumps({"text": "y" * (20 << 20)}) + "\n" + json.dumps(GOOD) + "\n")
    recs = list(read_file("jsonl", str(p), "huge.jsonl", "text", None, 1 << 20))
    assert [(r.line, r.bad) for r in recs] == [(1, "too_large"), (2, None)]
    assert recs[0].nbytes > 20 << 20


def test_compressed_and_truncated(tmp_path):
    rows = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)).encode()
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(rows))
    assert sum(1 for r in read_file("jsonl", str(gz), "a", "text", None, 1 << 20) if not r.bad) == 2000
    import zstandard

    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(rows))
    assert sum(1 for r in read_file("jsonl", str(zst), "a", "text", None, 1 << 20) if not r.bad) == 2000
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(rows)[:-200])
    recs = list(read_file("jsonl", str(cut), "cut", "text", None, 1 << 20))
    assert recs[-1].bad == "truncated_file" and len(recs) > 1500


def test_parquet_and_saved_dataset(tmp_path):
    t = pa.table({"text": ["one", None, "three"], "id": ["a", "b", "c"]})
    pq.write_table(t, tmp_path / "x.parquet")
    recs = list(read_file("parquet", str(tmp_path / "x.parquet"), "x", "text", "id", 1 << 20))
    assert [(r.line, r.id, r.bad) for r in recs] == [(1, "a", None), (2, None, "missing_text"), (3, "c", None)]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    assert [r.bad for r in read_file("parquet", str(tmp_path / "n.parquet"), "n", "text", None, 1 << 20)] == ["text_not_string"] * 2
    import datasets

    datasets.Dataset.from_dict({"body": ["hello", "world"]}).save_to_disk(str(tmp_path / "ds"))
    from data_prep.plan import _hf_dataset_files

    files = _hf_dataset_files(str(tmp_path / "ds"))
    recs = [r for f in files for r in read_file("hf_dataset", f, "ds", "body", None, 1 << 20)]
    assert [r.text for r in recs] == ["hello", "world"]


def test_unopenable_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "garbage.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ReadError, match="garbage.parquet"):
        list(read_file("parquet", str(bad), "g", "text", None, 1 << 20))
    with pytest.raises(ReadError, match="missing.jsonl"):
        list(read_file("jsonl", str(tmp_path / "missing.jsonl"), "m", "text", None, 1 << 20))


def test_cleaning_repairs_mojibake_and_normalises():
    c = Cleaner(CleanConfig(pii=True))
    assert c.clean("  The caf\u00c3\u00a9 menu  \r\n\r\n\r\n\n  next\u00a0line \u200b ") == "The café menu\n\nnext line"
    assert c.clean("e\u0301te\u0301") == "été"  # NFC
    assert c.clean("write to a.b@example.org from 10.0.0.1") == "write to email@example.com from 192.0.2.1"
    h = Cleaner(CleanConfig(), html=True)
    assert h.clean("<html><head><script>x=1</script></head><body><p>Hello <b>world</b></p><p>Two</p></body></html>") == "Hello world\nTwo"


def test_plan_text_files_and_dataset_dict(tmp_path):
    import datasets

    from data_prep.config import PrepConfig
    from data_prep.plan import make_plan

    root = tmp_path / "docs"
    for i in range(6):
        (root / f"d{i}").mkdir(parents=True)
        (root / f"d{i}" / "README.md").write_text("x" * 1000)
        (root / f"d{i}" / "mod.py").write_text('"""Docstring of the module."""\nx = 1\n')
    cfg = PrepConfig.model_validate({"sources": [{"name": "t", "type": "text_files", "paths": [str(root)],
                                                  "patterns": ["*.md", "*.py"], "max_bytes": 4200, "task_bytes": 2000}]})
    tasks = make_plan(cfg)
    files = [f for t in tasks for f in t.files]
    assert [Path(f).name for f in files[:4]] == ["README.md"] * 4  # pattern priority, then path
    assert sum(Path(f).stat().st_size for f in files) <= 4200 and len(tasks) == 3
    recs = list(read_file("text", files[-1], "m", "text", None, 1 << 20))
    assert recs[0].text == "Docstring of the module."

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
                               "test": datasets.Dataset.from_dict({"text": ["c"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = PrepConfig.model_validate({"sources": [{"name": "h", "type": "hf_dataset", "paths": [str(tmp_path / "dd")]}]})
    texts = [r.text for t in make_plan(cfg) for f in t.files for r in read_file(t.kind, f, "x", "text", None, 1 << 20)]
    assert sorted(texts) == ["a", "b", "c"]
