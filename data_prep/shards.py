"""Tokenize task and manifest: kept documents -> token ids -> Arrow IPC stream shards.

One tokenize task per prepare task: it drops the documents the dedup merge removed, encodes
the rest with the run's tokenizer (data_prep/encoders.py; BOS/EOS per document as configured), assigns each document to
train or validation by a hash of (source, id), and writes shards named
`{split}-{task:05d}-{n:04d}.arrow` of at most shards.target_bytes, each under a temporary
name renamed when complete. The task's record tokenize/task-NNNNN.json is written last and
is its completion marker.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.config import PrepConfig
from data_prep import encoders
from data_prep.dedup import KIND_EXACT, REMOVED_DTYPE
from data_prep.io_utils import atomic_write_text, sha256_file, tmp_name
from data_prep.records import EXACT_DUP, KEPT, NEAR_DUP
from data_prep.stats import Histogram

ENCODE_BATCH = 1024


def id_dtype(vocab_size: int):
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def is_validation(source: str, doc_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}\x00{source}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


class ShardWriter:
    """Rolls Arrow stream files of at most target_bytes for one split of one task."""

    def __init__(self, out_dir: Path, split: str, task: int, dtype, target_bytes: int, source: str):
        self.out_dir, self.split, self.task = out_dir, split, task
        self.dtype, self.target, self.source = dtype, target_bytes, source
        self.schema = pa.schema([("input_ids", pa.list_(dtype))])
        self.shards: list[dict] = []
        self._writer = None

    def _open(self):
        self.path = self.out_dir / f"{self.split}-{self.task:05d}-{len(self.shards):04d}.arrow"
        self.tmp = tmp_name(self.path)
        self._writer = pa.ipc.new_stream(str(self.tmp), self.schema)
        self.docs = self.tokens = self.bytes = 0

    def write(self, ids: list[list[int]]) -> None:
        if not ids:
            return
        if self._writer is None:
            self._open()
        # Arrow converts the nested Python lists in C; no per-token Python work here.
        arr = pa.array(ids, type=pa.list_(self.dtype))
        self._writer.write_batch(pa.record_batch([arr], schema=self.schema))
        self.docs += len(ids)
        self.tokens += len(arr.values)
        self.bytes += arr.nbytes
        if self.bytes >= self.target:
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        sha = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        self.shards.append({"path": self.path.name, "split": self.split, "source": self.source,
                            "documents": self.docs, "tokens": self.tokens, "sha256": sha})


def removed_for_task(removed: np.ndarray, task: int) -> np.ndarray:
    """The task's rows of removed.npy (a memory map; a Python binary search reads ~30 of its
    rows, where np.searchsorted on a field would copy the whole column)."""
    col = removed["gid"]
    return removed[bisect.bisect_left(col, task << 32) : bisect.bisect_left(col, (task + 1) << 32)]


def removed_in_batch(mine: np.ndarray, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is removed, its row of `mine`) for each gid of a batch, both sorted by gid; holds the
    rows of `mine` within the batch's gid range only."""
    if len(mine) == 0 or len(gids) == 0:
        return np.zeros(len(gids), dtype=bool), np.empty(len(gids), dtype=REMOVED_DTYPE)
    col = mine["gid"]
    rows = np.asarray(mine[bisect.bisect_left(col, int(gids[0])) : bisect.bisect_right(col, int(gids[-1]))])
    pos = np.minimum(np.searchsorted(rows["gid"], gids), max(len(rows) - 1, 0))
    hit = (rows["gid"][pos] == gids) if len(rows) else np.zeros(len(gids), dtype=bool)
    return hit, rows[pos] if len(rows) else np.empty(len(gids), dtype=REMOVED_DTYPE)


def run_tokenize(cfg: PrepConfig, task, work: Path, shard_dir: Path, model_file: Path, id_lookup) -> dict:
    marker = work / "tokenize" / f"task-{task.index:05d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    enc = encoders.load(model_file, cfg.tokenizer)
    dtype = id_dtype(enc.vocab()["vocab_size"])
    removed_path = work / "dedup" / "removed.npy"
    removed = np.load(removed_path, mmap_mode="r") if removed_path.exists() else np.empty(0, dtype=REMOVED_DTYPE)
    mine = removed_for_task(removed, task.index)
    sc = cfg.shards
    writers = {s: ShardWriter(shard_dir, s, task.index, dtype, sc.target_bytes, task.source) for s in ("train", "validation")}
    records = {KEPT: 0, EXACT_DUP: 0, NEAR_DUP: 0}
    nbytes = {KEPT: 0, EXACT_DUP: 0, NEAR_DUP: 0}
    split_docs = {"train": 0, "validation": 0}
    split_tokens = {"train": 0, "validation": 0}
    tokens_hist = Histogram()
    # Every duplicate, with its survivor's id, written batch by batch (the text too with
    # output.write_removed); kept only if there is one.
    dup_path = work / "tokenize" / f"task-{task.index:05d}.duplicates.jsonl"
    dup_tmp = tmp_name(dup_path)
    dup_log = open(dup_tmp, "w", encoding="utf-8")
    reader = pa.ipc.open_stream(pa.memory_map(str(work / "prepare" / f"task-{task.index:05d}" / "docs.arrow")))
    for batch in reader:
        gid_arr = batch.column("gid").to_numpy()
        hit, rows = removed_in_batch(mine, gid_arr)
        names = id_lookup(rows["survivor"][hit].tolist()) if hit.any() else {}
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        keep_texts, keep_split = [], []
        for k, (doc_id, text) in enumerate(zip(ids, texts)):
            n = len(text.encode("utf-8", "surrogatepass"))
            if hit[k]:
                outcome = EXACT_DUP if rows["kind"][k] == KIND_EXACT else NEAR_DUP
                records[outcome] += 1
                nbytes[outcome] += n
                row = {"id": doc_id, "outcome": outcome, "survivor": names[int(rows["survivor"][k])],
                       **({"text": text} if cfg.output.write_removed else {})}
                dup_log.write(json.dumps(row, ensure_ascii=False) + "\n")
                continue
            records[KEPT] += 1
            nbytes[KEPT] += n
            keep_texts.append(text)
            keep_split.append("validation" if is_validation(task.source, doc_id, sc.validation_fraction, sc.split_seed) else "train")
        for i in range(0, len(keep_texts), ENCODE_BATCH):
            encoded = enc.encode(keep_texts[i : i + ENCODE_BATCH], sc.add_bos, sc.add_eos)
            by_split: dict[str, list] = {"train": [], "validation": []}
            for ids_, split in zip(encoded, keep_split[i : i + ENCODE_BATCH]):
                by_split[split].append(ids_)
            for split, docs in by_split.items():
                for d in docs:
                    tokens_hist.add(len(d))
                split_docs[split] += len(docs)
                split_tokens[split] += sum(map(len, docs))
                writers[split].write(docs)
    for w in writers.values():
        w.close()
    dup_log.flush()
    os.fsync(dup_log.fileno())
    dup_log.close()
    if records[EXACT_DUP] + records[NEAR_DUP]:
        os.replace(dup_tmp, dup_path)
    else:
        os.unlink(dup_tmp)
    result = {
        "task": task.index, "source": task.source, "records": records, "bytes": nbytes,
        "tokens": sum(split_tokens.values()), "splits": {s: {"documents": split_docs[s], "tokens": split_tokens[s]} for s in split_docs},
        "shards": writers["train"].shards + writers["validation"].shards,
        "tokens_hist": tokens_hist.to_json(),
    }
    atomic_write_text(marker, json.dumps(result, indent=1, sort_keys=True))
    return result


def build_manifest(cfg: PrepConfig, tokenize: list[dict], model_file: Path, vocab: dict) -> dict:
    # `tokenize` is in task order, each task's shards in the order written: a stable sort by split
    # keeps document order (the names' 5-digit task numbers would sort task 100000 before 20000).
    shards = [s for t in tokenize for s in t["shards"]]
    shards.sort(key=lambda s: s["split"] != "train")
    splits = {s: {"documents": 0, "tokens": 0} for s in ("train", "validation")}
    sources: dict = {}
    for sh in shards:
        for agg in (splits[sh["split"]], sources.setdefault(sh["source"], {"documents": 0, "tokens": 0})):
            agg["documents"] += sh["documents"]
            agg["tokens"] += sh["tokens"]
    from data_prep.config import canonical_json

    resolved = cfg.resolved()
    return {
        "format": "arrow-token-shards",
        "version": 1,
        "column": "input_ids",
        "dtype": "uint16" if vocab["vocab_size"] <= 65536 else "uint32",
        "add_bos": cfg.shards.add_bos,
        "add_eos": cfg.shards.add_eos,
        "tokenizer": {"model": f"../tokenizer/{model_file.name}", "sha256": sha256_file(model_file), **vocab},
        "shards": shards,
        "splits": splits,
        "sources": dict(sorted(sources.items())),
        "config": resolved,
        "config_sha256": hashlib.sha256(canonical_json(resolved).encode()).hexdigest(),
    }
