"""MinHash signatures and LSH band keys, vectorised with numpy over a batch of documents.

Shingling is the usual bottleneck (datatrove tokenises words with a Python loop per
document). Here a whole batch is one byte buffer: word boundaries come from a byte lookup
table, word hashes from a prefix sum of a polynomial hash (base P mod 2^64, so a word's hash
is a difference of two prefix sums times a power of P), n-gram hashes from n shifted slices.
No Python code runs per word.

The signature loop is a small numba kernel: a numpy version ([shingles, permutations]
matrices) ran at ~6 MB/s against rensa's ~90-150 MB/s on the same shingles; the kernel runs
at ~400 MB/s (bench/prep_throughput.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

P = np.uint64(0x100000001B3)  # odd (FNV-64 prime), so invertible mod 2^64
P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
Q = np.uint64(0x9E3779B97F4A7C15)  # base for combining word hashes into n-gram hashes
EMPTY = np.uint32(0xFFFFFFFF)
SHINGLE_CHARS = 1 << 18  # characters shingled at once (~11 MB of heap): see MinHasher.__call__

_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
# ASCII punctuation becomes a space before shingling: "end." and "end" are the same word.
_PUNCT = bytes.maketrans(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", b" " * 32)

_pow_cache: dict[str, np.ndarray] = {}


def _powers(name: str, base: np.uint64, n: int) -> np.ndarray:
    arr = _pow_cache.get(name)
    if arr is None or len(arr) < n:
        # Sized by the largest batch so far (plus 1/8: batches vary a little), not doubled:
        # the cache is part of a prepare task's memory, which its batch bounds.
        _pow_cache.pop(name, None)
        del arr
        arr = np.empty(max(n + n // 8, 1 << 16), dtype=np.uint64)
        arr[0] = 1
        arr[1:] = base
        with np.errstate(over="ignore"):
            np.cumprod(arr, dtype=np.uint64, out=arr)
        _pow_cache[name] = arr
    return arr[:n]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the word (polynomial hashes don't)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def normalise_for_shingles(text: str) -> bytes:
    return text.lower().encode("utf-8", "surrogatepass").translate(_PUNCT)


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of each text.

    Returns (hashes uint64 [total], offsets int64 [len(texts)+1]); text i's shingles are
    hashes[offsets[i]:offsets[i+1]]. A text with fewer than `ngram` words has none.
    """
    parts = [normalise_for_shingles(t) for t in texts]
    starts = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) + 1 for p in parts], out=starts[1:])
    buf = np.frombuffer(b"\n".join(parts) + b"\n", dtype=np.uint8)
    space = _SPACE[buf]
    prev_space = np.empty_like(space)
    prev_space[0] = True
    prev_space[1:] = space[:-1]
    wstart = np.flatnonzero(~space & prev_space)
    next_space = np.empty_like(space)
    next_space[-1] = True
    next_space[:-1] = space[1:]
    wend = np.flatnonzero(~space & next_space)  # inclusive end of each word
    with np.errstate(over="ignore"):
        pre = np.cumsum(buf.astype(np.uint64) * _powers("pinv", P_INV, len(buf)), dtype=np.uint64)
        before = np.where(wstart > 0, pre[np.maximum(wstart - 1, 0)], np.uint64(0))
        words = mix64((pre[wend] - before) * _powers("p", P, len(buf))[wend] + (wend - wstart).astype(np.uint64))
        doc = np.searchsorted(starts, wstart, side="right") - 1
        m = len(words) - ngram + 1
        if m <= 0:
            return np.empty(0, dtype=np.uint64), np.zeros(len(texts) + 1, dtype=np.int64)
        h = words[:m].copy()
        for t in range(1, ngram):
            h = h * Q + words[t : t + m]
        valid = doc[:m] == doc[ngram - 1 :]
        hashes = mix64(h[valid])
    counts = np.bincount(doc[:m][valid], minlength=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return hashes, offsets


@njit(cache=True, nogil=True)
def _signatures(x: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    # One pass over the shingles of each document; the inner loop over permutations is
    # what LLVM vectorises (8 uint32 lanes per AVX2 instruction).
    for d in range(offsets.shape[0] - 1):
        row = out[d]
        for j in range(a.shape[0]):
            row[j] = np.uint32(0xFFFFFFFF)
        for i in range(offsets[d], offsets[d + 1]):
            v = x[i]
            for j in range(a.shape[0]):
                h = np.uint32(a[j] * v + b[j])
                if h < row[j]:
                    row[j] = h


class MinHasher:
    """Permutation j maps a shingle to (a_j * x + b_j) mod 2^32, a_j odd: a bijection of the
    32-bit space, applied to the high half of a well-mixed 64-bit shingle hash. Measured
    against exact Jaccard in tests/data_prep/test_minhash.py (no bias, binomial spread)."""

    def __init__(self, num_perm: int, seed: int = 1):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm = num_perm
        self.a = (rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)

    def signatures(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """uint32 [docs, num_perm]; a document without shingles gets all EMPTY."""
        x = (hashes >> np.uint64(32)).astype(np.uint32)
        out = np.empty((len(offsets) - 1, self.num_perm), dtype=np.uint32)
        _signatures(x, offsets.astype(np.int64), self.a, self.b, out)
        return out

    def __call__(self, texts: list[str], ngram: int) -> np.ndarray:
        # Shingled SHINGLE_CHARS characters at a time: shingling holds ~42 bytes per character
        # (the byte buffer, its masks, prefix sums, word and n-gram hashes), so a whole prepare
        # batch at once would be ~110 MB at BATCH_CHARS' typical fill; a document's signature
        # depends on its own shingles only, so the result is the same.
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(texts):
            j, chars = i + 1, len(texts[i])
            while j < len(texts) and chars + len(texts[j]) <= SHINGLE_CHARS:
                chars += len(texts[j])
                j += 1
            out[i:j] = self.signatures(*shingle_hashes(texts[i:j], ngram))
            i = j
        return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [docs, bands]: one key per band; the band index is mixed in, so equal keys
    mean equal rows in the same band."""
    with np.errstate(over="ignore"):
        s = sigs[:, : bands * rows].astype(np.uint64).reshape(len(sigs), bands, rows)
        k = np.zeros((len(sigs), bands), dtype=np.uint64)
        for r in range(rows):
            k = k * Q + s[:, :, r]
        return mix64(k + np.arange(bands, dtype=np.uint64) * P)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).mean(axis=-1)
