"""Training samples from the token-shard manifest (`docs/formats.md`).

Documents of a split are concatenated in manifest order into one token stream (each ends with
EOS, so windows cross document boundaries at EOS, as Megatron's GPTDataset packs them) and cut
into windows of seq_len + 1 tokens: inputs are the first seq_len, labels the last seq_len.

Order is a function of the seed and the global sample position only: position p of the run
is sample `perm_e[p mod n]` with e = p // n the epoch and perm_e a permutation seeded by
(seed, e). A data-parallel rank reads only the positions of its micro-batches, so the samples
of an optimizer step do not depend on how many ranks share it, and resuming from a consumed-
sample count continues the same order on any world size.

Sources are mixed by weight (`data.mixture`; default: in proportion to their tokens). The
global sample index — which source, and which draw of that source, fills each position of a
blend epoch — is built once, deterministically from the seed, and cached beside the shards in
`index/` (`.npy`, memory-mapped, written under a temporary name and renamed). Each source
keeps its own per-epoch permutation, so an up-weighted source repeats its samples only after
it has used them all.

Shards are memory-mapped; a sample touches only the pages it spans.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc


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
    """The concatenated tokens of some shards, memory-mapped, read by global token offset."""

    def __init__(self, manifest: Manifest, shards: list[ShardInfo]):
        if not shards:
            raise ManifestError(f"{manifest.path}: no shards selected")
        self._chunks: list[np.ndarray] = []
        self._maps = []  # keep the memory maps open as long as the arrays live
        for shard in shards:
            if not shard.path.exists():
                raise ManifestError(f"{manifest.path}: shard {shard.path.name} is listed but missing")
            mm = pa.memory_map(str(shard.path))
            table = pa.ipc.open_stream(mm).read_all()
            if manifest.column not in table.column_names:
                raise ManifestError(f"{shard.path}: no column {manifest.column!r}")
            n = 0
            for chunk in table.column(manifest.column).chunks:
                values = chunk.flatten()  # zero-copy view into the mapped file, honours slicing
                arr = np.frombuffer(values.buffers()[1], dtype=manifest.dtype, count=len(values) + values.offset)
                arr = arr[values.offset:]
                self._chunks.append(arr)
                n += len(arr)
            if n != shard.tokens:
                raise ManifestError(f"{shard.path}: holds {n} tokens but the manifest says {shard.tokens}")
            self._maps.append(mm)
        sizes = np.array([len(c) for c in self._chunks], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            chunk = self._chunks[i]
            lo = start + filled - int(self._starts[i])
            take = min(length - filled, len(chunk) - lo)
            out[filled:filled + take] = chunk[lo:lo + take]
            filled += take
            i += 1
        return out


class PackedSamples:
    """Windows of seq_len + 1 tokens over a token stream, in a seeded order per epoch."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, stream_id: int = 0):
        self.stream, self.seq_len, self.seed, self.stream_id = stream, seq_len, seed, stream_id
        self.num_samples = (stream.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ManifestError(f"only {stream.num_tokens} tokens: fewer than one sample of seq_len {seq_len}")
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.stream_id, epoch]))
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def at(self, position: int) -> np.ndarray:
        """The sample at global position `position` (any non-negative integer)."""
        epoch, i = divmod(position, self.num_samples)
        sample = int(self._order(epoch)[i])
        return self.stream.read(sample * self.seq_len, self.seq_len + 1)

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray]:
        rows = np.stack([self.at(p) for p in positions])
        return rows[:, :-1], rows[:, 1:]


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


def build_blend_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source id, draw number) for each position: each source's draws spread evenly over the
    epoch (draw k of source s at time (k + ½) / counts[s]), ties broken by source id."""
    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c]) if counts.sum() else np.empty(0)
    ids = np.concatenate([np.full(c, s, dtype=np.int32) for s, c in enumerate(counts) if c])
    draws = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
    order = np.lexsort((ids, times))
    return ids[order], draws[order]


class BlendedSamples:
    """Several sources' samples in fixed proportions; `at(position)` for any position ≥ 0."""

    def __init__(self, sources: list[PackedSamples], weights: list[float], cache_dir: Path | None, key: str):
        self.sources = sources
        self.seq_len = sources[0].seq_len
        self.counts = blend_counts([s.num_samples for s in sources], weights)
        self.num_samples = int(self.counts.sum())
        self.ids, self.draws = self._load_or_build(cache_dir, key)

    def _load_or_build(self, cache_dir: Path | None, key: str) -> tuple[np.ndarray, np.ndarray]:
        if cache_dir is not None:
            paths = [cache_dir / f"{key}-{part}.npy" for part in ("source", "draw")]
            if all(p.exists() for p in paths):
                return tuple(np.load(p, mmap_mode="r") for p in paths)  # type: ignore[return-value]
        arrays = build_blend_index(self.counts)
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                for path, arr in zip(paths, arrays):
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
                    os.replace(tmp, path)  # every rank writes identical bytes; the last rename wins
            except OSError:
                pass  # a read-only data directory: keep the index in memory
        return arrays

    def at(self, position: int) -> np.ndarray:
        epoch, i = divmod(position, self.num_samples)
        s = int(self.ids[i])
        return self.sources[s].at(epoch * int(self.counts[s]) + int(self.draws[i]))

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray]:
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
    sources, weights = [], []
    for i, name in enumerate(names):
        if mixture and mixture.get(name, 0.0) == 0.0:
            continue
        samples = PackedSamples(TokenStream(manifest, [s for s in shards if s.source == name]), seq_len, seed, i)
        sources.append(samples)
        weights.append(mixture[name] if mixture else samples.num_samples)
    if not sources:
        raise ManifestError(f"data.mixture: every weight is 0 (got {mixture})")
    ident = json.dumps({"split": split, "seq_len": seq_len, "seed": seed, "weights": weights,
                        "shards": [s.sha256 for s in shards], "sources": names}, sort_keys=True)
    key = f"{split}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    return BlendedSamples(sources, weights, manifest.path.parent / "index", key)
