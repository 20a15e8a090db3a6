"""Training samples from the token-shard manifest (`docs/formats.md`).

Documents of a split are concatenated in manifest order into one token stream (each ends with
EOS, so windows cross document boundaries at EOS, as Megatron's GPTDataset packs them) and cut
into windows of seq_len + 1 tokens: inputs are the first seq_len, labels the last seq_len.

Order is a function of the seed and the global sample position only, computed by `BlendOrder`
for each position when it is read. A data-parallel rank reads only the positions of its
micro-batches, so the samples of an optimizer step do not depend on how many ranks share it,
and resuming from a consumed-sample count continues the same order on any world size.

Position p of the run is found in two closed-form steps, so nothing per sample is stored:

1. Blend. Sources are mixed by weight (`data.mixture`; default: in proportion to their
   tokens). A blend epoch has N = sum of the sources' sample counts positions, of which source
   s fills c_s (`blend_counts`): its draw k at time (2k + 1) / (2 c_s) of the epoch, the draws
   of all sources merged by time, ties to the lower source id; p is position p mod N of epoch
   p // N. How many draws precede draw k of source s is one floor division per source, exact
   in integers, and a draw at position i has time within S/(2N) of i/N (S sources), so a
   binary search over at most S + 1 candidate draws per source finds position i.
2. Permutation. A source's draws continue across blend epochs (draw g = epoch · c_s + k) and
   walk through its samples in a seeded permutation per pass (g // n_s for n_s samples), so an
   up-weighted source repeats a sample only after it has used them all. The permutation is a
   keyed Feistel network (`feistel_permute`: 6 rounds of splitmix64, keys from seed, source
   and pass) on the smallest number of bits that covers n_s, cycle-walked into [0, n_s): a
   bijection by construction, in O(1) memory, fewer than 2 walks per value on average.
   A materialised `rng.permutation` would cost 8 bytes per sample per source in every rank
   (4 GB for a 1T-token corpus at seq_len 2048); no library offers a vectorised keyed
   permutation of an arbitrary range (format-preserving-encryption packages work on digit
   strings, one value at a time).

Memory per rank for the order: a few hundred bytes per source plus temporaries proportional to
the positions looked up at once, whatever the corpus size or run length (7 kB traced at the
peak of building a 1T-token, 3-source order at seq_len 2048 and looking up 1000 positions);
nothing is written to disk. A lookup costs O(S² log S) integer operations for S sources: about
0.1 ms of CPU for one position of a 3-source mixture in Python integers (what `batch` does
for a micro-batch), about 3 µs a position through `locate_many` on thousands at once.

Tokens. Each source of a split is one `TokenStream`: at open it reads only the shards' IPC
stream metadata and keeps the layout, 16 bytes per record batch (the stream offset of its first
token and the byte offset of its values in the file); a read memory-maps the shards it spans,
at most `OPEN_SHARDS` (16) at once per stream, and touches only the pages it copies.

Memory per rank: the order (a few kB), the manifest (about 1 kB per shard), the layouts (the
only part that grows with the tokens: 16 bytes per record batch held, about 40 bytes of RSS a
batch measured with the open's freed temporaries), and the maps (address space and page
cache, not heap; one file descriptor each: at most 16 per source and split). Data prep writes
one record batch per `ENCODE_BATCH` (1024) documents to each split, so 1T tokens at about
1,000 tokens a document is about 10^6 batches a split: 16 MB held per split, 40 MB of RSS,
where an Arrow array per batch took about 1 kB (1 GB per split) and every shard stayed open
(7,500 shards of 256 MiB: past a `ulimit -n` of 1024). Opening costs about 15 µs of CPU and
one metadata page read per record batch.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc


OPEN_SHARDS = 16  # shard maps a TokenStream keeps open (file descriptors; one stream per source and split)


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizerInfo:
    model_path: Path
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int

    @property
    def directory(self) -> Path:
        return self.model_path.parent


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    split: str
    source: str
    documents: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    dtype: str
    column: str
    tokenizer: TokenizerInfo
    shards: tuple[ShardInfo, ...]
    raw: dict

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest not found (run `python -m data_prep run` first)") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

        def need(d: dict, key: str, where: str, kind=None):
            if key not in d:
                raise ManifestError(f"{path}: {where}{key} is missing")
            if kind is not None and not isinstance(d[key], kind):
                raise ManifestError(f"{path}: {where}{key} should be {kind.__name__}, got {d[key]!r}")
            return d[key]

        if need(raw, "format", "", str) != "arrow-token-shards":
            raise ManifestError(f"{path}: format is {raw['format']!r}, expected 'arrow-token-shards'")
        dtype = need(raw, "dtype", "", str)
        if dtype not in ("uint16", "uint32"):
            raise ManifestError(f"{path}: dtype {dtype!r}, expected uint16 or uint32")
        tok = need(raw, "tokenizer", "", dict)
        tokenizer = TokenizerInfo(
            model_path=(path.parent / need(tok, "model", "tokenizer.", str)).resolve(),
            sha256=need(tok, "sha256", "tokenizer.", str),
            vocab_size=need(tok, "vocab_size", "tokenizer.", int),
            bos_id=need(tok, "bos_id", "tokenizer.", int),
            eos_id=need(tok, "eos_id", "tokenizer.", int),
        )
        shards = []
        for i, s in enumerate(need(raw, "shards", "", list)):
            where = f"shards[{i}]."
            shards.append(ShardInfo(
                path=path.parent / need(s, "path", where, str), split=need(s, "split", where, str),
                source=s.get("source", "default"), documents=need(s, "documents", where, int),
                tokens=need(s, "tokens", where, int), sha256=need(s, "sha256", where, str)))
        return cls(path, dtype, raw.get("column", "input_ids"), tokenizer, tuple(shards), raw)

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


class TokenStream:
    """The concatenated tokens of some shards, read by global token offset.

    Holds the layout only, found at open by reading each shard's IPC stream metadata (the
    record batches' bodies are not read): for each non-empty record batch the stream offset of
    its first token and the byte offset of its values in its shard file, 16 bytes a batch. A
    read maps the shards it spans (`mmap`, so it touches only the pages it copies) and keeps at
    most `max_open` maps, least recently used closed first: each holds a file descriptor, and a
    split of thousands of shards would otherwise pass `ulimit -n`.
    """

    def __init__(self, manifest: Manifest, shards: list[ShardInfo], max_open: int = OPEN_SHARDS):
        if not shards:
            raise ManifestError(f"{manifest.path}: no shards selected")
        self.dtype = np.dtype(manifest.dtype)
        self._paths = [shard.path for shard in shards]
        sizes, offsets, first_batch, batches = [], [], [], 0
        for shard in shards:
            if not shard.path.exists():
                raise ManifestError(f"{manifest.path}: shard {shard.path.name} is listed but missing")
            n, at = shard_layout(shard.path, manifest.column, self.dtype)
            if int(n.sum()) != shard.tokens:
                raise ManifestError(f"{shard.path}: holds {int(n.sum())} tokens but the manifest says {shard.tokens}")
            first_batch.append(batches)
            batches += len(n)
            sizes.append(n)
            offsets.append(at)
        self._starts = np.concatenate([[0], np.cumsum(np.concatenate(sizes))])  # one more than batches
        self._offsets = np.concatenate(offsets)
        self._first_batch = np.array(first_batch, dtype=np.int64)  # shard of batch i: the last ≤ i
        self.num_tokens = int(self._starts[-1])
        self._max_open = max_open
        self._maps: dict[int, mmap.mmap] = {}  # shard index -> map, least recently used first

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            lo = start + filled - int(self._starts[i])
            take = min(length - filled, int(self._starts[i + 1]) - int(self._starts[i]) - lo)
            shard = int(np.searchsorted(self._first_batch, i, side="right")) - 1
            offset = int(self._offsets[i]) + lo * self.dtype.itemsize
            out[filled:filled + take] = np.frombuffer(self._map(shard), self.dtype, take, offset)
            filled += take
            i += 1
        return out

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.pop(shard, None)
        if m is None:
            if len(self._maps) >= self._max_open:
                self._maps.pop(next(iter(self._maps))).close()
            with open(self._paths[shard], "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps[shard] = m  # (re)inserted last: the most recently used
        return m


def shard_layout(path: Path, column: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, byte offset of the first token in the file) of each non-empty record batch of
    a shard, int64 arrays. The stream is read from a memory map, so a batch's buffers are views
    of the file and a buffer's address less the map's is its offset in the file."""
    with pa.memory_map(str(path)) as mm:
        whole = mm.read_buffer()
        reader = pa.ipc.open_stream(whole)
        index = reader.schema.get_field_index(column)
        if index < 0:
            raise ManifestError(f"{path}: no column {column!r}")
        kind = reader.schema.field(index).type
        if not pa.types.is_list(kind) or kind.value_type != pa.from_numpy_dtype(dtype):
            raise ManifestError(f"{path}: column {column!r} is {kind}, "
                                f"expected list<{dtype}> (the manifest's dtype)")
        sizes, offsets = [], []
        for k, batch in enumerate(reader):
            # An array read from IPC starts at offset 0 at every level (the format has no
            # offset field), so the list's tokens are values[o[0]:o[n]] for its offsets o, as
            # `flatten()` would slice them; reading the buffers directly is 3× faster.
            lists = batch.column(index)
            if not len(lists):
                continue
            _, list_offsets, _, values = lists.buffers()
            ends = memoryview(list_offsets).cast("i")
            first, last = ends[0], ends[len(lists)]
            if last == first:
                continue
            at = values.address - whole.address + first * dtype.itemsize
            if not 0 <= at <= whole.size - (last - first) * dtype.itemsize:  # a buffer decompressed elsewhere
                raise ManifestError(f"{path}: record batch {k} is compressed; "
                                    "the loader reads uncompressed IPC streams")
            sizes.append(last - first)
            offsets.append(at)
    return np.array(sizes, dtype=np.int64), np.array(offsets, dtype=np.int64)


class PackedSamples:
    """Windows of seq_len + 1 tokens over a token stream: window j starts at token j · seq_len."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.num_samples = (stream.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ManifestError(f"only {stream.num_tokens} tokens: fewer than one sample of seq_len {seq_len}")

    def window(self, j: int) -> np.ndarray:
        return self.stream.read(j * self.seq_len, self.seq_len + 1)


def micro_batch_positions(first: int, micro: int, rank: int, micro_batch_size: int,
                          data_parallel_size: int) -> range:
    """Global sample positions of one rank's micro-batch `micro` within the optimizer step whose
    first position is `first` (the samples consumed before it).

    A step of global batch G owns positions [first, first + G); its micro-batch m is the slice
    [first + m·B·D, first + (m+1)·B·D), of which rank r reads [r·B, (r+1)·B). G = B·D·accumulation.
    Counting from consumed samples, not from step × G, keeps the order when G changes on resume.
    """
    start = first + micro * micro_batch_size * data_parallel_size + rank * micro_batch_size
    return range(start, start + micro_batch_size)


def blend_counts(sizes: list[int], weights: list[float]) -> np.ndarray:
    """Draws per source in one blend epoch of sum(sizes) positions, proportional to `weights`
    (largest-remainder rounding, so the counts add up exactly)."""
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts


MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, splitmix64's increment
FEISTEL_ROUNDS = 6  # 4 already make a pseudorandom permutation (Luby–Rackoff); 2 more for a cheap round function

# The order's arithmetic takes a Python int (one position: exact, and ~50× faster than numpy on
# a 1-element array) or an array (a micro-batch) alike; these are the only operations that differ.


def _min(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) else min(a, b)


def _max(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) else max(a, b)


def _where(condition, a, b):
    return np.where(condition, a, b) if isinstance(condition, np.ndarray) else a if condition else b


def splitmix64(x):
    """One splitmix64 output for state x (Steele, Lea & Flood 2014): every output bit depends
    on every input bit. For ints and uint64 arrays (which wrap mod 2^64, as the constants assume)."""
    x = (x + GOLDEN64) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


ROUND_CONSTANTS = [splitmix64(r) for r in range(FEISTEL_ROUNDS)]


def feistel_permute(x, n: int, key):
    """Element x of the permutation of [0, n) keyed by `key` (ints, or uint64 arrays of one
    length; 0 ≤ x < n). Each Feistel round is a bijection of [0, 2^b) for b bits, 2^b ≥ n,
    whatever its round function; applying the rounds again to values ≥ n (cycle walking)
    makes a bijection of [0, n), since the walk from a value < n comes back below n before it
    could repeat. 2^b < 2n, so a value needs fewer than 2 walks on average."""
    bits = max(1, (n - 1).bit_length())
    if not isinstance(x, np.ndarray):
        x = _feistel_rounds(x, bits, key)
        while x >= n:
            x = _feistel_rounds(x, bits, key)
        return x
    out, todo = _feistel_rounds(x.astype(np.uint64), bits, key), np.arange(len(x))
    while len(todo := todo[out[todo] >= n]):
        out[todo] = _feistel_rounds(out[todo], bits, key[todo])
    return out


def _feistel_rounds(x, bits: int, key):
    """Rounds of an unbalanced Feistel network on `bits` bits: the low half keys a change of
    the high part, then moves to the top (b odd: the halves differ by a bit; each round is
    still invertible, as its input's low half is its output's top)."""
    low_bits = bits // 2
    high_bits = bits - low_bits
    for constant in ROUND_CONSTANTS:
        low, high = x & ((1 << low_bits) - 1), x >> low_bits
        x = (low << high_bits) | (high ^ (splitmix64(low ^ key ^ constant) & ((1 << high_bits) - 1)))
    return x


class BlendOrder:
    """Which source, and which of its samples, fills each global position of a run (module
    docstring: the blend, the permutation, the memory and time they cost)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, ids: list[int] | None = None):
        """sizes: samples per source; weights: their shares; ids: each source's key for its
        permutations (default its index; `open_split` passes the source's place among all
        sources of the split, so its order does not change when another source is left out)."""
        self.sizes = [int(n) for n in sizes]
        self.counts = [int(c) for c in blend_counts(self.sizes, weights)]
        self.num_samples = sum(self.counts)
        ids = range(len(sizes)) if ids is None else ids
        # Each pass's key is (seed, source id) hashed here, then with the pass number per lookup.
        self._keys = [splitmix64(splitmix64(int(seed) & MASK64) ^ (int(i) & MASK64)) for i in ids]
        self._live = [s for s, c in enumerate(self.counts) if c]
        # The largest product below is c_s · (2i + S) < N · (2N + S): int64 up to N ≈ 2^31
        # samples (4T tokens at seq_len 2048); beyond that arrays of Python ints, slower but exact.
        n, s = self.num_samples, len(self._live)
        self._int = np.int64 if n * (2 * n + s) < 2**63 else object

    def locate(self, position: int) -> tuple[int, int]:
        """(source, sample within that source) at global position `position` ≥ 0."""
        epoch, i = divmod(int(position), self.num_samples)
        s, k = self._blend(i)
        return s, self._sample(s, epoch * self.counts[s] + k)

    def locate_many(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """`locate` for an array of positions: (sources, samples), int64 arrays."""
        p = np.asarray(positions, dtype=np.int64).astype(self._int)
        epoch, i = p // self.num_samples, p % self.num_samples  # (np.divmod has no loop for Python ints)
        source, draw = self._blend(i)
        sample = np.empty(len(i), dtype=np.int64)
        for s in self._live:
            here = source == s
            sample[here] = self._sample(s, (epoch[here] * self.counts[s] + draw[here]).astype(np.uint64))
        return source, sample

    def blend_many(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw of that source) at positions `index` of one blend epoch (0 ≤ index < N)."""
        source, draw = self._blend(np.asarray(index, dtype=np.int64).astype(self._int))
        return source, draw.astype(np.int64)

    def _sample(self, s: int, draw):
        """Sample of source s behind its `draw`-th draw of the run (counted across epochs)."""
        passes, j = divmod(draw, self.sizes[s])
        return feistel_permute(j, self.sizes[s], splitmix64(self._keys[s] ^ passes))

    def _blend(self, i):
        """(source, draw) at position i of a blend epoch; i: an int or an array."""
        source, draw = -1, 0
        for s in self._live:
            k = self._last_draw_not_after(s, i)
            hit = self._ahead(s, k) == i  # draws and positions of the merge correspond one to one
            source, draw = _where(hit, s, source), _where(hit, k, draw)
        return source, draw

    def _ahead(self, s: int, k):
        """How many draws of the merged epoch precede draw k of source s. Draw j of source t
        precedes it when (2j+1)/(2c_t) < (2k+1)/(2c_s), i.e. (2j+1)·c_s < (2k+1)·c_t =: a, or
        ≤ a when t < s (ties go to the lower id): the odd numbers o ≤ (a − [t > s]) // c_s."""
        total = k
        for t in self._live:
            if t != s:
                largest_odd = ((2 * k + 1) * self.counts[t] - int(t > s)) // self.counts[s]
                total = total + _min((largest_odd + 1) // 2, self.counts[t])
        return total

    def _last_draw_not_after(self, s: int, i):
        """The last draw k of source s with `_ahead(s, k)` ≤ i, if the draw at position i is one
        of s's (else a draw of s that `_ahead` will not match). Each source t has between
        c_t·x − ½ and c_t·x + ½ draws before time x, so the draw at position i has a time x with
        |N·x − i| ≤ S/2 and, if it is s's, k = c_s·x − ½ is one of at most S + 1 integers."""
        n, c, width = self.num_samples, self.counts[s], len(self._live)
        lo = _max(-((n - c * (2 * i - width)) // (2 * n)), 0)
        hi = _min((c * (2 * i + width) - n) // (2 * n), c - 1)
        for _ in range(width.bit_length()):  # ceil(log2(S + 1)) halvings of S + 1 candidates
            mid = _max((lo + hi + 1) // 2, lo)
            fits = self._ahead(s, mid) <= i
            lo, hi = _where(fits, mid, lo), _where(fits, hi, mid - 1)
        return _min(lo, c - 1)


class BlendedSamples:
    """Several sources' samples in fixed proportions; `at(position)` for any position ≥ 0."""

    def __init__(self, sources: list[PackedSamples], weights: list[float], seed: int, ids: list[int] | None = None):
        self.sources = sources
        self.seq_len = sources[0].seq_len
        self.order = BlendOrder([s.num_samples for s in sources], weights, seed, ids)
        self.num_samples = self.order.num_samples

    def at(self, position: int) -> np.ndarray:
        s, j = self.order.locate(position)
        return self.sources[s].window(j)

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray]:
        # One position at a time: for a micro-batch's few positions Python integers beat numpy's
        # per-call overhead (`locate_many` pays off from a few hundred positions).
        rows = np.stack([self.at(p) for p in positions])
        return rows[:, :-1], rows[:, 1:]


def open_split(manifest: Manifest, split: str, seq_len: int, seed: int,
               mixture: dict[str, float] | None = None) -> BlendedSamples:
    """The samples of `split`, sources mixed by `mixture` (source → weight; empty or None: in
    proportion to their tokens, i.e. every sample once per epoch)."""
    shards = manifest.split_shards(split)
    names = sorted({s.source for s in shards})
    if not names:
        raise ManifestError(f"{manifest.path}: no shards of split {split!r}")
    mixture = dict(mixture or {})
    unknown = sorted(set(mixture) - set(names))
    if unknown:
        raise ManifestError(f"data.mixture: source(s) {unknown} not in {manifest.path} (it has {names})")
    if mixture and any(w < 0 for w in mixture.values()):
        raise ManifestError(f"data.mixture: weights must be ≥ 0 (got {mixture})")
    sources, weights, ids = [], [], []
    for i, name in enumerate(names):
        if mixture and mixture.get(name, 0.0) == 0.0:
            continue
        samples = PackedSamples(TokenStream(manifest, [s for s in shards if s.source == name]), seq_len)
        sources.append(samples)
        weights.append(mixture[name] if mixture else samples.num_samples)
        ids.append(i)
    if not sources:
        raise ManifestError(f"data.mixture: every weight is 0 (got {mixture})")
    return BlendedSamples(sources, weights, seed, ids)
