"""Near-duplicate detection quality on real text with planted edited copies (bench only).

    python bench/near_dedup.py [--mb 10] [--copies 1000] [--ngram 5 --bands 28 --rows 4]

Corpus: the demo corpus (docs, licences, docstrings of the installed packages) as jsonl. For
`--copies` documents of at least 100 words, an edited copy is planted at a random position of
a later file: 2-6% of its words (uniform per copy) replaced, deleted or inserted at scattered
positions, one word at a time (typos, substitutions, small edits). The prep pipeline's
prepare + dedup stages run on it with the given MinHash settings, and the script reports:

  recall        planted copies removed as duplicates
  false merges  removed documents whose exact 3-gram shingle Jaccard with the document they
                were removed in favour of is below 0.5 (precision = 1 - false / removed)
  removed_not_planted  real duplicates the demo corpus has of its own (vendored copies,
                licence variants), each also checked against the 0.5 bound

With --datatrove-python, datatrove 0.10.1's MinHash dedup (FineWeb's settings: 5-grams,
14x8, union of bucket matches) runs on the same files with the same number of workers, and
is scored the same way (its removed documents against their cluster's kept document).
Both times cover reading the jsonl files, signatures and clustering.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scattered_edits(words: list[str], frac: float, rng: random.Random, vocab: list[str]) -> list[str]:
    """frac of the words changed one at a time at random positions: half replaced by a word of
    vocab, a quarter deleted, a quarter with a word inserted before them."""
    out = list(words)
    for _ in range(max(1, round(frac * len(words)))):
        i = rng.randrange(len(out))
        op = rng.random()
        if op < 0.5:
            out[i] = rng.choice(vocab)
        elif op < 0.75:
            del out[i]
        else:
            out.insert(i, rng.choice(vocab))
    return out


def plant(corpus: Path, copies: int, seed: int) -> dict[str, str]:
    """Append edited copies to the corpus files; returns {copy id: original id}."""
    rng = random.Random(seed)
    files = sorted(corpus.glob("*.jsonl"))
    docs = [json.loads(l) for f in files for l in open(f)]
    vocab = sorted({w for d in docs[:2000] for w in d["text"].split()})
    pool = [d for d in docs if len(d["text"].split()) >= 100]
    planted = {}
    with open(corpus / "zz-copies.jsonl", "w") as out:  # sorts last: the originals come first
        for k, d in enumerate(rng.sample(pool, min(copies, len(pool)))):
            cid = f"copy{k}-of-{d['id']}"
            text = " ".join(scattered_edits(d["text"].split(), rng.uniform(0.02, 0.06), rng, vocab))
            out.write(json.dumps({"id": cid, "text": text}) + "\n")
            planted[cid] = d["id"]
    return planted


DATATROVE = r"""
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig
corpus, work, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = MinhashConfig()  # FineWeb's: 5-grams, 14 buckets x 8 hashes
t0 = time.perf_counter()
def run(name, pipeline, tasks):
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{work}/logs/{name}").run()
run("s1", [JsonlReader(corpus), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)], files)
run("s2", [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)], cfg.num_buckets)
run("s3", [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/ids", config=cfg, save_cluster_id=True)], 1)
run("s4", [JsonlReader(corpus), MinhashDedupFilter(input_folder=f"{work}/ids", load_cluster_ids=True,
           exclusion_writer=JsonlWriter(f"{work}/removed")), JsonlWriter(f"{work}/kept")], files)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_datatrove(python: str, corpus: Path, work: Path, workers: int) -> tuple[dict[str, str], float]:
    """datatrove's MinHash dedup on the same files: ({removed id: the kept id of its cluster}, s)."""
    import gzip
    import subprocess

    files = len(list(corpus.glob("*.jsonl")))
    r = subprocess.run([python, "-c", DATATROVE, str(corpus), str(work), str(workers), str(files)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"datatrove run failed:\n{r.stderr[-3000:]}")
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]

    def docs(folder):
        for f in sorted((work / folder).glob("*.jsonl.gz")):
            for line in gzip.open(f, "rt"):
                d = json.loads(line)
                yield d["id"], d["metadata"].get("minhash_cluster_id", -1)

    survivor = {c: i for i, c in docs("kept") if c != -1}
    return {i: survivor[c] for i, c in docs("removed")}, seconds


def run_ours(corpus: Path, work: Path, workers: int, minhash: dict) -> tuple[dict[str, str], float, dict]:
    from data_prep.config import PrepConfig
    from data_prep.executor import LocalExecutor
    from data_prep.stages import STAGES, open_context
    import numpy as np

    cfg = PrepConfig.model_validate({
        "sources": [{"name": "bench", "type": "jsonl", "paths": [str(corpus)], "id_field": "id"}], "minhash": minhash})
    ctx = open_context(cfg, work)
    ex = LocalExecutor(workers)
    t0 = time.perf_counter()
    for st in STAGES[:4]:  # prepare (read, clean, signatures) and dedup
        st.run(ctx, ex)
    seconds = time.perf_counter() - t0
    removed = np.load(ctx.dedup_dir / "removed.npy")
    names = ctx.locate(sorted({int(g) for g in removed["gid"]} | {int(g) for g in removed["survivor"]}))
    return {names[int(r["gid"])]: names[int(r["survivor"])] for r in removed}, seconds, cfg.minhash.model_dump()


def score(removed: dict[str, str], planted: dict[str, str], texts: dict[str, str], ngram: int) -> dict:
    """Recall on the planted copies; false merges: removed documents whose exact Jaccard (word
    n-gram shingles, data_prep's) with the document they are kept in favour of is below 0.5."""
    from data_prep.dedup import jaccard, shingle_sets
    from data_prep.prepare import exact_key

    ids = sorted(set(removed) | set(removed.values()))
    sets = dict(zip(ids, shingle_sets([texts[i] for i in ids], ngram)))
    # An exact copy (same text up to case and whitespace) is similarity 1, also when it is too
    # short to have a shingle.
    sims = [1.0 if exact_key(texts[d]) == exact_key(texts[s]) else jaccard(sets[d], sets[s]) for d, s in removed.items()]
    found = sum(1 for c in planted if c in removed)
    false = sum(1 for x in sims if x < 0.5)
    return {"recall": round(found / len(planted), 4), "found": found, "removed": len(removed),
            "false_merges_below_0.5": false, "precision": round(1 - false / max(len(removed), 1), 4),
            "removed_not_planted": sum(1 for d in removed if d not in planted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--ngram", type=int, default=None, help="default: the config default")
    ap.add_argument("--bands", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--datatrove-python", default=None, help="also run datatrove's MinHash (.venv-bench/bin/python)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/near_dedup_bench"))
    args = ap.parse_args()
    from prep_throughput import build_corpus

    from data_prep.config import MinHashConfig

    shutil.rmtree(args.work, ignore_errors=True)
    corpus = args.work / "corpus"
    mb = build_corpus(corpus, args.mb, 4)
    planted = plant(corpus, args.copies, args.seed)
    texts = {d["id"]: d["text"] for f in sorted(corpus.glob("*.jsonl")) for d in map(json.loads, open(f))}
    # Both sides are judged on the same shingles: data_prep's default n-gram.
    ngram = MinHashConfig().ngram
    mh = {k: v for k, v in (("ngram", args.ngram), ("bands", args.bands), ("rows", args.rows), ("threshold", args.threshold)) if v}
    removed, seconds, used = run_ours(corpus, args.work / "ours", args.workers, mh)
    result = {"corpus_MB": round(mb, 2), "documents": len(texts), "planted": len(planted), "workers": args.workers,
              "judged_on_word_ngrams": ngram,
              "data_prep": {"minhash": {k: used[k] for k in ("ngram", "bands", "rows", "threshold")},
                            "seconds": round(seconds, 1), **score(removed, planted, texts, ngram)}}
    if args.datatrove_python:
        removed, seconds = run_datatrove(args.datatrove_python, corpus, args.work / "datatrove", args.workers)
        result["datatrove"] = {"minhash": {"ngram": 5, "bands": 14, "rows": 8}, "seconds": round(seconds, 1),
                               **score(removed, planted, texts, ngram)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
