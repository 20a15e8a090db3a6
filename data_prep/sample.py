"""Deterministic, size-bounded tokenizer training sample: never the full corpus.

A kept document is taken when a hash of its source and id falls below a rate chosen so the
sample comes to about tokenizer.sample_bytes (not of its gid: the sample, hence the tokenizer,
must not depend on how the input was cut into tasks). Each prepare task writes its part in
parallel (work/sample/task-NNNNN.txt); the parts are joined in task order up to the byte
budget, so the same input always gives the same sample, whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.dedup import REMOVED_DTYPE
from data_prep.io_utils import tmp_name


def sample_rate(ctx) -> float:
    total = sum(json.loads((d / "stats.json").read_text())["bytes"].get("passed_filters", 0) for d in ctx.task_dirs())
    # 10% headroom for the duplicates that are removed after this estimate.
    return min(1.0, 1.1 * ctx.cfg.tokenizer.sample_bytes / max(total, 1))


def write_part(ctx, rate: float, task) -> int:
    from data_prep.shards import removed_for_task, removed_in_batch

    out = ctx.work / "sample" / f"task-{task.index:05d}.txt"
    if out.exists():
        return out.stat().st_size
    removed_path = ctx.dedup_dir / "removed.npy"
    removed = np.load(removed_path, mmap_mode="r") if removed_path.exists() else np.empty(0, dtype=REMOVED_DTYPE)
    mine = removed_for_task(removed, task.index)
    limit = rate * 2.0**64
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    with open(tmp, "w", encoding="utf-8") as f:
        docs = ctx.prepare_dir / f"task-{task.index:05d}" / "docs.arrow"
        for batch in pa.ipc.open_stream(pa.memory_map(str(docs))):
            gone, _ = removed_in_batch(mine, batch.column("gid").to_numpy())
            for doc_id, text, g in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist(), gone.tolist()):
                key = f"{task.source}\x00{doc_id}".encode("utf-8", "surrogatepass")
                h = int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"tokenizer-sample").digest(), "little")
                if not g and h < limit:
                    f.write(text)
                    f.write("\n")
    os.replace(tmp, out)
    return out.stat().st_size


def write_sample(ctx, ex, path: Path) -> None:
    rate = sample_rate(ctx)
    ex.map("tokenizer sample", partial(write_part, ctx, rate), ctx.plan, [t.bytes for t in ctx.plan], unit="B")
    budget = ctx.cfg.tokenizer.sample_bytes
    tmp = tmp_name(path)
    written = 0
    with open(tmp, "wb") as out:
        for t in ctx.plan:
            with open(ctx.work / "sample" / f"task-{t.index:05d}.txt", "rb") as f:
                for line in f:
                    if written >= budget:
                        break
                    out.write(line)
                    written += len(line)
            if written >= budget:
                break
    os.replace(tmp, path)
