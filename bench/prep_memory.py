"""Peak memory per process of the data-prep stages whose state could grow with the corpus,
each at two input sizes 4x apart (each measurement in a fresh process).

    python bench/prep_memory.py [--docs 4000] [--edges 250000] [--merge-rows 65536] [--sample-mb 2]

  prepare    one prepare task (run_prepare) over N and 4N documents of real text (paragraphs
             of the standard library's docstrings, ~1.5 KB each), default BATCH_DOCS
  merge      the duplicate merge (dedup.merge_to) over E and 4E random near edges in 16
             memory-mapped partition files plus ~E/4 exact pairs, over 64 tasks, with
             dedup.MERGE_ROWS set to --merge-rows (below E, so both sizes stream)
  tokenizer  SentencePiece training (the stage's options, vocab 4096) on S and 4S MB of the
             same text

Printed per run: peak RSS (ru_maxrss: the process, libraries included) and, for prepare and
merge, the peak of the Python/numpy heap (tracemalloc). The bounds these should follow are in
data_prep/README.md ("Memory per process").
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _paragraphs() -> list[str]:
    from data_prep.readers import python_docstrings

    out = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for para in python_docstrings(p.read_text(encoding="utf-8", errors="replace")).split("\n\n"):
            if len(para.split()) >= 12:
                out.append(" ".join(para.split()))
    return out


def _docs(n: int, seed: int) -> list[str]:
    rng, paras = random.Random(seed), _paragraphs()
    return [" ".join(rng.sample(paras, 6)) for _ in range(n)]


def prepare(n: int, tmp: Path) -> dict:
    from data_prep import prepare as prep
    from data_prep.config import PrepConfig
    from data_prep.plan import make_plan

    (tmp / "in").mkdir()
    with open(tmp / "in" / "a.jsonl", "w") as f:
        for t in _docs(n, n):
            f.write(json.dumps({"text": t}) + "\n")
    off = {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")}
    cfg = PrepConfig.model_validate({"sources": [{"name": "s", "type": "jsonl", "paths": [str(tmp / "in")]}], "filters": off})
    (task,) = make_plan(cfg)
    tracemalloc.start()
    t = time.time()
    stats = prep.run_prepare(cfg, task, tmp / "prepare")
    return {"documents": stats["records"]["passed_filters"], "mb_in": round(task.bytes / 2**20, 1),
            "heap_mb": tracemalloc.get_traced_memory()[1] / 2**20, "seconds": time.time() - t}


def merge(n: int, tmp: Path) -> dict:
    import numpy as np

    from data_prep import dedup

    rng = np.random.default_rng(n)
    tasks, per_task = 64, max(1, n // 16)
    def gids(k):
        return (rng.integers(0, tasks, k).astype(np.uint64) << np.uint64(32)) | rng.integers(0, per_task, k).astype(np.uint64)
    ex = np.unique(np.stack([gids(n // 4), gids(n // 4)], axis=1), axis=0)
    ex = ex[ex[:, 0] != ex[:, 1]]
    lo, hi = ex.min(axis=1), ex.max(axis=1)
    _, first = np.unique(hi, return_index=True)
    lo, hi = lo[first], hi[first]
    keep = ~np.isin(lo, hi)
    eg, es = hi[keep], lo[keep]
    np.save(tmp / "eg.npy", eg)
    np.save(tmp / "es.npy", es)
    eg, es = np.load(tmp / "eg.npy", mmap_mode="r"), np.load(tmp / "es.npy", mmap_mode="r")
    near = []
    for p in range(16):
        pairs = np.empty(n // 16, dtype=dedup.PAIR_DTYPE)
        pairs["gid"], pairs["survivor"] = gids(n // 16), gids(n // 16)
        np.save(tmp / f"near-{p}.npy", dedup.representative_edges(pairs, eg, es))
        near.append(np.load(tmp / f"near-{p}.npy", mmap_mode="r"))
    del pairs
    sizes = np.full(tasks, per_task, dtype=np.uint64)
    tracemalloc.start()
    t = time.time()
    dedup.merge_to(tmp, eg, es, near, sizes, tmp / "removed.npy", dedup.Bitmap(sizes, tmp / "survivors.bits"))
    removed = len(np.load(tmp / "removed.npy", mmap_mode="r"))
    return {"edges": n, "exact": len(eg), "removed": removed, "heap_mb": tracemalloc.get_traced_memory()[1] / 2**20,
            "seconds": time.time() - t}


def tokenizer(mb: float, tmp: Path) -> dict:
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_sentencepiece

    sample = tmp / "sample.txt"
    with open(sample, "w") as f:
        written, seed = 0, 0
        while written < mb * 2**20:
            for t in _docs(500, seed):
                f.write(t + "\n")
                written += len(t) + 1
            seed += 1
    t = time.time()
    train_sentencepiece(sample, tmp / "tok", TokenizerConfig(vocab_size=4096), threads=2)
    return {"sample_mb": round(sample.stat().st_size / 2**20, 1), "seconds": time.time() - t}


STAGES = {"prepare": prepare, "merge": merge, "tokenizer": tokenizer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="prepare: N documents (and 4N)")
    ap.add_argument("--edges", type=int, default=250_000, help="merge: E near edges (and 4E)")
    ap.add_argument("--merge-rows", type=int, default=1 << 16, help="merge: dedup.MERGE_ROWS")
    ap.add_argument("--sample-mb", type=float, default=2, help="tokenizer: S MB of sample (and 4S)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # STAGE SIZE: one measurement, in this process
    a = ap.parse_args()
    if a.one:
        from data_prep import dedup

        dedup.MERGE_ROWS = a.merge_rows
        with tempfile.TemporaryDirectory() as d:
            res = STAGES[a.one[0]](float(a.one[1]) if a.one[0] == "tokenizer" else int(a.one[1]), Path(d))
        res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    print(f"{'stage':<10} {'input':>22} {'peak RSS MB':>12} {'heap MB':>8} {'seconds':>8}")
    for stage, base in (("prepare", a.docs), ("merge", a.edges), ("tokenizer", a.sample_mb)):
        for size in (base, 4 * base):
            cmd = [sys.executable, __file__, "--one", stage, str(size), "--merge-rows", str(a.merge_rows)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            what = {"prepare": f"{r.get('documents')} docs, {r.get('mb_in')} MB", "merge": f"{r.get('edges')} edges",
                    "tokenizer": f"{r.get('sample_mb')} MB sample"}[stage]
            heap = f"{r['heap_mb']:.1f}" if "heap_mb" in r else "-"
            print(f"{stage:<10} {what:>22} {r['rss_mb']:>12.0f} {heap:>8} {r['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
