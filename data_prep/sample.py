"""Deterministic, size-bounded tokenizer training sample: never the full corpus.

Each kept document is taken when a hash of its gid falls below a rate chosen so the sample
comes to about tokenizer.sample_bytes; documents are visited in gid order and the sample
stops at the byte budget, so the same input always gives the same sample.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa

from data_prep.dedup import REMOVED_DTYPE
from data_prep.executor import _bar
from data_prep.shards import removed_for_task


def write_sample(ctx, path) -> None:
    budget = ctx.cfg.tokenizer.sample_bytes
    total = sum(json.loads((d / "stats.json").read_text())["bytes"].get("passed_filters", 0) for d in ctx.task_dirs())
    rate = min(1.0, 1.1 * budget / max(total, 1))  # 10% headroom for the removed duplicates
    removed_path = ctx.dedup_dir / "removed.npy"
    removed = np.load(removed_path, mmap_mode="r") if removed_path.exists() else np.empty(0, dtype=REMOVED_DTYPE)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f, _bar("tokenizer sample", budget, "B") as bar:
        for task, d in zip(ctx.plan, ctx.task_dirs()):
            gone = set(removed_for_task(removed, task.index)["gid"].tolist())
            for batch in pa.ipc.open_stream(pa.memory_map(str(d / "docs.arrow"))):
                for gid, text in zip(batch.column("gid").to_pylist(), batch.column("text").to_pylist()):
                    if gid in gone:
                        continue
                    h = int.from_bytes(hashlib.blake2b(gid.to_bytes(8, "little"), digest_size=8).digest(), "little")
                    if h >= rate * 2.0**64:
                        continue
                    f.write(text)
                    f.write("\n")
                    n = len(text.encode("utf-8", "surrogatepass")) + 1
                    written += n
                    bar.update(min(n, budget - bar.n))
                    if written >= budget:
                        break
                if written >= budget:
                    break
            if written >= budget:
                break
    os.replace(tmp, path)
