"""End to end through the CLI: accounting, bad input, the manifest contract, shards read by
`datasets`, and SIGKILL-and-rerun giving byte-identical output."""
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep_corpus import awkward_jsonl, real_documents, tiny_config, write_config, write_jsonl
from ray_cluster import two_node_cluster

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def make_corpus(d: Path) -> dict:
    """Real documents in jsonl, jsonl.gz and parquet, with planted duplicates and bad records.
    Returns the expected outcome counts."""
    docs = real_documents(120)
    web = [{"id": f"w{i}", "text": t} for i, t in enumerate(docs[:150])]
    rows = [json.dumps(r) for r in web]
    rows += [json.dumps({"id": "dup-of-w0", "text": docs[0]}),                 # exact duplicate
             json.dumps({"id": "near-of-w1", "text": docs[1] + " Edited footer line."}),  # near duplicate
             '{"id": "broken", "text": ',                                    # malformed JSON
             json.dumps({"id": "notext", "body": "x"}),                      # missing text
             json.dumps({"id": "num", "text": 3}),                           # text not a string
             json.dumps({"id": "blank", "text": " \n\t "}),                  # whitespace only
             json.dumps({"id": "big", "text": "z " * (3 << 20)})]            # 6 MB document
    write_jsonl(d / "web" / "part-0.jsonl", rows[:100])
    (d / "web" / "part-1.jsonl.gz").write_bytes(gzip.compress(("\n".join(rows[100:]) + "\n").encode() + b'{"text": "\xff\xfe"}\n'))
    # A zstd file cut short: its first records count, then one truncated_file record.
    import zstandard

    c = zstandard.ZstdCompressor().compressobj()
    z = b""
    for k in range(4):  # four blocks: the cut falls after the first
        z += c.compress("".join(json.dumps({"id": f"z{i}", "text": f"Short note number {i}."}) + "\n" for i in range(k * 100, k * 100 + 100)).encode())
        z += c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    z += c.flush()
    (d / "web" / "part-2.jsonl.zst").write_bytes(z[: len(z) * 3 // 4])
    pq.write_table(pa.table({"text": docs[150:], "id": [f"b{i}" for i in range(len(docs) - 150)]}), d / "books.parquet")
    return {"input": len(rows) + 1 + len(docs) - 150, "bad_input": 6, "exact_duplicate": 1, "near_duplicate": 1}


def config_for(d: Path, **over) -> Path:
    # task_bytes: part-0.jsonl (about 60 KB) is cut into ranges, so that every test of the
    # fixture's output (any worker count, SIGKILL and resume, Ray) covers the cut.
    cfg = tiny_config([{"name": "web", "type": "jsonl", "paths": [str(d / "web")], "id_field": "id", "task_bytes": 16000},
                       {"name": "books", "type": "parquet", "paths": [str(d / "books.parquet")], "id_field": "id"}],
                      read={"max_doc_bytes": 1 << 20}, **over)
    return write_config(d / "prep.json", cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    expected = make_corpus(d)
    cfg = config_for(d, output={"write_removed": True})
    r = _cli("run", "--config", cfg, "--out", d / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    return d, expected, r


def test_accounting_adds_up_and_bad_input_is_reported(prepared):
    d, expected, r = prepared
    stats = json.loads((d / "out" / "stats.json").read_text())
    rec = stats["records"]
    (cut,) = stats["accounting"]["incomplete_files"]
    assert cut["file"] == "web/part-2.jsonl.zst" and 0 < cut["records_read"] < 400
    expected = {**expected, "input": expected["input"] + cut["records_read"] + 1}
    assert stats["accounting"]["ok"] and rec["input"] == expected["input"]
    assert sum(rec[k] for k in ("kept", "bad_input", "filtered", "exact_duplicate", "near_duplicate")) == rec["input"]
    for k in ("bad_input", "exact_duplicate", "near_duplicate"):
        assert rec[k] == expected[k], (k, rec)
    assert stats["reasons"] == {"bad_input:empty": 1, "bad_input:invalid_utf8": 1, "bad_input:malformed_json": 1,
                                "bad_input:missing_text": 1, "bad_input:text_not_string": 1, "bad_input:truncated_file": 1,
                                "filtered:too_large": 1, "exact_duplicate:exact_dedup": 1, "near_duplicate:near_dedup": 1}
    rejected = [json.loads(l) for p in (d / "out" / "work" / "prepare").glob("task-*/rejected.jsonl") for l in p.open()]
    assert {(r["id"], r["outcome"]) for r in rejected if r["reason"] == "too_large"} == {("big", "filtered")}
    assert "web/part-2.jsonl.zst could not be read to its end" in (d / "out" / "summary.md").read_text()
    assert all(e["file"].startswith(("web/part-1.jsonl.gz", "web/part-2.jsonl.zst")) for e in stats["bad_input_examples"])
    lines = {e["reason"]: e["line"] for e in stats["bad_input_examples"]}
    assert lines["malformed_json"] == 53 and lines["invalid_utf8"] == 58
    for s in stats["sources"].values():
        assert s["accounting_ok"]
    assert stats["sources"]["books"]["records"]["kept"] == expected["input"] - 158 - cut["records_read"] - 1
    dups = [json.loads(l) for p in (d / "out" / "work" / "tokenize").glob("*.duplicates.jsonl") for l in p.open()]
    assert {(x["id"], x["outcome"], x["survivor"]) for x in dups} == {("dup-of-w0", "exact_duplicate", "w0"),
                                                                     ("near-of-w1", "near_duplicate", "w1")}
    assert "stats:" in r.stdout and "manifest.json" in r.stdout
    assert (d / "out" / "summary.md").read_text().startswith("# Data prep summary")
    assert {p.name for p in (d / "out" / "plots").iterdir()} == {"outcomes.png", "document_chars.png", "document_tokens.png"}


def test_the_console_names_lost_input_and_strict_makes_it_an_error(prepared):
    # Failed first: the run ended with "done" alone; the cut file and bad records were only in
    # summary.md and stats.json.
    d, _, r = prepared
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: ")]
    assert warnings[0].startswith("warning: web/part-2.jsonl.zst could not be read to its end: ")
    assert warnings[1].startswith("warning: 4 bad input record(s) were not used: invalid_utf8 1, malformed_json 1, "
                                  "missing_text 1, text_not_string 1 ")
    assert len(warnings) == 2  # its ids are unique: none repeats
    assert json.loads((d / "out" / "stats.json").read_text())["duplicate_ids"]["records"] == 0
    strict = _cli("finalize", "--config", d / "prep.json", "--out", d / "out", "--strict")
    assert strict.returncode == 1, strict.stderr[-2000:]
    assert [l for l in strict.stderr.splitlines() if l.startswith("warning: ")] == warnings
    assert strict.stderr.splitlines()[-1].startswith("error: --strict: the input has 2 problem(s), named above")


def test_python_files_without_docstrings_are_not_bad_input(tmp_path):
    """A .py file with no docstring has no prose to keep, as an empty text has none: counted
    (`no_docstrings`), never a warning, and no reason for --strict to fail (this failed first: the
    demo corpus gave "warning: 1,648 bad input record(s)", and --strict exited 1 on it)."""
    src = tmp_path / "src"
    src.mkdir()
    docs = real_documents(40)
    for i, doc in enumerate(docs[:20]):
        (src / f"mod{i}.py").write_text(f'"""{doc}"""\n\ndef f():\n    return {i}\n')
    (src / "plain.py").write_text("x = 1\n")
    for i, doc in enumerate(docs[20:]):
        (src / f"note{i}.txt").write_text(doc)
    cfg = write_config(tmp_path / "c.json", tiny_config([{"name": "code", "type": "text_files", "paths": [str(src)]}]))
    r = _cli("run", "--config", cfg, "--out", tmp_path / "out", "--strict")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [line for line in r.stderr.splitlines() if line.startswith(("warning:", "error:"))], r.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["reasons"]["bad_input:no_docstrings"] == 1


def test_manifest_and_shards_follow_the_contract(prepared):
    import datasets
    import sentencepiece as spm

    d = prepared[0]
    out = d / "out"
    m = json.loads((out / "shards" / "manifest.json").read_text())
    assert (m["format"], m["version"], m["column"], m["dtype"], m["add_bos"], m["add_eos"]) == \
        ("arrow-token-shards", 1, "input_ids", "uint16", True, True)
    tok = m["tokenizer"]
    model = (out / "shards" / tok["model"]).resolve()
    assert model == (out / "tokenizer" / "tokenizer.model").resolve()
    assert tok["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (tok["vocab_size"], tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["unk_id"]) == (400, 1, 2, -1, 0)
    assert hashlib.sha256(json.dumps(m["config"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest() == m["config_sha256"]
    stats = json.loads((out / "stats.json").read_text())
    totals = {"train": [0, 0], "validation": [0, 0]}
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for sh in m["shards"]:
        path = out / "shards" / sh["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sh["sha256"]
        ds = datasets.Dataset.from_file(str(path))
        assert ds.features["input_ids"].feature.dtype == "uint16"
        ids = ds["input_ids"]
        assert len(ids) == sh["documents"] and sum(map(len, ids)) == sh["tokens"]
        assert all(x[0] == 1 and x[-1] == 2 for x in ids)
        totals[sh["split"]][0] += len(ids)
        totals[sh["split"]][1] += sh["tokens"]
    assert {k: {"documents": v[0], "tokens": v[1]} for k, v in totals.items()} == m["splits"]
    assert m["splits"]["validation"]["documents"] > 0 and m["splits"]["train"]["documents"] > 0
    assert sum(s["documents"] for s in m["sources"].values()) == stats["records"]["kept"]
    assert not list((out / "shards").glob(".*"))  # no temporary names left
    first = m["shards"][0]
    text = sp.decode(datasets.Dataset.from_file(str(out / "shards" / first["path"]))[0]["input_ids"][1:-1])
    assert len(text) > 100


def test_kill_and_rerun_is_byte_identical(prepared, tmp_path):
    d = prepared[0]
    reference = d / "out"
    cfg = config_for(d, output={"write_removed": True})
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(out)]
    # Kill each attempt right after it completed one more task than the attempt before (each
    # rerun resumes the previous one), then finish. A kill that fired by time alone could land in
    # start-up every time and prove nothing; these are recorded and checked.
    def progress() -> int:
        return len(list((out / "work" / "prepare").glob("task-*"))) + len(list((out / "work" / "tokenize").glob("task-*.json")))

    landed = []
    for _ in range(3):
        before = progress()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 240
        while p.poll() is None and progress() <= before and time.time() < deadline:
            time.sleep(0.01)
        if p.poll() is not None:
            break  # the run finished before another task completed
        os.killpg(p.pid, signal.SIGKILL)  # the workers too, as a node failure would
        p.wait()
        landed.append((before, progress(), (out / "shards" / "manifest.json").exists()))
    # Every kill landed mid-run: after a new task completed, before the run wrote its manifest.
    assert len(landed) >= 2 and all(b < a and not finished for b, a, finished in landed), landed
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "prepare").glob("task-*")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, mtime in done_before.items():  # completed tasks are not redone
        assert (out / "work" / "prepare" / name).stat().st_mtime_ns == mtime
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file() and "work" not in p.parts)
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "work" not in p.parts)
    for f in files:
        assert (reference / f).read_bytes() == (out / f).read_bytes(), f


# Exact only: the copy is an exact duplicate and the edited copy is kept. Near only: both are
# near duplicates (the copy's Jaccard is 1). Neither: both are kept.
DEDUP_OFF_CASES = {"exact-only": (True, False, {"copy-of-d0": "exact_duplicate"}),
                   "near-only": (False, True, {"copy-of-d0": "near_duplicate", "edit-of-d1": "near_duplicate"}),
                   "neither": (False, False, {})}


@pytest.mark.parametrize("case", list(DEDUP_OFF_CASES))
def test_dedup_switched_off_is_a_normal_run_that_accounts_for_every_record(tmp_path, case):
    # A corpus deduplicated upstream runs with either dedup, or both, off. Failed first: with
    # both off the run stopped with a FileNotFoundError traceback in "merge clusters"; with one
    # off the duplicates had no removal reason (stats.json reasons, the summary's per-source
    # rule table), and the summary's stage table showed the stage that did not run as if it
    # had run and found nothing.
    exact, near, removed = DEDUP_OFF_CASES[case]
    docs = real_documents(120)[:12]
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]
    rows += [{"id": "copy-of-d0", "text": docs[0]}, {"id": "edit-of-d1", "text": docs[1] + " An edited last line."},
             '{"id": "broken", "text": ']
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    cfg = tiny_config([{"name": "web", "type": "jsonl", "paths": [str(tmp_path / "in")], "id_field": "id"}],
                      exact_dedup={"enabled": exact}, minhash={"enabled": near})
    out = tmp_path / "out"
    r = _cli("run", "--config", write_config(tmp_path / "c.json", cfg), "--out", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]

    stats = json.loads((out / "stats.json").read_text())
    outcomes = list(removed.values())
    want = {"input": 15, "bad_input": 1, "filtered": 0, "exact_duplicate": outcomes.count("exact_duplicate"),
            "near_duplicate": outcomes.count("near_duplicate"), "kept": 14 - len(removed)}
    assert stats["records"] == want and stats["accounting"]["ok"]
    # Every record read is kept or removed for a reason, in stats.json and in the summary.
    assert stats["records"]["kept"] + sum(stats["reasons"].values()) == stats["records"]["input"]
    summary = (out / "summary.md").read_text()
    for reason, n in stats["reasons"].items():
        assert f"| web | {reason} | {n} |" in summary, summary
    for stage, on in (("exact_dedup", exact), ("near_dedup", near)):
        assert (f"| {stage} (off) |" in summary) == (not on), summary
    assert {x["id"]: x["outcome"] for x in _rows(out, "work/tokenize/*.duplicates.jsonl")} == removed
    m = json.loads((out / "shards" / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["sources"].values()) == want["kept"]


def test_a_repeated_id_is_counted_named_and_refused_under_strict(tmp_path):
    # Failed first: records of an id_field source that share an id passed without a word, and
    # duplicates.jsonl and rejected.jsonl named one id for two documents.
    docs = real_documents(120)[:5]
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "a0", "text": docs[0]}, {"id": "same", "text": docs[1]},
                                              {"id": "big", "text": "z " * 3000}])  # filtered as too_large
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "same", "text": docs[2]}, {"id": "big", "text": docs[3]},
                                              {"id": "b2", "text": docs[4]}])
    # task_bytes: every line is a range of its own, so places are found in ranges that start past line 1.
    cfg = tiny_config([{"name": "web", "type": "jsonl", "paths": [str(tmp_path / "in")], "id_field": "id", "task_bytes": 100}],
                      read={"max_doc_bytes": 5000})
    cfg = write_config(tmp_path / "c.json", cfg)
    r = _cli("run", "--config", cfg, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tmp_path / "out" / "work" / "plan.json").read_text())) == 6
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["duplicate_ids"] == {
        "records": 2, "sources": {"web": 2},
        "examples": [{"source": "web", "id": "same", "first": "web/a.jsonl:2", "again": "web/b.jsonl:1"},
                     {"source": "web", "id": "big", "first": "web/a.jsonl:3", "again": "web/b.jsonl:2"}]}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "2 record(s) repeat an earlier record's id in their source (web 2)" in summary
    assert "id `same` at `web/a.jsonl:2` and `web/b.jsonl:1`" in summary, summary
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: ")]
    assert warnings == ["warning: 2 record(s) repeat an earlier record's id in their source (web 2), so an id in "
                        "rejected.jsonl or duplicates.jsonl can name two documents (examples with file and line in "
                        "stats.json duplicate_ids)"], r.stderr[-3000:]
    strict = _cli("finalize", "--config", cfg, "--out", tmp_path / "out", "--strict")
    assert strict.returncode == 1, strict.stderr[-2000:]
    assert strict.stderr.splitlines()[-1].startswith("error: --strict: the input has 1 problem(s), named above")


def test_errors_are_one_line_naming_file_or_field(tmp_path):
    cfg = write_config(tmp_path / "c.json", tiny_config([{"name": "x", "type": "jsonl", "paths": [str(tmp_path / "nope.jsonl")]}]))
    r = _cli("run", "--config", cfg, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope.jsonl" in r.stderr
    # Every wrong field of a config at once, one line each, named as the file spells it (this
    # failed first: only the first field was named, with "(and 1 more)").
    bad = tiny_config([{"name": "x", "type": "csv", "paths": ["a"]}], minhash={"bands": 0}, tokenizer={"vocab_size": "big"})
    b = write_config(tmp_path / "b.json", bad)
    r = _cli("run", "--config", b, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {b}: sources.0.type: expected 'jsonl', 'parquet', 'hf_dataset', 'text_files' or 'site_packages', "
        'got "csv"',
        f"error: {b}: minhash.bands: expected greater than or equal to 1, got 0",
        f'error: {b}: tokenizer.vocab_size: expected a valid integer, got "big"']
    typo = tiny_config([{"name": "x", "type": "jsonl", "paths": ["a"]}], minhsh={"bands": 4})
    r = _cli("config", "--config", write_config(tmp_path / "t.json", typo))
    assert r.returncode == 2 and "minhsh: unknown key (check its spelling and section)" in r.stderr
    (tmp_path / "j.json").write_text('{"sources": [}')
    r = _cli("config", "--config", tmp_path / "j.json")
    assert r.returncode == 2 and "j.json:1: invalid JSON" in r.stderr
    for cmd in ("run", "prepare", "dedup", "train-tokenizer", "tokenize", "finalize", "config"):
        h = _cli(cmd, "--help")
        assert h.returncode == 0 and "usage" in h.stdout


def test_stage_by_stage_with_one_worker_gives_the_same_output(prepared, tmp_path):
    d = prepared[0]
    cfg = config_for(d, output={"write_removed": True})
    r = _cli("tokenize", "--config", cfg, "--out", tmp_path / "one")
    assert r.returncode == 2 and "run `python -m data_prep" in r.stderr  # says what to run first
    for cmd in ("prepare", "dedup", "train-tokenizer", "tokenize", "finalize"):
        r = _cli(cmd, "--config", cfg, "--out", tmp_path / "one", "--workers", "1")
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    for f in ("shards/manifest.json", "stats.json", "tokenizer/tokenizer.model"):
        assert (d / "out" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f


def test_two_node_ray_cluster_gives_the_same_output_and_one_line_auth_errors(prepared, tmp_path):
    d = prepared[0]
    cfg = config_for(d, output={"write_removed": True})
    run = ["run", "--config", cfg, "--executor", "ray"]
    with two_node_cluster() as cluster:
        address = ["--ray-address", cluster.address]
        # Missing and wrong tokens, beside the real run: each fails in seconds with one line.
        no_auth = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
        bad = [subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, run), "--out", tmp_path / name, *address],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, env in (("no-token", no_auth), ("wrong-token", {**cluster.env, "RAY_AUTH_TOKEN": "0" * 32}))]
        r = _cli(*run, "--out", tmp_path / "ray", *address, env=cluster.env)
        errors = [p.communicate(timeout=120) + (p.returncode,) for p in bad]
    assert r.returncode == 0, r.stderr[-3000:]
    # Every output file is byte-identical to the local executor's.
    ref, got = ({p.relative_to(out): p for p in out.rglob("*") if p.is_file() and "work" not in p.relative_to(out).parts}
                for out in (d / "out", tmp_path / "ray"))
    assert sorted(got) == sorted(ref)
    assert [f for f in ref if ref[f].read_bytes() != got[f].read_bytes()] == []
    # The tasks ran on both nodes: the executor names the nodes each stage's tasks ran on.
    used = {n for line in re.findall(r"tasks ran on \d+ Ray node\(s\): ([0-9a-f ]+)", r.stderr) for n in line.split()}
    assert used == {n[:8] for n in cluster.node_ids}, r.stderr[-3000:]
    for (out, err, code), why in zip(errors, ("the cluster requires token authentication: set RAY_AUTH_MODE=token",
                                              "the cluster rejected this process's token")):
        assert code == 2 and err.strip().count("\n") == 0 and f"Ray address {cluster.address}: {why}" in err, err


def _run_in_process(d: Path, task_bytes: int) -> Path:
    # In this process with one worker: the worker count is covered by the split part-0.jsonl of
    # `prepared`, and this saves starting the pipeline's imports in new processes.
    from data_prep.config import PrepConfig
    from data_prep.executor import LocalExecutor
    from data_prep.stages import STAGES, open_context

    # A tokenizer sample of part of the corpus: which documents it takes must not depend on the cut.
    cfg = tiny_config([{"name": "one", "type": "jsonl", "paths": [str(d / "big.jsonl")], "task_bytes": task_bytes}],
                      tokenizer={"sample_bytes": 15_000}, shards={"target_bytes": 4000}, output={"write_removed": True})
    out = d / f"out-{task_bytes}"
    ctx = open_context(PrepConfig.model_validate(cfg), out)
    for stage in STAGES:
        stage.run(ctx, LocalExecutor(1))
    return out


def _rows(out: Path, pattern: str) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob(pattern)) for line in p.open()]


def _tokens(out: Path) -> dict[str, list]:
    m = json.loads((out / "shards" / "manifest.json").read_text())
    got: dict[str, list] = {"train": [], "validation": []}
    for sh in m["shards"]:
        got[sh["split"]] += pa.ipc.open_stream(pa.memory_map(str(out / "shards" / sh["path"]))).read_all()["input_ids"].to_pylist()
    return got


def test_one_file_cut_into_ranges_gives_the_output_of_one_task(tmp_path):
    # Failed first: the file was one task whatever task_bytes said, and the tokenizer sample
    # was drawn by a hash of the global ids, which the cut changes.
    data = awkward_jsonl(tmp_path / "big.jsonl", 3000)
    whole = _run_in_process(tmp_path, 1 << 30)
    split = _run_in_process(tmp_path, 3000)
    plan = json.loads((split / "work" / "plan.json").read_text())
    assert len(json.loads((whole / "work" / "plan.json").read_text())) == 1 and len(plan) >= 8
    assert plan[1]["start"] == 3000 and plan[-1]["start"] + plan[-1]["bytes"] == len(data)
    # The same records, lines, ids, reports, tokenizer and tokens. Only the shard files (one
    # set per task) and the config in the manifest (task_bytes) differ.
    for f in ("stats.json", "summary.md", "tokenizer/tokenizer.model", "tokenizer/tokenizer.json", "plots/outcomes.png"):
        assert (split / f).read_bytes() == (whole / f).read_bytes(), f
    for pattern in ("work/prepare/task-*/rejected.jsonl", "work/prepare/task-*/removed.jsonl", "work/tokenize/*.duplicates.jsonl"):
        assert _rows(split, pattern) == _rows(whole, pattern), pattern
    assert _tokens(split) == _tokens(whole)
    m_split, m_whole = (json.loads((o / "shards" / "manifest.json").read_text()) for o in (split, whole))
    assert (m_split["splits"], m_split["sources"]) == (m_whole["splits"], m_whole["sources"])
    assert len(m_split["shards"]) > len(m_whole["shards"])
    # The bad lines on both sides of the first cut and the last line (no newline) have exact numbers.
    rejected = {r["line"]: r["reason"] for r in _rows(split, "work/prepare/task-*/rejected.jsonl")}
    cut_line = data[:3000].count(b"\n") + 1
    last = data.count(b"\n") + 1
    assert rejected[cut_line - 1] == rejected[cut_line] == rejected[2] == "malformed_json"
    assert rejected[last - 4] == "invalid_utf8"
    docs = pa.ipc.open_stream(pa.memory_map(str(split / "work" / "prepare" / f"task-{len(plan) - 1:05d}" / "docs.arrow"))).read_all()
    assert docs["id"].to_pylist()[-1] == f"one/big.jsonl:{last}"
    dups = {(x["id"], x["outcome"], x["survivor"]) for x in _rows(split, "work/tokenize/*.duplicates.jsonl")}
    assert {(f"one/big.jsonl:{last - 2}", "exact_duplicate", "one/big.jsonl:1"),
            (f"one/big.jsonl:{last - 1}", "near_duplicate", "one/big.jsonl:3")} <= dups
    stats = json.loads((split / "stats.json").read_text())
    assert stats["records"]["input"] == last and stats["accounting"]["ok"]
