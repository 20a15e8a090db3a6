"""Work split inside a large file: cuts at line starts, exact line numbers per range, and the
ranges read together giving exactly the records of the whole file."""
import gzip
import json
from pathlib import Path

import pytest

from data_prep.config import PrepConfig
from data_prep.executor import LocalExecutor
from data_prep.plan import make_plan, number_lines
from data_prep.readers import ReadError, read_file
from prep_corpus import awkward_jsonl

T = 3000  # task_bytes: small, so a file of ~40 KB is cut into many ranges


def _config(**source) -> PrepConfig:
    # Language filter off: its default loads the classifier, which planning does not need.
    return PrepConfig.model_validate({"sources": [{"name": "s", "type": "jsonl", **source}], "filters": {"language": {"enabled": False}}})


def _plan(path: Path, task_bytes: int):
    return number_lines(make_plan(_config(paths=[str(path)], task_bytes=task_bytes)), LocalExecutor(2))


def _records(tasks):
    out = []
    for t in tasks:
        out += [(r.file, r.line, r.id, r.text, r.bad, r.nbytes)
                for r in read_file(t.kind, t.files[0], "s/big.jsonl", "text", None, 1 << 20, 1 << 20, t.start, t.end, t.first_line)]
    return out


def test_a_large_jsonl_is_cut_at_line_starts_and_ranges_read_as_the_whole_file(tmp_path):
    path = tmp_path / "big.jsonl"
    data = awkward_jsonl(path, T)
    whole = _plan(path, 1 << 30)
    tasks = _plan(path, T)
    assert len(whole) == 1 and len(tasks) >= 8
    assert [t.index for t in tasks] == list(range(len(tasks)))
    assert tasks[0].start == 0 and tasks[-1].end is None and sum(t.bytes for t in tasks) == len(data)
    assert all(a.end == b.start and data[b.start - 1:b.start] == b"\n" for a, b in zip(tasks, tasks[1:]))
    assert tasks[1].start == T  # a line starting exactly at the target offset is cut there
    for t in tasks:  # each range knows its first line's number in the whole file
        assert t.first_line == data[:t.start].count(b"\n") + 1
    got = _records(tasks)
    assert got == _records(whole)
    # The malformed lines on either side of the first cut are reported with their own numbers.
    reasons = {line: reason for _, line, _, _, reason, _ in got if reason}
    assert reasons[tasks[1].first_line - 1] == reasons[tasks[1].first_line] == "malformed_json"
    # Line numbers and default ids (file:line) are those of the file's lines.
    lines = data.split(b"\n")
    assert [line for _, line, *_ in got] == list(range(1, len(lines) + 1))
    for _, line, doc_id, text, reason, _ in got:
        if reason is None:
            assert doc_id == f"s/big.jsonl:{line}" and json.loads(lines[line - 1].decode("utf-8-sig"))["text"] == text
    assert got[-1][3] is not None  # the last line, without a newline, is read


def test_a_file_that_shrank_after_planning_stops_the_run_naming_it(tmp_path):
    path = tmp_path / "big.jsonl"
    data = awkward_jsonl(path, T)
    tasks = _plan(path, T)
    path.write_bytes(data[: tasks[-1].start - 10])
    with pytest.raises(ReadError, match=r"big\.jsonl: ends at byte \d+, before the end of its planned range"):
        _records(tasks)


def test_compressed_and_small_files_are_one_task_each(tmp_path):
    data = awkward_jsonl(tmp_path / "big.jsonl", T)
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "small.jsonl").write_bytes(data[: T // 2])
    cfg = _config(paths=[str(tmp_path / "big.jsonl.gz"), str(tmp_path / "small.jsonl")], task_bytes=T)
    assert [(Path(t.files[0]).name, t.start, t.end) for t in make_plan(cfg)] == [("big.jsonl.gz", 0, None), ("small.jsonl", 0, None)]
    assert _config(paths=["x"]).sources[0].task_bytes == 64 << 20  # resolved: the manifest records it
