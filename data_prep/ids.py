"""Duplicate ids: records of an `id_field` source whose id repeats an earlier record's.

An id names a document in rejected.jsonl, removed.jsonl and duplicates.jsonl (the survivor a
duplicate names), so two documents with one id make those rows ambiguous. They are found the
way exact dedup finds repeated texts, with its code: each prepare task hashes the id of every
record it reads (IdHashes: 128-bit blake2b of source and id, as exact dedup hashes texts) into
ids-PPP.npy by partition, and one job per partition sorts its rows and pairs each repeat with
the id's first record (dedup.exact_pairs). No process holds every id: a job holds 24 bytes x
records / `minhash.partitions`, as an exact dedup job does. A source without `id_field` has
`file:line` ids, unique by construction, and is not hashed.

Ids are compared within a source: two sources may number their records the same way.
Examples name both records by file:line, from the task's where.json: the runs of consecutive
lines it read, [first ordinal, file, first line] (one per file, since every line or row is
one record).
"""
from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.dedup import EXACT_DTYPE, MERGE_ROWS, PAIR_DTYPE, append_by_partition, gids_and_ids, hash_rows, partition_of
from data_prep.io_utils import NpyAppender
from data_prep.records import Record

EXAMPLES = 5  # repeated ids named in stats.json and summary.md, first in input order
FLUSH_IDS = 8192  # ids hashed and written at a time: what a task holds of them (~1 MB)


def id_key(source: str, doc_id: str) -> bytes:
    return hashlib.blake2b(f"{source}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class IdHashes:
    """A prepare task's id hashes by partition (ids-PPP.npy) and its where.json."""

    def __init__(self, task_dir: Path, source: str, partitions: int):
        self.dir, self.source, self.partitions = task_dir, source, partitions
        self.outs = [NpyAppender(task_dir / f"ids-{p:03d}.npy", EXACT_DTYPE) for p in range(partitions)]
        self.where: list[list] = []
        self.next: tuple[str, int] | None = None  # the (file, line) that continues the last run
        self.gids: list[int] = []
        self.keys: list[bytes] = []

    def add(self, gid: int, rec: Record) -> None:
        if (rec.file, rec.line) != self.next:
            self.where.append([gid & 0xFFFFFFFF, rec.file, rec.line])
        self.next = (rec.file, rec.line + 1)
        if rec.id is not None:  # bad records that never got as far as their id have none
            self.gids.append(gid)
            self.keys.append(id_key(self.source, rec.id))
            if len(self.gids) >= FLUSH_IDS:
                self._flush()

    def _flush(self) -> None:
        if self.gids:
            rows = hash_rows(self.keys, np.array(self.gids, dtype=np.uint64))
            append_by_partition(self.outs, rows, partition_of(rows["hi"], self.partitions))
        self.gids, self.keys = [], []

    def close(self) -> None:
        self._flush()
        for out in self.outs:
            out.close()
        (self.dir / "where.json").write_text(json.dumps(self.where, ensure_ascii=False))


def locate(where: list[list], gid: int) -> tuple[str, int]:
    """(file, line) of a task's record, from its where.json runs."""
    ordinal = gid & 0xFFFFFFFF
    first, file, line = where[bisect.bisect_right([w[0] for w in where], ordinal) - 1]
    return file, line + ordinal - first


def _id_at(task_dir: Path, gid: int, file: str, line: int) -> str:
    """The id of a record: docs.arrow has every record that passed the filters, rejected.jsonl
    every other one."""
    for gids, ids in gids_and_ids(task_dir):
        hit = np.flatnonzero(gids == np.uint64(gid))
        if len(hit):
            return ids[int(hit[0])].as_py()
    with open(task_dir / "rejected.jsonl") as f:
        for row in map(json.loads, f):
            if row["file"] == file and row["line"] == line:
                return row["id"]
    raise LookupError(f"{task_dir}: no record at {file}:{line}")


def report(pairs: list[np.ndarray], tasks: dict[int, tuple[str, Path]], limit: int = EXAMPLES) -> dict:
    """stats.json's duplicate_ids from the partitions' (gid, first gid) pairs, sorted by gid
    (memory maps, read MERGE_ROWS at a time): records that repeat an id, per source, and the
    first `limit` of them. `tasks`: task index -> (source, prepare task directory)."""
    per_source: Counter = Counter()
    for a in pairs:
        for s in range(0, len(a), MERGE_ROWS):
            t, n = np.unique(np.asarray(a["gid"][s : s + MERGE_ROWS]) >> np.uint64(32), return_counts=True)
            for task, count in zip(t.tolist(), n.tolist()):
                per_source[tasks[task][0]] += count
    first = np.concatenate([np.asarray(a[:limit]) for a in pairs] + [np.empty(0, dtype=PAIR_DTYPE)])
    first = np.sort(first, order="gid")[:limit]
    examples = [_example(tasks, int(g), int(s)) for g, s in zip(first["gid"], first["survivor"])]
    return {"records": sum(per_source.values()), "sources": dict(sorted(per_source.items())), "examples": examples}


def _example(tasks: dict[int, tuple[str, Path]], gid: int, first: int) -> dict:
    def where(g: int) -> tuple[Path, str, int]:
        d = tasks[g >> 32][1]
        return (d, *locate(json.loads((d / "where.json").read_text()), g))

    d, file, line = where(first)
    _, again_file, again_line = where(gid)
    return {"source": tasks[first >> 32][0], "id": _id_at(d, first, file, line), "first": f"{file}:{line}",
            "again": f"{again_file}:{again_line}"}
