"""Misconfiguration is answered by one line naming the field, file or flag (exit 2), never a
traceback. Runs the CLI's main() in this process: the same code path as `python -m data_prep`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prep_corpus import real_documents, tiny_config, write_config, write_jsonl
from data_prep.cli import main


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main([str(a) for a in argv]))
    err = capsys.readouterr().err
    # Progress bars (carriage-return lines) may come before it; the error is the one last line.
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("error: ") and "Traceback" not in err and err.count("error: ") == 1, err
    return last


def _source(tmp_path, n=6):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": d} for d in real_documents(120)[:n]])
    return [{"name": "web", "type": "jsonl", "paths": [str(tmp_path / "in")], "filters": "web"}]


def test_each_misconfiguration_is_one_line(tmp_path, capsys):
    # Each of these failed first with a traceback (or, for an empty directory, exit 0).
    src = _source(tmp_path)
    ok = write_config(tmp_path / "ok.json", tiny_config(src))
    assert "--workers" in _error(capsys, ["run", "--config", ok, "--out", tmp_path / "o", "--workers", "-1"])
    (tmp_path / "afile").write_text("x")
    assert "afile: --out must be a directory" in _error(capsys, ["run", "--config", ok, "--out", tmp_path / "afile"])
    lang = tiny_config(src, filters={"language": {"enabled": True, "languages": ["english"]}})
    msg = _error(capsys, ["config", "--config", write_config(tmp_path / "l.json", lang)])
    assert "filters.language" in msg and "'english' is not a language code" in msg
    tok = tiny_config(src, tokenizer={"existing_model": str(tmp_path / "missing.model")})
    msg = _error(capsys, ["config", "--config", write_config(tmp_path / "t.json", tok)])
    assert f"tokenizer.existing_model: no such file: {tmp_path / 'missing.model'}" in msg
    (tmp_path / "empty").mkdir()
    none = tiny_config([{"name": "web", "type": "jsonl", "paths": [str(tmp_path / "empty")]}])
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "n.json", none), "--out", tmp_path / "n"])
    assert "empty: directory has no .jsonl" in msg
    none = tiny_config([{"name": "docs", "type": "text_files", "paths": [str(tmp_path / "empty")]}])
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "n2.json", none), "--out", tmp_path / "n2"])
    assert "source 'docs': no file under" in msg


def test_vocabulary_too_large_and_nothing_left(tmp_path, capsys):
    src = _source(tmp_path)
    big = tiny_config(src, tokenizer={"vocab_size": 20000}, executor={"workers": 1})
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "v.json", big), "--out", tmp_path / "v"])
    assert "tokenizer.vocab_size: 20000 is more than the training sample supports (at most" in msg
    # Following the advice with the same --out works (failed first: "was prepared with a different
    # config"): nothing on disk depends on the vocabulary yet.
    most = int(msg.split("(at most ")[1].split(")")[0])
    lower = tiny_config(src, tokenizer={"vocab_size": min(most, 400)}, executor={"workers": 1})
    assert main(["run", "--config", str(write_config(tmp_path / "v.json", lower)), "--out", str(tmp_path / "v")]) == 0
    # An output pinned by an earlier version, before tokenizer.type existed, ran as its default:
    # a rerun with today's config is no change (failed first: "tokenizer.type changed from '(unset)'").
    pinned = tmp_path / "v" / "work" / "config.json"
    old = json.loads(pinned.read_text())
    del old["tokenizer"]["type"]
    pinned.write_text(json.dumps(old))
    assert main(["run", "--config", str(tmp_path / "v.json"), "--out", str(tmp_path / "v")]) == 0
    # A change that the prepared work depends on is refused, naming the field, both values and the output.
    pii = tiny_config(src, tokenizer={"vocab_size": min(most, 400)}, clean={"pii": True}, executor={"workers": 1})
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "v.json", pii), "--out", tmp_path / "v"])
    assert msg == (f"error: {tmp_path / 'v'}: clean.pii changed from False to True, but {tmp_path / 'v' / 'work' / 'prepare'} "
                   "was made with the old value; use a new --out, or remove it and what comes after it to redo it")
    # Too small for the characters and byte pieces (failed first: SentencePiece's RuntimeError traceback).
    small = tiny_config(src, tokenizer={"vocab_size": 300, "character_coverage": 1.0}, executor={"workers": 1})
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "s.json", small), "--out", tmp_path / "s"])
    assert msg.startswith("error: tokenizer.vocab_size: 300 is less than the ") and "raise it to at least " in msg, msg
    strict = tiny_config(src, filters={"language": {"enabled": True, "languages": ["de"]}}, executor={"workers": 1})
    msg = _error(capsys, ["run", "--config", write_config(tmp_path / "f.json", strict), "--out", tmp_path / "f"])
    assert "no document is left after reading and filtering (6 input records; filtered:language:not_de 6)" in msg


def test_a_ray_address_where_nothing_listens_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # bound, not listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        cfg = write_config(tmp_path / "c.json", tiny_config(_source(tmp_path)))
        msg = _error(capsys, ["run", "--config", cfg, "--out", tmp_path / "o", "--executor", "ray", "--ray-address", address])
    assert msg.startswith(f"error: Ray address {address}: cannot connect (Connection refused)"), msg


def test_a_directory_source_reads_no_json_files(tmp_path):
    """The config, a manifest or stats lying in the input directory are no input."""
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "records.json", [{"text": d} for d in real_documents(120)[:6]])
    cfg = write_config(src / "prep.json", tiny_config([{"name": "web", "type": "jsonl", "paths": [str(src)]}]))
    proc = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--config", str(cfg), "--out", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {src}: directory has no .jsonl/.jsonl.gz/"), proc.stderr


def test_a_text_field_in_no_record_is_named_with_the_fields_present(tmp_path):
    data = tmp_path / "in" / "a.jsonl"
    write_jsonl(data, [{"content": d, "url": f"u{i}"} for i, d in enumerate(real_documents(120)[:6])])
    cfg = write_config(tmp_path / "prep.json", tiny_config([{"name": "web", "type": "jsonl", "paths": [str(data.parent)]}]))
    proc = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {data}: no record has the text field 'text' (its records have "
                                                    "content, url); set sources[].text_field of source 'web'"), proc.stderr
