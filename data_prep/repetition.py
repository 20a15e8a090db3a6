"""Gopher's n-gram repetition rules (top n-gram and duplicated n-gram character fractions),
as datatrove 0.10.1 computes them, in one compiled pass per document over 64-bit word hashes
(GopherRepetition in filters.py runs them after the paragraph and line rules)."""
from __future__ import annotations

import numpy as np
from numba import njit


def ngram_rules(words: list[str], top_n_grams, dup_n_grams, text_chars: int) -> str | None:
    """Gopher's n-gram repetition rules; the first that fails names the removal.

    top n-gram: characters of the most frequent n-gram (words joined by spaces) times its
    count; ties go to the n-gram seen first, as Counter.most_common does.
    duplicated n-grams: a left-to-right scan that counts the characters of an n-gram seen
    before and then jumps past it, so overlapping repeats are counted once (datatrove's
    find_all_duplicate).

    Words are compared by Python's 64-bit string hash (one C-speed pass), n-grams by 64-bit
    hashes built from them; equal hashes stand in for equal words and n-grams (a collision
    inside one document is not a practical concern). `_ngram_counts`, compiled, finds the
    n-grams; their characters are summed here, from the few words they start at, or from
    cumulative word lengths where they are many."""
    top, dup = dict(top_n_grams), dict(dup_n_grams)
    if not words or not (top or dup):
        return None
    n = len(words)
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=n).view(np.uint64)
    kind = np.zeros(max(list(top) + list(dup)) + 1, dtype=np.int8)
    kind[list(dup)] = _DUP
    kind[list(top)] = _TOP
    best, start, counted, offsets = _ngram_counts(hashes, kind)
    chars = _chars_at(words)
    for k, frac in top_n_grams:
        if k <= n and (chars(start[k : k + 1], k) + k - 1) * best[k] / text_chars > frac:
            return f"top_{k}_gram"
    for k, frac in dup_n_grams:
        if k <= n and chars(counted[offsets[k] : offsets[k + 1]], k) / text_chars > frac:
            return f"dup_{k}_gram"
    return None


def _chars_at(words: list[str]):
    """chars(starts, k): the characters of the k words from each of `starts` (an array; no
    spaces). A few starts are summed in Python; many from cumulative word lengths, computed
    once."""
    cum = None

    def chars(starts: np.ndarray, k: int) -> int:
        nonlocal cum
        if len(starts) * 32 < len(words):
            # (the k words' joined length: one C-level pass, no Python frame per start)
            return sum(map(len, map("".join, map(words.__getitem__, map(slice, starts.tolist(), (starts + k).tolist())))))
        if cum is None:
            cum = np.concatenate(([0], np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))))
        return int((cum[starts + k] - cum[starts]).sum())

    return chars


_TOP, _DUP = 1, 2


@njit(cache=True, nogil=True)
def _ngram_counts(word_hashes, kind):
    """For each n up to len(kind) - 1 (and the document's length): where kind[n] is _TOP, the
    count of the most frequent n-gram and its first position (best[n], start[n]); where it is
    _DUP, the positions find_all_duplicate counts, counted[offsets[n]:offsets[n + 1]].

    Cost: per n only the positions where an n-gram can repeat: an n-gram that occurs twice is
    made of two (n-1)-grams that do, so the positions of n are those where two repeating
    (n-1)-gram positions meet (on real text a fraction of the document from n = 2 or 3 on),
    grouped by an open-addressing hash table."""
    n = len(word_hashes)
    max_k = len(kind) - 1
    best = np.ones(max_k + 1, dtype=np.int64)
    start = np.zeros(max_k + 1, dtype=np.int64)
    offsets = np.zeros(max_k + 2, dtype=np.int64)
    counted = np.empty(0, dtype=np.int64)
    ids = _mix64(word_hashes)
    h = ids.copy()
    cand = np.arange(n)
    mult = np.uint64(0x9E3779B97F4A7C15)
    for k in range(1, max_k + 1):
        offsets[k + 1] = offsets[k]
        m = n - k + 1
        if m <= 0:
            continue
        if k > 1:
            h = h[:m] * mult + ids[k - 1 : k - 1 + m]
            cand = _meeting(cand)
        group, counts = _groups(h, cand)
        many = counts[group] > 1
        rep, rep_group = cand[many], group[many]
        if kind[k] == _TOP:
            if len(rep):  # (else every n-gram occurs once: the first is the most frequent)
                best[k] = counts[rep_group].max()
                start[k] = rep[np.argmax(counts[rep_group] == best[k])]
        elif kind[k] == _DUP:
            found = _scan_duplicates(rep, rep_group, len(counts), k)
            counted = np.concatenate((counted, found))
            offsets[k + 1] = offsets[k] + len(found)
        cand = rep
    return best, start, counted, offsets


@njit(cache=True, nogil=True)
def _meeting(rep):
    """Positions i with both i and i + 1 in rep (sorted): where an n-gram can repeat."""
    out = np.empty(max(len(rep) - 1, 0), dtype=np.int64)
    c = 0
    for j in range(len(rep) - 1):
        if rep[j + 1] == rep[j] + 1:
            out[c] = rep[j]
            c += 1
    return out[:c]


@njit(cache=True, nogil=True)
def _groups(h, cand):
    """Each candidate position's group (equal hashes, equal numbers) and the groups' sizes."""
    size = 1
    while size < 2 * len(cand):
        size *= 2
    keys = np.empty(size, dtype=np.uint64)
    slot_group = np.full(size, -1, dtype=np.int64)
    group = np.empty(len(cand), dtype=np.int64)
    counts = np.zeros(len(cand), dtype=np.int64)
    n_groups = 0
    mask = size - 1
    for j in range(len(cand)):
        key = h[cand[j]]
        s = np.int64(key & np.uint64(mask))
        while slot_group[s] >= 0 and keys[s] != key:
            s = (s + 1) & mask
        if slot_group[s] < 0:
            keys[s] = key
            slot_group[s] = n_groups
            n_groups += 1
        g = slot_group[s]
        group[j] = g
        counts[g] += 1
    return group, counts[:n_groups]


@njit(cache=True, nogil=True)
def _scan_duplicates(positions, group, n_groups, k):
    """datatrove's find_all_duplicate over the positions of repeating n-grams, in order: the
    positions it counts. An n-gram seen before is counted and the scan jumps past it (the
    positions inside are not looked at, not even added to what was seen); n-grams that occur
    once are never seen again, so they are not visited."""
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


@njit(cache=True, nogil=True)
def _mix64(x):
    """splitmix64's finaliser: word hashes become well-spread 64-bit values, so that the
    n-gram hashes built from them do not collide."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# Compiled (or loaded from numba's cache) at import, not in the first document's time.
ngram_rules(["a", "b", "a", "b", "a", "b"], [(2, 0.2)], [(5, 0.15)], 6)
