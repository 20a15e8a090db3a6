"""Byte-level BPE tokenization (tokenizer.type "bpe") against `tokenizers`' raw batch encode of
the same text, one thread each (bench only; not a unit test).

    .venv/bin/python bench/bpe_throughput.py [--corpus demo] [--mb 14] [--vocab 32000] [--rounds 7]

Trains a byte-level BPE (data_prep/bpe.py) on the first tokenizer sample's worth of the corpus,
then times, in `--rounds` rounds, each of the following once per round (in reverse order every
other round, so that a slow stretch of a shared machine falls on both sides), and prints MB/s
of input text on one core (the median over the rounds) and each overhead as the median of the
rounds' own ratios, with every round's:
(a) `Tokenizer.encode_batch` of the documents in batches of 1,024, ids not even read: the raw
    figure;
(b) what the tokenize task does per batch (data_prep.encoders.BpeEncoder: ids with BOS/EOS,
    then the Arrow shard writer), on the same texts;
(c) the whole tokenize stage of a run (read the prepared documents, drop duplicates, split,
    encode, write shards and the task record), one worker, against (a) on the documents it
    kept;
and the overhead of (b) and (c) over (a). Corpus: the installed packages' docs, licences and
docstrings (`demo`, as bench/prep_throughput.py) or a bench/corpora.py corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BATCH = 1024  # data_prep.shards.ENCODE_BATCH


def tokenize_batches(texts: list[str], encode, vocab_size: int) -> None:
    """What a tokenize task does with its kept texts: encode a batch, write it to a shard."""
    from data_prep.shards import ShardWriter, id_dtype

    with tempfile.TemporaryDirectory() as d:
        w = ShardWriter(Path(d), "train", 0, id_dtype(vocab_size), 1 << 40, "bench")
        for i in range(0, len(texts), BATCH):
            w.write(encode(texts[i : i + BATCH]))
        w.close()


def corpus_texts(name: str, mb: float, work: Path, cache: Path) -> Path:
    """The corpus as jsonl files under work/corpus."""
    from corpora import build, read
    from prep_throughput import build_corpus, split_corpus

    corpus = work / "corpus"
    if name == "demo":
        build_corpus(corpus, mb, 4)
    else:
        split_corpus(read(build(name, mb, cache)), corpus, 4)
    return corpus


def run_config(corpus: Path, tok_file: Path):
    from data_prep.config import PrepConfig

    return PrepConfig.model_validate({
        "sources": [{"name": "bench", "type": "jsonl", "paths": [str(corpus)], "id_field": "id"}],
        "filters": {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")},
        "tokenizer": {"type": "bpe", "existing": str(tok_file)},
    })


def kept_texts(ctx) -> list[str]:
    """The documents the tokenize stage encodes: prepared, minus the duplicates removed."""
    import numpy as np
    import pyarrow as pa

    from data_prep.shards import removed_for_task, removed_in_batch

    removed = np.load(ctx.dedup_dir / "removed.npy", mmap_mode="r")
    out = []
    for t in ctx.plan:
        mine = removed_for_task(removed, t.index)
        for batch in pa.ipc.open_stream(pa.memory_map(str(ctx.prepare_dir / f"task-{t.index:05d}" / "docs.arrow"))):
            gone, _ = removed_in_batch(mine, batch.column("gid").to_numpy())
            out += [text for text, g in zip(batch.column("text").to_pylist(), gone.tolist()) if not g]
    return out


def main() -> None:
    # One thread each, set before `tokenizers` starts its thread pool.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from corpora import CORPORA
    from tokenizers import Tokenizer

    from data_prep import encoders
    from data_prep.bpe import save, train_bpe
    from data_prep.config import TokenizerConfig
    from data_prep.executor import LocalExecutor
    from data_prep.stages import STAGES, Tokenize, open_context

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=CORPORA, default="demo", help="demo or a bench/corpora.py corpus (default demo)")
    ap.add_argument("--mb", type=float, default=14, help="corpus size in MB of text (default 14)")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary (default 32000)")
    ap.add_argument("--sample-mb", type=float, default=4, help="tokenizer training sample (default 4 MB)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds, each timing (a), (b), (a) kept and (c) once (default 7)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bpe_bench"), help="scratch directory (emptied first)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "corpora", help="where bench/corpora.py keeps corpora")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    corpus = corpus_texts(args.corpus, args.mb, args.work, args.cache)
    texts = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in open(p, encoding="utf-8")]
    sample = args.work / "sample.txt"
    with open(sample, "w", encoding="utf-8") as f:
        f.write("\n".join(texts)[: int(args.sample_mb * 1e6)])
    cfg = TokenizerConfig(type="bpe", vocab_size=args.vocab)
    t0 = time.perf_counter()
    tok_file = args.work / "tokenizer.json"
    save(train_bpe(sample, cfg), tok_file)
    print(f"trained a {args.vocab}-token byte-level BPE on {args.sample_mb} MB in {time.perf_counter() - t0:.1f} s (one thread)")

    # The run up to the tokenize stage, one worker (in this process, one thread).
    run = run_config(corpus, tok_file)
    ctx = open_context(run, args.work / "run")
    ex = LocalExecutor(1)
    for st in STAGES[: STAGES.index(next(s for s in STAGES if isinstance(s, Tokenize)))]:
        st.run(ctx, ex)
    kept = kept_texts(ctx)

    def stage():
        shutil.rmtree(ctx.work / "tokenize", ignore_errors=True)
        shutil.rmtree(ctx.shard_dir, ignore_errors=True)
        Tokenize().run(ctx, ex)

    raw_tok = Tokenizer.from_file(str(tok_file))
    enc = encoders.load(tok_file, run.tokenizer)
    size = enc.vocab()["vocab_size"]

    def raw(docs: list[str]) -> None:
        # Each batch's encodings are dropped before the next, as a task drops each batch once
        # written: kept for the whole corpus they would cost raw the memory traffic ours avoids.
        for i in range(0, len(docs), BATCH):
            raw_tok.encode_batch(docs[i : i + BATCH], add_special_tokens=False)

    fns = {"raw": lambda: raw(texts), "batches": lambda: tokenize_batches(texts, lambda b: enc.encode(b, True, True), size),
           "raw_kept": lambda: raw(kept), "stage": stage}
    seconds = {k: [] for k in fns}
    for r in range(max(1, args.rounds)):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[k]()
            seconds[k].append(time.perf_counter() - t0)
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    mb_kept = sum(len(t.encode("utf-8", "surrogatepass")) for t in kept) / 1e6
    docs_mb = {"raw": mb, "batches": mb, "raw_kept": mb_kept, "stage": mb_kept}
    rate = {k: docs_mb[k] / statistics.median(s) for k, s in seconds.items()}
    # Each round's overhead of ours over the raw encode of the same texts, in that round.
    overhead = {ours: [a / b for a, b in zip(seconds[ours], seconds[peer])]
                for ours, peer in (("batches", "raw"), ("stage", "raw_kept"))}

    def over(k: str) -> str:
        rounds = ", ".join(f"{100 * (x - 1):+.1f}%" for x in overhead[k])
        return f"overhead {100 * (statistics.median(overhead[k]) - 1):5.1f}% (rounds: {rounds})"

    print(f"\ncorpus {args.corpus}: {mb:.1f} MB, {len(texts)} documents ({mb_kept:.1f} MB, {len(kept)} kept); "
          f"one thread, median of {len(seconds['raw'])} rounds, MB/s of input text")
    print(f"  (a) tokenizers encode_batch (raw)          {rate['raw']:7.2f} MB/s")
    print(f"  (b) encode + shard writer (the task's work) {rate['batches']:7.2f} MB/s  {over('batches')}")
    print(f"  (a) on the kept documents                  {rate['raw_kept']:7.2f} MB/s")
    print(f"  (c) the tokenize stage, one worker         {rate['stage']:7.2f} MB/s  {over('stage')}")
    (args.work / "result.json").write_text(json.dumps({"corpus": args.corpus, "MB": mb, "kept_MB": mb_kept,
                                                       "vocab": args.vocab, "MBps": rate, "seconds": seconds,
                                                       "overhead_rounds": overhead}, indent=2))


if __name__ == "__main__":
    main()
