"""Exact and MinHash near-duplicate deduplication, partitioned on disk.

Layout (all under OUT/work). Every `.npy` is a plain numpy file (np.load reads it); the ones a
task appends to are written with io_utils.NpyAppender, batch by batch:
  prepare/task-NNNNN/exact-PPP.npy   (hash_hi, hash_lo, gid) of the task's documents, partition PPP
  prepare/task-NNNNN/bands-PPP.npy   (band key, gid) rows of the task's documents, partition PPP
  prepare/task-NNNNN/sigs.npy        uint32 [docs, num_perm] signatures (read memory-mapped),
  prepare/task-NNNNN/gids.npy        row i of sigs.npy belongs to gid gids[i]; sorted (read memory-mapped)
  dedup/exact-PPP.npy                per-partition exact pairs (dup gid, survivor gid), sorted by gid
  dedup/exact/{gid,survivor}.npy     all exact pairs, sorted by gid, one column per file (so that a
                                     binary search over a memory map reads a few pages, not a copy)
  dedup/near-PPP.npy                 per-partition near edges between exact-group representatives
                                     (later gid, earlier gid), sorted, no repeats
  dedup/survivors/                   the id of every document some removed one names as its survivor:
                                     gid.npy (sorted), offsets.npy, ids.bin (UTF-8, back to back)
  dedup/removed.npy                  merged result, sorted by gid: (gid, kind, survivor)
  prepare/task-NNNNN/ids-PPP.npy     (hash_hi, hash_lo, gid) of the ids of an id_field source's
                                     records, partition PPP; where.json: each record's file:line
  dedup/ids-PPP.npy                  per-partition repeated ids (gid, gid of the id's first record)
  dedup/duplicate_ids.json           their count per source and the first few, with file:line

Each partition is processed on its own (a task of the executor), so no process ever holds
every signature or every band key; the merge streams the partitions' sorted edges and keeps
its state in memory-mapped files, so it holds a bounded number of rows (MERGE_ROWS) too.
The survivor of a group is always the smallest gid: the first copy in input order.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_prep.io_utils import NpyAppender, staged_dir
from data_prep.minhash import estimated_jaccard, shingle_hashes

EXACT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("gid", "<u8")])
BAND_DTYPE = np.dtype([("key", "<u8"), ("gid", "<u8")])
PAIR_DTYPE = np.dtype([("gid", "<u8"), ("survivor", "<u8")])
REMOVED_DTYPE = np.dtype([("gid", "<u8"), ("kind", "u1"), ("survivor", "<u8")])
KIND_EXACT, KIND_NEAR = 1, 2


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    # High bits: the low bits of a key also pick its position inside sorted runs.
    return ((keys >> np.uint64(40)) % np.uint64(partitions)).astype(np.int64)


def append_by_partition(outs: list[NpyAppender], rows: np.ndarray, part: np.ndarray) -> None:
    """Append each row to its partition's file; the rows keep their order within a partition."""
    order = np.argsort(part, kind="stable")
    rows, part = rows[order], part[order]
    bounds = np.searchsorted(part, np.arange(len(outs) + 1))
    for p, out in enumerate(outs):
        out.append(rows[bounds[p] : bounds[p + 1]])


def _load_partition(task_dirs: list[Path], name: str, dtype) -> np.ndarray:
    # Memory-mapped first, so the one concatenated copy is all the job holds.
    parts = [np.load(d / name, mmap_mode="r") for d in task_dirs if (d / name).exists()]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def hash_rows(digests: list[bytes], gids: np.ndarray) -> np.ndarray:
    """EXACT_DTYPE rows from 16-byte digests (one per gid): what exact_pairs groups."""
    keys = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
    rows = np.empty(len(gids), dtype=EXACT_DTYPE)
    rows["hi"], rows["lo"], rows["gid"] = keys[:, 0], keys[:, 1], gids
    return rows


def exact_pairs(task_dirs: list[Path], partition: int, name: str = "exact") -> np.ndarray:
    """(duplicate gid, survivor gid) for every row whose hash repeats an earlier one's, from the
    tasks' NAME-PPP.npy: text hashes (exact) or id hashes (ids, see data_prep/ids.py)."""
    rows = _load_partition(task_dirs, f"{name}-{partition:03d}.npy", EXACT_DTYPE)
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
    return out[np.argsort(out["gid"])]  # gids are unique: a record has one hash


class SignatureStore:
    """Random access to any document's signature and text through memory-mapped per-task files
    (gids.npy, sigs.npy, docs.arrow): what a process holds is the page cache's business, not its
    heap. At most OPEN_TASKS tasks' maps are kept (each holds a file descriptor)."""

    OPEN_TASKS = 256

    def __init__(self, prepare_dir: Path):
        self.dir = prepare_dir
        self._maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._docs: OrderedDict[int, tuple[list, np.ndarray]] = OrderedDict()

    def _cached(self, cache: OrderedDict, t: int, load):
        if t in cache:
            cache.move_to_end(t)
        else:
            cache[t] = load(self.dir / f"task-{t:05d}")
            if len(cache) > self.OPEN_TASKS:
                cache.popitem(last=False)
        return cache[t]

    def _rows(self, gids: np.ndarray):
        """(task's maps, positions in that task, selection mask) for each task among gids."""
        tasks = (gids >> np.uint64(32)).astype(np.int64)
        for t in np.unique(tasks):
            m = self._cached(self._maps, int(t), lambda d: (np.load(d / "gids.npy", mmap_mode="r"),
                                                              np.load(d / "sigs.npy", mmap_mode="r")))
            sel = tasks == t
            # gids.npy is sorted (documents are appended in input order): row = its position.
            yield int(t), m, np.searchsorted(m[0], gids[sel]), sel

    def get(self, gids: np.ndarray) -> np.ndarray:
        out = None
        for _, m, pos, sel in self._rows(gids):
            rows = m[1][pos]
            if out is None:
                out = np.empty((len(gids), rows.shape[1]), dtype=rows.dtype)
            out[sel] = rows
        return out

    def texts(self, gids: np.ndarray) -> list[str]:
        out: list = [None] * len(gids)
        for t, _, pos, sel in self._rows(gids):
            batches, starts = self._cached(self._docs, t, _text_batches)
            b = np.searchsorted(starts, pos, side="right") - 1
            for i, bi, p in zip(np.flatnonzero(sel), b, pos):
                out[i] = batches[bi][int(p - starts[bi])].as_py()
        return out


def _text_batches(task_dir: Path) -> tuple[list, np.ndarray]:
    import pyarrow as pa

    batches = [b.column("text") for b in pa.ipc.open_stream(pa.memory_map(str(task_dir / "docs.arrow")))]
    return batches, np.cumsum([0] + [len(b) for b in batches])


def shingle_sets(texts: list[str], ngram: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted (the sets exact Jaccard is computed on)."""
    h, off = shingle_hashes(texts, ngram)
    return [np.unique(h[off[i] : off[i + 1]]) for i in range(len(texts))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def is_near_duplicate(a: np.ndarray, b: np.ndarray, threshold: float, min_shingles: int) -> bool:
    """Whether two documents' shingle sets (shingle_sets) make them near duplicates: exact
    Jaccard >= threshold, and where the smaller set has fewer than min_shingles shingles,
    the same set (Jaccard 1: the same words in the same order, up to case and punctuation).

    Why a size rule: the banding's chance of pairing two documents depends on their Jaccard
    alone (a 4-shingle pair at 0.6 collides as often as a 4,000-shingle one), and the check
    is exact, so neither misjudges a short pair's Jaccard. What changes with size is what a
    given Jaccard says. One word replaced in the middle of an S-shingle document removes n
    shingles from the intersection and adds n to the union: J = (S - n) / (S + n), which
    reaches the threshold t only from S = n(1+t)/(1-t) on (15 for 5-grams at 0.5, i.e. 19
    words; config.MinHashConfig.min_shingles). A word changed in the first or last n - 1
    words costs fewer shingles (one at the very end: J = (S - 1) / (S + 1)), so below that
    size the threshold passes only pairs whose differences sit at their ends (or one inserted
    word): how two different statements that share a phrase look. "Return true if the
    variable is odd." / "... is even." (one-line docstrings, 5-gram Jaccard 0.5), "You are in
    a maze of little twisting passages, all alike." / "... all different." (fortunes, 0.75).
    At 2-6% of the words, an edited copy of a text under 19 words has one changed word at
    most, and in a text that short one word is often the one that carries its meaning
    (odd/even). The rule gives up those copies, and the short variants that differ by a label
    or an attribution at one end (a quotation with and without "-- Walt West");
    bench/near_dedup.py --short-texts --without-size-rule counts both kinds on real short texts.
    """
    j = jaccard(a, b)
    return j >= threshold and (min(len(a), len(b)) >= min_shingles or j == 1.0)


# Candidates whose signature estimate is this far below the threshold are not worth the exact
# check: with 112 permutations the estimate's standard deviation is at most 0.047, so 0.2 is
# over four of them.
ESTIMATE_MARGIN = 0.2
# Shingle sets kept between buckets of a partition (a document is usually a candidate in
# several bands): bounds the job's memory at ~SHINGLE_CACHE x a document's shingles x 8 bytes.
SHINGLE_CACHE = 20_000


def near_pairs(task_dirs: list[Path], partition: int, store: SignatureStore, threshold: float, ngram: int,
               min_shingles: int, max_checks: int = 8) -> np.ndarray:
    """Verified near-duplicate edges (earlier gid, later gid) from the band keys of one partition.

    Documents sharing a band key are candidates. Each member of a bucket is checked against the
    bucket's first max_checks members (its smallest gids: the copies most likely to survive),
    and an edge is kept only where the two documents' exact shingle sets pass
    is_near_duplicate. Exact, not estimated: a pair just below the threshold is never an edge,
    and the merge relies on every edge it uses being a true one.
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
        edges.update(p for p in todo if is_near_duplicate(shingles[p[0]], shingles[p[1]], threshold, min_shingles))
    out = np.array(sorted(edges), dtype=np.uint64).reshape(-1, 2)
    res = np.empty(len(out), dtype=PAIR_DTYPE)
    res["survivor"], res["gid"] = out[:, 0], out[:, 1]
    return res


# ---- the merge: streams of sorted rows, state in memory-mapped files ----

# Rows a merge step holds at once, over all its inputs (MERGE_ROWS x 16-25 bytes, twice while
# sorting a block); more only while one gid alone has more rows than that.
MERGE_ROWS = 1 << 20


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort([rows[f] for f in reversed(rows.dtype.names)])]


def merge_sorted(arrays: list[np.ndarray], budget: int | None = None):
    """The rows of several arrays (memory maps), each sorted by its fields in order (gid first),
    as a sequence of blocks in one sorted order. All rows of a gid come in the same block.

    Each input is read a block at a time; a row is emitted once no input can still hold a
    smaller gid, i.e. below the smallest last gid of the blocks whose input goes on.
    """
    arrays = [a for a in arrays if len(a)]
    width = [max(1, (budget or MERGE_ROWS) // max(1, len(arrays)))] * len(arrays)
    pos = [0] * len(arrays)
    while True:
        live = [i for i in range(len(arrays)) if pos[i] < len(arrays[i])]
        if not live:
            return
        blocks = {i: np.asarray(arrays[i][pos[i] : pos[i] + width[i]]) for i in live}
        open_ = [i for i in live if pos[i] + len(blocks[i]) < len(arrays[i])]
        take = {i: len(blocks[i]) for i in live}
        if open_:
            frontier = min(blocks[i]["gid"][-1] for i in open_)
            take = {i: int(np.searchsorted(blocks[i]["gid"], frontier, side="left")) for i in live}
            if not any(take.values()):  # one gid fills a whole block: read further
                for i in open_:
                    if blocks[i]["gid"][0] == frontier:
                        width[i] *= 2
                continue
        out = np.concatenate([blocks[i][: take[i]] for i in live])
        for i in live:
            pos[i] += take[i]
        yield _sorted_rows(out)


def _column_lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, value) for each query in the sorted keys column (a memory map: a binary search
    reads a few of its pages)."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=values.dtype)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = keys[pos] == query
    return found, np.asarray(values[pos])


def representatives(gids: np.ndarray, exact_gid: np.ndarray, exact_survivor: np.ndarray) -> np.ndarray:
    """Each gid's exact-group representative (its group's first copy; itself if it has none)."""
    found, rep = _column_lookup(exact_gid, exact_survivor, gids)
    return np.where(found, rep, gids)


def representative_edges(pairs: np.ndarray, exact_gid: np.ndarray, exact_survivor: np.ndarray) -> np.ndarray:
    """Near edges moved onto their exact groups' representatives: (later, earlier) as (gid,
    survivor), sorted, without repeats or edges inside one group. What the merge reads."""
    a = representatives(pairs["survivor"], exact_gid, exact_survivor)
    b = representatives(pairs["gid"], exact_gid, exact_survivor)
    keep = a != b
    out = np.empty(int(keep.sum()), dtype=PAIR_DTYPE)
    out["gid"], out["survivor"] = np.maximum(a, b)[keep], np.minimum(a, b)[keep]
    return np.unique(out)  # sorts by gid, then survivor


class Bitmap:
    """One bit per document, in a file: bit (offset of the gid's task + ordinal). `sizes[t]` is
    the number of gids task t can have (its input records)."""

    def __init__(self, sizes: np.ndarray, path: Path):
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.uint64)]).astype(np.uint64)
        nbytes = max(1, (int(self.offsets[-1]) + 7) // 8)
        # A new memory map is a sparse file of zeros: nothing is written until a bit is set.
        self.bits = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(nbytes,))

    def _index(self, gids: np.ndarray) -> np.ndarray:
        gids = np.asarray(gids, dtype=np.uint64)
        return self.offsets[(gids >> np.uint64(32)).astype(np.int64)] + (gids & np.uint64(0xFFFFFFFF))

    def get(self, gids: np.ndarray) -> np.ndarray:
        i = self._index(gids)
        return ((self.bits[(i >> np.uint64(3)).astype(np.int64)] >> (i & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)

    def set(self, gids: np.ndarray) -> None:
        i = self._index(gids)
        np.bitwise_or.at(self.bits, (i >> np.uint64(3)).astype(np.int64), (1 << (i & np.uint64(7))).astype(np.uint8))


def merge_to(work: Path, exact_gid: np.ndarray, exact_survivor: np.ndarray, near: list[np.ndarray],
             sizes: np.ndarray, out: Path, survivors: Bitmap | None = None) -> None:
    """Survivors and removals from the exact pairs (sorted by gid) and the near edges of each
    partition (representative_edges), written to `out` as REMOVED_DTYPE rows sorted by gid.
    `work` holds the intermediate files. A Bitmap `survivors` gets a bit for every survivor named.

    Exact groups first: each keeps its smallest gid. Near edges join representatives of exact
    groups, and documents are decided in gid order, never transitively: a document is removed
    only as a duplicate of a survivor it has a verified edge with, and a survivor is never
    removed. So A~B and B~C with A and C far apart removes B (copy of A) and keeps C:
    union-find would have removed C as a "copy" of A. A removed document always names a
    document that is kept: an exact copy of a document that is itself near-removed names that
    document's survivor (kind near).
    """
    near_removed = Bitmap(sizes, work / "near-removed.bits")
    decided = NpyAppender(work / "near-of.npy", REMOVED_DTYPE)
    decided_gid = NpyAppender(work / "near-of-gid.npy", np.uint64)
    last = None  # the last gid decided removed: its other edges change nothing
    for block in merge_sorted(near):
        # All rows of a gid are in one block, its candidates ascending; every gid below the
        # block is decided, and a candidate decided within the block is in `now`.
        gone = near_removed.get(block["survivor"]).tolist()
        now: dict[int, int] = {}
        for doc, cand, g in zip(block["gid"].tolist(), block["survivor"].tolist(), gone):
            if doc != last and not g and cand not in now:
                now[doc] = cand  # the smallest candidate that is kept
                last = doc
        rows = np.empty(len(now), dtype=REMOVED_DTYPE)
        rows["gid"], rows["kind"], rows["survivor"] = list(now), KIND_NEAR, list(now.values())
        near_removed.set(rows["gid"])
        decided.append(rows)
        decided_gid.append(rows["gid"])
    decided.close(create=True)
    decided_gid.close(create=True)
    near_of = np.load(work / "near-of.npy", mmap_mode="r")
    near_of_gid = np.load(work / "near-of-gid.npy", mmap_mode="r")

    # Exact copies name their representative, or its survivor where it was near-removed.
    resolved = NpyAppender(work / "exact-resolved.npy", REMOVED_DTYPE)
    for s in range(0, len(exact_gid), MERGE_ROWS):
        g, r = np.asarray(exact_gid[s : s + MERGE_ROWS]), np.asarray(exact_survivor[s : s + MERGE_ROWS])
        rows = np.empty(len(g), dtype=REMOVED_DTYPE)
        rows["gid"], rows["kind"], rows["survivor"] = g, KIND_EXACT, r
        moved = near_removed.get(r)
        if moved.any():
            _, pos = _column_lookup(near_of_gid, np.arange(len(near_of_gid)), r[moved])
            rows["kind"][moved], rows["survivor"][moved] = KIND_NEAR, near_of["survivor"][pos]
        resolved.append(rows)
    resolved.close(create=True)

    result = NpyAppender(tmp := out.with_name(f".{out.name}.tmp{os.getpid()}"), REMOVED_DTYPE)
    for block in merge_sorted([np.load(work / "exact-resolved.npy", mmap_mode="r"), near_of]):
        result.append(block)
        if survivors is not None:
            survivors.set(block["survivor"])
    result.close(create=True)
    os.replace(tmp, out)


def merge(exact: list[np.ndarray], near: list[np.ndarray]) -> np.ndarray:
    """merge_to on arrays in memory (each exact pair list and near edge list in any order):
    the removed rows, sorted by gid."""
    import tempfile

    ex = np.concatenate(exact) if exact else np.empty(0, dtype=PAIR_DTYPE)
    ex = ex[np.argsort(ex["gid"])]
    edges = [representative_edges(n, ex["gid"], ex["survivor"]) for n in near]
    gids = np.concatenate([ex["gid"], ex["survivor"], np.zeros(1, np.uint64)] + [e[f] for e in edges for f in ("gid", "survivor")])
    tasks = (gids >> np.uint64(32)).astype(np.int64)
    sizes = np.zeros(tasks.max() + 1, dtype=np.uint64)
    np.maximum.at(sizes, tasks, (gids & np.uint64(0xFFFFFFFF)) + np.uint64(1))
    with tempfile.TemporaryDirectory() as d:
        merge_to(Path(d), np.ascontiguousarray(ex["gid"]), np.ascontiguousarray(ex["survivor"]), edges, sizes,
                 Path(d) / "removed.npy")
        return np.load(Path(d) / "removed.npy")


class SurvivorIds:
    """The document id of each survivor, found in one pass over the prepare tasks in order and
    looked up by binary search over memory maps (tokenize names each duplicate's survivor)."""

    def __init__(self, path: Path):
        self.path = path
        self._maps = None

    @staticmethod
    def write(path: Path, task_dirs: list[Path], survivors: Bitmap) -> None:
        with staged_dir(path) as tmp:
            gid_out, off_out = NpyAppender(tmp / "gid.npy", np.uint64), NpyAppender(tmp / "offsets.npy", np.uint64)
            off_out.append(np.zeros(1, dtype=np.uint64))
            end = 0
            with open(tmp / "ids.bin", "wb") as blob:
                for d in task_dirs:
                    for gids, ids in gids_and_ids(d):
                        hit = np.flatnonzero(survivors.get(gids))
                        if len(hit) == 0:
                            continue
                        data = [ids[int(i)].as_py().encode("utf-8", "surrogatepass") for i in hit]
                        blob.write(b"".join(data))
                        gid_out.append(gids[hit])
                        off_out.append(end + np.cumsum([len(x) for x in data], dtype=np.uint64))
                        end += sum(len(x) for x in data)
            gid_out.close(create=True)
            off_out.close(create=True)

    def __call__(self, gids: list[int]) -> dict[int, str]:
        if self._maps is None:
            self._maps = (np.load(self.path / "gid.npy", mmap_mode="r"), np.load(self.path / "offsets.npy", mmap_mode="r"),
                          np.memmap(self.path / "ids.bin", dtype=np.uint8, mode="r") if (self.path / "ids.bin").stat().st_size else b"")
        keys, offsets, blob = self._maps
        q = np.array(sorted(set(gids)), dtype=np.uint64)
        pos = np.searchsorted(keys, q)
        return {int(g): bytes(blob[int(offsets[p]) : int(offsets[p + 1])]).decode("utf-8", "surrogatepass") for g, p in zip(q, pos)}


def gids_and_ids(task_dir: Path):
    """(gids, id column) of each batch of a task's docs.arrow; the text column is never read."""
    import pyarrow as pa

    for b in pa.ipc.open_stream(pa.memory_map(str(task_dir / "docs.arrow"))):
        yield b.column("gid").to_numpy(), b.column("id")
