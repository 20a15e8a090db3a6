"""Exact and MinHash near-duplicate deduplication, partitioned on disk.

Layout (all under OUT/work):
  prepare/task-NNNNN/exact-PPP.npy   (hash_hi, hash_lo, gid) of the task's documents, partition PPP
  prepare/task-NNNNN/bands-PPP.npy   (band key, gid) rows of the task's documents, partition PPP
  prepare/task-NNNNN/sigs.npy        uint32 [docs, num_perm] signatures (read memory-mapped),
  prepare/task-NNNNN/gids.npy        row i of sigs.npy belongs to gid gids[i]
  dedup/exact-PPP.npy, dedup/near-PPP.npy   per-partition duplicate pairs (dup gid, survivor gid)
  dedup/removed.npy                  merged result, sorted by gid: (gid, kind, survivor)

Each partition is processed on its own (a task of the executor), so no process ever holds
every signature or every band key; only the duplicate edges meet in the final merge.
The survivor of a group is always the smallest gid: the first copy in input order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.minhash import estimated_jaccard, shingle_hashes

EXACT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("gid", "<u8")])
BAND_DTYPE = np.dtype([("key", "<u8"), ("gid", "<u8")])
PAIR_DTYPE = np.dtype([("gid", "<u8"), ("survivor", "<u8")])
REMOVED_DTYPE = np.dtype([("gid", "<u8"), ("kind", "u1"), ("survivor", "<u8")])
KIND_EXACT, KIND_NEAR = 1, 2


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    # High bits: the low bits of a key also pick its position inside sorted runs.
    return ((keys >> np.uint64(40)) % np.uint64(partitions)).astype(np.int64)


def split_by_partition(rows: np.ndarray, part: np.ndarray, partitions: int) -> list[np.ndarray]:
    order = np.argsort(part, kind="stable")
    rows, part = rows[order], part[order]
    bounds = np.searchsorted(part, np.arange(partitions + 1))
    return [rows[bounds[p] : bounds[p + 1]] for p in range(partitions)]


def _load_partition(task_dirs: list[Path], name: str, dtype) -> np.ndarray:
    parts = [np.load(d / name) for d in task_dirs if (d / name).exists()]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def exact_pairs(task_dirs: list[Path], partition: int) -> np.ndarray:
    """(duplicate gid, survivor gid) for every document whose text hash repeats an earlier one."""
    rows = _load_partition(task_dirs, f"exact-{partition:03d}.npy", EXACT_DTYPE)
    if len(rows) == 0:
        return np.empty(0, dtype=PAIR_DTYPE)
    rows = rows[np.lexsort((rows["gid"], rows["lo"], rows["hi"]))]
    same = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
    group_start = np.concatenate([[True], ~same])
    first = np.maximum.accumulate(np.where(group_start, np.arange(len(rows)), 0))
    dup = ~group_start
    out = np.empty(int(dup.sum()), dtype=PAIR_DTYPE)
    out["gid"] = rows["gid"][dup]
    out["survivor"] = rows["gid"][first[dup]]
    return out


class SignatureStore:
    """Random access to any document's signature and text through memory-mapped per-task files
    (sigs.npy, docs.arrow): what a process holds is the page cache's business, not its heap."""

    def __init__(self, prepare_dir: Path):
        self.dir = prepare_dir
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._docs: dict[int, tuple[list, np.ndarray]] = {}

    def _rows(self, gids: np.ndarray):
        """(task, positions in that task, selection mask) for each task among gids."""
        tasks = (gids >> np.uint64(32)).astype(np.int64)
        for t in np.unique(tasks):
            m = self._maps.get(int(t))
            if m is None:
                d = self.dir / f"task-{t:05d}"
                m = self._maps[int(t)] = (np.load(d / "gids.npy"), np.load(d / "sigs.npy", mmap_mode="r"))
            sel = tasks == t
            # gids.npy is sorted (documents are appended in input order): row = its position.
            yield int(t), np.searchsorted(m[0], gids[sel]), sel

    def get(self, gids: np.ndarray) -> np.ndarray:
        out = None
        for t, pos, sel in self._rows(gids):
            rows = self._maps[t][1][pos]
            if out is None:
                out = np.empty((len(gids), rows.shape[1]), dtype=rows.dtype)
            out[sel] = rows
        return out

    def texts(self, gids: np.ndarray) -> list[str]:
        import pyarrow as pa

        out: list = [None] * len(gids)
        for t, pos, sel in self._rows(gids):
            if t not in self._docs:
                path = self.dir / f"task-{t:05d}" / "docs.arrow"
                batches = [b.column("text") for b in pa.ipc.open_stream(pa.memory_map(str(path)))]
                self._docs[t] = (batches, np.cumsum([0] + [len(b) for b in batches]))
            batches, starts = self._docs[t]
            b = np.searchsorted(starts, pos, side="right") - 1
            for i, bi, p in zip(np.flatnonzero(sel), b, pos):
                out[i] = batches[bi][int(p - starts[bi])].as_py()
        return out


def shingle_sets(texts: list[str], ngram: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted (the sets exact Jaccard is computed on)."""
    h, off = shingle_hashes(texts, ngram)
    return [np.unique(h[off[i] : off[i + 1]]) for i in range(len(texts))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


# Candidates whose signature estimate is this far below the threshold are not worth the exact
# check: with 112 permutations the estimate's standard deviation is at most 0.047, so 0.2 is
# over four of them.
ESTIMATE_MARGIN = 0.2
# Shingle sets kept between buckets of a partition (a document is usually a candidate in
# several bands): bounds the job's memory at ~SHINGLE_CACHE x a document's shingles x 8 bytes.
SHINGLE_CACHE = 20_000


def near_pairs(task_dirs: list[Path], partition: int, store: SignatureStore, threshold: float, ngram: int,
               max_checks: int = 8) -> np.ndarray:
    """Verified near-duplicate edges (earlier gid, later gid) from the band keys of one partition.

    Documents sharing a band key are candidates. Each member of a bucket is checked against the
    bucket's first max_checks members (its smallest gids: the copies most likely to survive),
    and an edge is kept only where the exact Jaccard of the two documents' shingle sets reaches
    the threshold. Exact, not estimated: a pair just below the threshold is never an edge, and
    the merge relies on every edge it uses being a true one.
    """
    rows = _load_partition(task_dirs, f"bands-{partition:03d}.npy", BAND_DTYPE)
    if len(rows) == 0:
        return np.empty(0, dtype=PAIR_DTYPE)
    rows = rows[np.lexsort((rows["gid"], rows["key"]))]
    same = rows["key"][1:] == rows["key"][:-1]
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.append(starts[1:], len(rows))
    multi = ends - starts > 1
    edges: set[tuple[int, int]] = set()
    checked: set[tuple[int, int]] = set()
    shingles: dict[int, np.ndarray] = {}  # recent candidates' shingle sets, at most SHINGLE_CACHE
    for s, e in zip(starts[multi], ends[multi]):
        gids = np.unique(rows["gid"][s:e])
        if len(gids) < 2:
            continue
        sigs = store.get(gids)
        heads = min(max_checks, len(gids) - 1)
        todo = []
        for i in range(1, len(gids)):
            k = min(i, heads)
            est = estimated_jaccard(sigs[:k], sigs[i][None, :])
            for j in np.flatnonzero(est >= threshold - ESTIMATE_MARGIN):
                pair = (int(gids[j]), int(gids[i]))
                if pair not in checked:
                    checked.add(pair)
                    todo.append(pair)
        if len(shingles) > SHINGLE_CACHE:
            shingles.clear()
        need = sorted({g for p in todo for g in p} - shingles.keys())
        if need:
            shingles.update(zip(need, shingle_sets(store.texts(np.array(need, dtype=np.uint64)), ngram)))
        edges.update(p for p in todo if jaccard(shingles[p[0]], shingles[p[1]]) >= threshold)
    out = np.array(sorted(edges), dtype=np.uint64).reshape(-1, 2)
    res = np.empty(len(out), dtype=PAIR_DTYPE)
    res["survivor"], res["gid"] = out[:, 0], out[:, 1]
    return res


def merge(exact: list[np.ndarray], near: list[np.ndarray]) -> np.ndarray:
    """Survivors and removals from the exact pairs and the verified near edges. Sorted by gid.

    Exact groups first: each keeps its smallest gid. Near edges then join representatives of
    exact groups, and clusters are formed greedily in gid order, never transitively: a document
    is removed only as a duplicate of a survivor it has a verified edge with, and a survivor is
    never removed. So A~B and B~C with A and C far apart removes B (copy of A) and keeps C:
    union-find would have removed C as a "copy" of A. A removed document always names a
    document that is kept: an exact copy of a document that is itself near-removed names that
    document's survivor (kind near).
    """
    ex = np.concatenate(exact) if exact else np.empty(0, dtype=PAIR_DTYPE)
    nr = np.concatenate(near) if near else np.empty(0, dtype=PAIR_DTYPE)
    rep = dict(zip(ex["gid"].tolist(), ex["survivor"].tolist()))
    earlier: dict[int, set[int]] = {}
    for a, b in zip(nr["survivor"].tolist(), nr["gid"].tolist()):
        a, b = rep.get(a, a), rep.get(b, b)
        if a != b:
            lo, hi = (a, b) if a < b else (b, a)
            earlier.setdefault(hi, set()).add(lo)
    near_of: dict[int, int] = {}
    for doc in sorted(earlier):
        kept = [g for g in earlier[doc] if g not in near_of]  # every g < doc is decided by now
        if kept:
            near_of[doc] = min(kept)
    rows = [(g, KIND_NEAR, near_of[r]) if r in near_of else (g, KIND_EXACT, r) for g, r in rep.items()]
    rows += [(g, KIND_NEAR, s) for g, s in near_of.items()]
    out = np.empty(len(rows), dtype=REMOVED_DTYPE)
    if rows:
        arr = np.array(rows, dtype=np.uint64)
        out["gid"], out["kind"], out["survivor"] = arr[:, 0], arr[:, 1], arr[:, 2]
    return out[np.argsort(out["gid"], kind="stable")]
