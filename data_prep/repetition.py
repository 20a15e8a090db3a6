"""Gopher's n-gram repetition rules (top n-gram and duplicated n-gram character fractions),
as datatrove 0.10.1 computes them, over numpy arrays of word ids (GopherRepetition in
filters.py runs them after the paragraph and line rules)."""
from __future__ import annotations

import numpy as np
from numba import njit


def ngram_rules(words: list[str], top_n_grams, dup_n_grams, text_chars: int) -> str | None:
    """Gopher's n-gram repetition rules. n-grams are compared by 64-bit hashes built over word
    ids with shifted numpy slices (equal hashes stand in for equal n-grams; a collision inside
    one document is not a practical concern).

    top n-gram: characters of the most frequent n-gram (words joined by spaces) times its
    count; ties go to the n-gram seen first, as Counter.most_common does.
    duplicated n-grams: a left-to-right scan that counts the characters of an n-gram seen
    before and then jumps past it, so overlapping repeats are counted once (datatrove's
    find_all_duplicate). Only n-grams that occur more than once can be found in `seen`, so
    the scan visits their positions alone.

    Cost: one dict pass over the words (a word's id is the position of its first occurrence,
    exact), then per n only the positions where an n-gram can repeat: an n-gram that occurs
    twice is made of two (n-1)-grams that do, so each n sorts the hashes of those positions
    alone (on real text a fraction of the document from n = 2 or 3 on)."""
    n = len(words)
    first: dict[str, int] = {}
    ids = np.fromiter(map(first.setdefault, words, range(n)), dtype=np.int64, count=n)
    # k -> the positions, in order, whose k-gram occurs twice or more
    repeats = {1: np.flatnonzero(np.bincount(ids, minlength=n)[ids] > 1)}
    ids = _mix64(ids.view(np.uint64))
    mult = np.uint64(0x9E3779B97F4A7C15)
    hashes: dict[int, np.ndarray] = {}
    h = ids
    with np.errstate(over="ignore"):
        for k in range(2, max(list(dict(top_n_grams)) + list(dict(dup_n_grams))) + 1):
            m = n - k + 1
            if m <= 0:
                break
            h = h[:m] * mult + ids[k - 1 : k - 1 + m]
            hashes[k] = h
    chars = _chars_at(words)
    for k, frac in top_n_grams:
        if k not in hashes:
            continue
        repeats[k], group, counts = _repeated(hashes[k], repeats.get(k - 1))
        best = int(counts.max()) if len(group) else 1
        # The most frequent n-gram's first position; every n-gram occurs once when best is 1.
        start = int(repeats[k][counts[group] == best][0]) if best > 1 else 0
        if (sum(map(len, words[start : start + k])) + k - 1) * best / text_chars > frac:
            return f"top_{k}_gram"
    for k, frac in dup_n_grams:
        if k not in hashes:
            continue
        repeats[k], group, counts = _repeated(hashes[k], repeats.get(k - 1))
        counted = _scan_duplicates(repeats[k], group, len(counts), k) if len(group) else repeats[k]
        if chars(counted, k) / text_chars > frac:
            return f"dup_{k}_gram"
    return None


@njit(cache=True, nogil=True)
def _scan_duplicates(positions: np.ndarray, group: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """datatrove's find_all_duplicate over the positions of repeating n-grams, in order: the
    positions it counts. An n-gram seen before is counted and the scan jumps past it (the
    positions inside are not looked at, not even added to what was seen)."""
    seen = np.zeros(n_groups, dtype=np.bool_)
    out = np.empty(len(positions), dtype=np.int64)
    counted = nxt = 0
    for j in range(len(positions)):
        i = positions[j]
        if i < nxt:
            continue
        if seen[group[j]]:
            out[counted] = i
            counted += 1
            nxt = i + k
        else:
            seen[group[j]] = True
    return out[:counted]


def _chars_at(words: list[str]):
    """chars(starts, k): the characters of the k words from each of `starts` (an array; no
    spaces). A few starts are summed in Python; many from cumulative word lengths, computed
    once."""
    cum = None

    def chars(starts: np.ndarray, k: int) -> int:
        nonlocal cum
        if len(starts) * 32 < len(words):
            return sum(sum(map(len, words[i : i + k])) for i in starts.tolist())
        if cum is None:
            cum = np.concatenate(([0], np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))))
        return int((cum[starts + k] - cum[starts]).sum())

    return chars


def _mix64(x):
    """splitmix64's finaliser over a uint64 array: word ids (small integers) become
    well-spread 64-bit values, so that the n-gram hashes built from them do not collide."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) ^ ((x + np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _repeated(h, prev):
    """The positions, in order, whose n-gram (hashes h) occurs more than once; each one's
    group (equal n-grams, equal numbers); the groups' sizes (by group).
    prev: the same positions for (n-1)-grams, or None: only where two repeating (n-1)-grams
    meet can an n-gram repeat, so only those positions are grouped: by a sort, or in Python
    where they are few (numpy's per-call cost would dominate)."""
    if prev is None:
        cand = np.arange(len(h))
    else:
        cand = prev[:-1][prev[1:] - prev[:-1] == 1]
    if len(cand) <= _FEW:
        values = h[cand].tolist()
        ids: dict[int, int] = {}
        group = list(map(ids.setdefault, values, range(len(values))))  # a group: its first index
        counts = [0] * len(group)
        for g in group:
            counts[g] += 1
        many = np.array([counts[g] > 1 for g in group], dtype=bool)
        return cand[many], np.array(group, dtype=np.int64)[many], np.array(counts, dtype=np.int64)
    values = h[cand]
    order = np.argsort(values, kind="quicksort")  # unstable is enough: groups, not ranks
    s = values[order]
    sorted_group = np.concatenate(([0], np.cumsum(s[1:] != s[:-1])))
    counts = np.bincount(sorted_group)
    group = np.empty(len(cand), dtype=np.int64)
    group[order] = sorted_group
    many = counts[group] > 1
    return cand[many], group[many], counts


# Below this many candidate positions, _repeated groups them in Python.
_FEW = 48


# Compiled (or loaded from numba's cache) at import, not in the first document's time.
_scan_duplicates(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), 1, 2)
