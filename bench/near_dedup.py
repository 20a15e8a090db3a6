"""Near-duplicate detection quality on real text with planted edited copies (bench only).

    python bench/near_dedup.py [--mb 10] [--copies 1000] [--ngram 5 --bands 28 --rows 4]

Corpus: the demo corpus (docs, licences, docstrings of the installed packages) as jsonl. For
`--copies` documents of at least 100 words, an edited copy is planted at a random position of
a later file: 2-6% of its words (uniform per copy) replaced, deleted or inserted at scattered
positions, one word at a time (typos, substitutions, small edits). The prep pipeline's
prepare + dedup stages run on it with the given MinHash settings, and the script reports:

  recall        planted copies removed as near duplicates (of their original, or of another
                copy of it that survived: any survivor within the threshold is right)
  false merges  removed documents whose exact shingle Jaccard with the survivor they name is
                below 0.5 (on the same shingles; the guarantee is zero)
  other removals  real near duplicates the demo corpus has of its own (vendored copies,
                licence variants), each also checked against the 0.5 bound
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--ngram", type=int, default=None, help="default: the config default")
    ap.add_argument("--bands", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/near_dedup_bench"))
    args = ap.parse_args()
    from prep_throughput import build_corpus

    from data_prep.config import PrepConfig
    from data_prep.dedup import KIND_NEAR, jaccard, shingle_sets
    from data_prep.executor import LocalExecutor
    from data_prep.stages import STAGES, open_context

    shutil.rmtree(args.work, ignore_errors=True)
    corpus = args.work / "corpus"
    mb = build_corpus(corpus, args.mb, 4)
    planted = plant(corpus, args.copies, args.seed)
    mh = {k: v for k, v in (("ngram", args.ngram), ("bands", args.bands), ("rows", args.rows), ("threshold", args.threshold)) if v}
    cfg = PrepConfig.model_validate({
        "sources": [{"name": "bench", "type": "jsonl", "paths": [str(corpus)], "id_field": "id"}],
        "filters": {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")},
        "minhash": mh})
    ctx = open_context(cfg, args.work / "out")
    ex = LocalExecutor(args.workers)
    t0 = time.perf_counter()
    for st in STAGES[:4]:
        st.run(ctx, ex)
    seconds = time.perf_counter() - t0
    import numpy as np

    removed = np.load(ctx.dedup_dir / "removed.npy")
    names = ctx.locate(sorted({int(g) for g in removed["gid"]} | {int(g) for g in removed["survivor"]}))
    store_texts = {}
    from data_prep.dedup import SignatureStore

    store = SignatureStore(ctx.prepare_dir)
    gids = np.array(sorted(names), dtype=np.uint64)
    store_texts = dict(zip(gids.tolist(), store.texts(gids)))
    near = removed[removed["kind"] == KIND_NEAR]
    sets = dict(zip(store_texts, shingle_sets(list(store_texts.values()), cfg.minhash.ngram)))
    sims = [jaccard(sets[int(r["gid"])], sets[int(r["survivor"])]) for r in near]
    removed_ids = {names[int(r["gid"])]: names[int(r["survivor"])] for r in removed}
    found = sum(1 for c in planted if c in removed_ids)
    false = sum(1 for s in sims if s < 0.5)
    m = cfg.minhash
    result = {"corpus_MB": mb, "planted": len(planted), "found": found, "recall": found / len(planted),
              "near_removed": len(near), "false_merges_below_0.5": false, "min_jaccard_removed": min(sims, default=None),
              "other_near_removed": len(near) - sum(1 for r in near if names[int(r["gid"])] in planted),
              "minhash": {"ngram": m.ngram, "bands": m.bands, "rows": m.rows, "threshold": m.threshold},
              "prepare+dedup_seconds": seconds}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
