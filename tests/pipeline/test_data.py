import gc
import hashlib
import json
import math
import os
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from pipeline.data import (OPEN_SHARDS, BlendOrder, Manifest, ManifestError, TokenStream, blend_counts,
                           feistel_permute, open_split)


def reference_blend_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blend as one sorted per-sample array (how the loader once built it): (source id,
    draw number) for each position, draw k of source s at time (k + ½) / counts[s], ties to
    the lower source id. Exact in float64 for counts below about 4·10^7."""
    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    ids = np.concatenate([np.full(c, s, dtype=np.int32) for s, c in enumerate(counts) if c])
    draws = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
    order = np.lexsort((ids, times))
    return ids[order], draws[order]


def write_manifest(root: Path, sources: dict[str, list[np.ndarray]], vocab: int = 1000) -> Path:
    """Shards per the contract in docs/formats.md, one per source, written with pyarrow."""
    return write_shards(root, [(f"train-{name}.arrow", name, docs) for name, docs in sources.items()], vocab=vocab)


def write_shards(root: Path, shards: list[tuple[str, str, list]], vocab: int = 1000, dtype: str = "uint16",
                 chunk: int = 7, split: str = "train", compression: str | None = None) -> Path:
    """A manifest of the given (file name, source, documents) shards, each written as record
    batches of `chunk` documents (several per shard)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, source, docs in shards:
        path = root / name
        ends = np.cumsum([0] + [len(d) for d in docs], dtype=np.int32)
        values = np.concatenate([np.empty(0, dtype), *docs]).astype(dtype)
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(ends), pa.array(values))})
        options = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema, options=options) as w:
            w.write_table(table, max_chunksize=chunk)
        entries.append({"path": path.name, "split": split, "source": source, "documents": len(docs),
                        "tokens": int(sum(len(d) for d in docs)), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"format": "arrow-token-shards", "version": 1, "column": "input_ids", "dtype": dtype,
                "tokenizer": {"model": "tok.model", "sha256": "0", "vocab_size": vocab, "bos_id": 1, "eos_id": 2},
                "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def reference_tokens(shards) -> np.ndarray:
    """The shards' tokens concatenated by pyarrow alone."""
    return np.concatenate([pa.ipc.open_stream(pa.memory_map(str(s.path))).read_all().column("input_ids")
                           .combine_chunks().flatten().to_numpy().astype(np.int64) for s in shards])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


def docs_of(rng, n, lo, hi, base):
    return [np.concatenate([[1], rng.integers(base, base + 100, rng.integers(lo, hi)), [2]]).astype(np.uint16)
            for _ in range(n)]


def test_samples_are_windows_of_the_concatenated_documents(tmp_path):
    rng = np.random.default_rng(0)
    docs = docs_of(rng, 50, 5, 60, 10)
    manifest = Manifest.load(write_manifest(tmp_path, {"a": docs}))
    stream = np.concatenate(docs).astype(np.int64)
    samples = open_split(manifest, "train", seq_len=16, seed=3)
    assert samples.num_samples == (len(stream) - 1) // 16
    seen = set()
    for p in range(samples.num_samples):
        row = samples.at(p)
        start = int(np.flatnonzero([np.array_equal(stream[s:s + 17], row) for s in range(0, len(stream) - 16, 16)])[0]) * 16
        seen.add(start)
    assert len(seen) == samples.num_samples  # one epoch visits every window exactly once
    x, y = samples.batch([0, 1])
    assert x.shape == (2, 16) and np.array_equal(x[:, 1:], y[:, :-1])


def test_order_depends_on_seed_only_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(1)
    path = write_manifest(tmp_path, {"a": docs_of(rng, 80, 5, 60, 10)})
    before = sorted(tmp_path.rglob("*"))
    first = open_split(Manifest.load(path), "train", 16, seed=7)
    again = open_split(Manifest.load(path), "train", 16, seed=7)
    other = open_split(Manifest.load(path), "train", 16, seed=8)
    positions = range(0, 3 * first.num_samples, 5)  # across epochs
    assert all(np.array_equal(first.at(p), again.at(p)) for p in positions)
    assert not all(np.array_equal(first.at(p), other.at(p)) for p in range(10))
    assert sorted(tmp_path.rglob("*")) == before  # the order is computed, not cached beside the shards


def test_mixture_weights_set_the_share_of_each_source(tmp_path):
    rng = np.random.default_rng(2)
    # Source "a" has ids 10..109, source "b" ids 500..599: a sample's source shows in its tokens.
    path = write_manifest(tmp_path, {"a": docs_of(rng, 200, 20, 80, 10), "b": docs_of(rng, 200, 20, 80, 500)})
    samples = open_split(Manifest.load(path), "train", 16, seed=0, mixture={"a": 3.0, "b": 1.0})
    window = [samples.at(p) for p in range(200, 600)]
    share_a = np.mean([int((row >= 500).sum() == 0) for row in window if not (row < 3).all()])
    assert abs(share_a - 0.75) < 0.03
    only_b = open_split(Manifest.load(path), "train", 16, seed=0, mixture={"b": 1.0})
    assert all((only_b.at(p)[only_b.at(p) > 2] >= 500).all() for p in range(50))


def test_mixture_naming_an_unknown_source_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    path = write_manifest(tmp_path, {"a": docs_of(rng, 20, 5, 60, 10)})
    with pytest.raises(ManifestError, match=r"data.mixture: source\(s\) \['web'\] not in"):
        open_split(Manifest.load(path), "train", 16, seed=0, mixture={"web": 1.0})


def test_blend_counts_add_up_and_spread_evenly():
    counts = blend_counts([100, 50, 7], [0.5, 0.3, 0.2])
    assert counts.sum() == 157 and list(counts) == [79, 47, 31]  # 78.5, 47.1, 31.4: the .5 gets the spare
    ids, draws = BlendOrder([100, 50, 7], [0.5, 0.3, 0.2], seed=0).blend_many(np.arange(157))
    for s, c in enumerate(counts):
        assert sorted(draws[ids == s]) == list(range(c))
        # every prefix holds each source within one draw of its share
        prefix = np.cumsum(ids == s)
        expected = np.arange(1, len(ids) + 1) * c / len(ids)
        assert np.max(np.abs(prefix - expected)) <= 1.0


def test_manifest_errors_name_the_field(tmp_path):
    path = write_manifest(tmp_path, {"a": [np.array([1, 5, 2], dtype=np.uint16)] * 40})
    raw = json.loads(path.read_text())
    del raw["tokenizer"]["vocab_size"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="tokenizer.vocab_size is missing"):
        Manifest.load(path)
    raw["tokenizer"]["vocab_size"] = 1000
    raw["shards"][0]["tokens"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="holds 120 tokens but the manifest says 121"):
        open_split(Manifest.load(path), "train", 4, seed=0)
    raw["shards"][0]["tokens"] -= 1
    for field, value, message in [("column", "ids", r"train-a.arrow: no column 'ids'"),
                                  ("dtype", "uint32", r"train-a.arrow: column 'input_ids' is list<item: uint16>, "
                                                      r"expected list<uint32> \(the manifest's dtype\)")]:
        path.write_text(json.dumps({**raw, field: value}))
        with pytest.raises(ManifestError, match=message):
            open_split(Manifest.load(path), "train", 4, seed=0)
    (tmp_path / "train-a.arrow").unlink()
    with pytest.raises(ManifestError, match="manifest.json: shard train-a.arrow is listed but missing"):
        open_split(Manifest.load(path), "train", 4, seed=0)
    zstd = write_shards(tmp_path / "zstd", [("train-a.arrow", "a", [np.arange(3, dtype=np.uint16)] * 40)],
                        compression="zstd")
    with pytest.raises(ManifestError, match="train-a.arrow: record batch 0 is compressed; the loader reads uncompressed"):
        open_split(Manifest.load(zstd), "train", 4, seed=0)


def test_blend_order_is_the_sorted_blend_index_for_random_mixtures():
    rng = np.random.default_rng(4)
    for _ in range(100):
        n_sources = int(rng.integers(1, 6))
        sizes = rng.integers(1, rng.choice([3, 30, 400]), n_sources).tolist()
        weights = (rng.integers(0, 4, n_sources) * rng.choice([1.0, 0.37])).tolist()
        weights[0] += 0.5  # at least one source drawn
        order = BlendOrder(sizes, weights, seed=int(rng.integers(2**40)))
        ids, draws = reference_blend_index(blend_counts(sizes, weights))
        source, draw = order.blend_many(np.arange(order.num_samples))
        assert np.array_equal(source, ids) and np.array_equal(draw, draws), (sizes, weights)
        # one position at a time (exact Python ints) and a batch (numpy) agree, across epochs
        positions = rng.integers(0, 5 * order.num_samples, 20)
        many = order.locate_many(positions)
        assert [order.locate(int(p)) for p in positions] == list(zip(*(a.tolist() for a in many)))


def test_each_source_uses_every_sample_once_per_pass_in_a_seeded_order():
    order = BlendOrder([37, 101], [3.0, 1.0], seed=5)  # "a" up-weighted: it repeats, in new orders
    source, sample = order.locate_many(np.arange(4 * order.num_samples))
    a = sample[source == 0]
    passes = [a[i:i + 37] for i in range(0, len(a) - 36, 37)]
    assert len(passes) >= 8 and all(sorted(p) == list(range(37)) for p in passes)
    assert len({tuple(p) for p in passes}) == len(passes)  # each pass its own permutation
    assert sorted(sample[source == 1][:101]) == list(range(101))


def test_feistel_permutation_is_a_seeded_bijection_that_scatters_neighbours():
    for n in [1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 64, 97, 127, 128, 1000, 1024, 4099, 65536]:
        for key in (0, 1, 2**63 + 12345):
            x = np.arange(n, dtype=np.uint64)
            perm = feistel_permute(x, n, np.full(n, key, dtype=np.uint64))
            assert sorted(perm.tolist()) == list(range(n)), (n, key)
            assert [feistel_permute(int(i), n, key) for i in x[:50]] == perm[:50].tolist()
    n = 10007  # a prime
    x = np.arange(n, dtype=np.uint64)
    one, two = (feistel_permute(x, n, np.full(n, key, dtype=np.uint64)).astype(np.int64) for key in (11, 12))
    assert np.mean(one == two) < 0.01  # another key, another permutation
    assert np.mean(np.abs(np.diff(one)) == 1) < 0.01  # neighbours are not neighbouring samples
    assert np.mean(one == np.arange(n)) < 0.01
    assert abs(np.mean(np.abs(one - np.arange(n))) / n - 1 / 3) < 0.02  # a random permutation's mean displacement


def test_order_of_a_trillion_token_mixture_needs_a_few_kilobytes():
    """1T tokens at seq_len 2048, three sources mixed 0.6/0.3/0.1: about 4.9·10^8 samples a
    blend epoch, where a per-sample index would take gigabytes per rank."""
    sizes = [293_000_000, 146_000_000, 49_300_000]
    positions = np.random.default_rng(0).integers(0, 10 * sum(sizes), 1000).tolist()  # ten epochs
    tracemalloc.start()
    try:
        order = BlendOrder(sizes, [0.6, 0.3, 0.1], seed=1234)
        out_of_range = 0
        for p in positions:
            s, j = order.locate(p)
            out_of_range += not 0 <= j < sizes[s]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak  # about 7 kB; the per-sample index took 12 bytes × 4.9·10^8 and a sort
    assert out_of_range == 0
    assert order.num_samples == sum(sizes)
    counts = blend_counts(sizes, [0.6, 0.3, 0.1])
    start = 3 * order.num_samples + 123_456_789  # a window inside the fourth epoch
    source, sample = order.locate_many(np.arange(start, start + 10_000))
    for s, c in enumerate(counts):
        assert abs(np.sum(source == s) - 10_000 * c / order.num_samples) <= 2  # its share, within a draw each end
        assert len(np.unique(sample[source == s])) == np.sum(source == s)


def test_blend_of_more_samples_than_int64_products_allow_is_exact():
    """Past about 2^31 samples an epoch the counting runs on Python integers: the draws found
    for consecutive positions are each source's next draw, in the order of their times."""
    counts = [3_000_000_019, 1_999_999_999, 7]
    order = BlendOrder(counts, counts, seed=0)
    start = 1_234_567_890_123 % order.num_samples
    source, draw = order.blend_many(np.arange(start, start + 2_000))
    time = [Fraction(2 * int(k) + 1, 2 * counts[s]) for s, k in zip(source, draw)]
    assert all((time[i], source[i]) < (time[i + 1], source[i + 1]) for i in range(len(time) - 1))
    for s in range(3):
        mine = draw[source == s]
        assert np.array_equal(mine, np.arange(mine[0], mine[0] + len(mine))) if len(mine) else True
    # and as many draws precede the first as the times say
    assert sum(draws_before(c, time[0], t < source[0]) for t, c in enumerate(counts)) == start
    positions = np.random.default_rng(5).integers(0, 3 * order.num_samples, 50)
    many = order.locate_many(positions)
    assert [order.locate(int(p)) for p in positions] == list(zip(*(a.tolist() for a in many)))


def draws_before(count: int, time: Fraction, tie_first: bool) -> int:
    """Draws of a source of `count` draws at times (2j + 1) / (2·count) before `time`, or at
    it when `tie_first`."""
    y = 2 * count * time  # draw j is at y = 2j + 1
    strictly = min(count, max(0, math.ceil((y - 1) / 2)))
    tie = y.denominator == 1 and y.numerator % 2 == 1 and y < 2 * count
    return strictly + int(tie and tie_first)


def check_reads(stream: TokenStream, reference: np.ndarray, rng, shard_tokens: int) -> None:
    """Random slices, short and spanning several record batches and shards, equal the reference."""
    assert stream.num_tokens == len(reference)
    assert np.array_equal(stream.read(0, len(reference)), reference)
    for length in (1, 2, 17, shard_tokens, 3 * shard_tokens):
        for start in rng.integers(0, len(reference) - min(length, len(reference)) + 1, 30):
            got = stream.read(int(start), min(length, len(reference)))
            assert np.array_equal(got, reference[start:start + len(got)]), (start, length)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_stream_reads_equal_the_concatenated_shards(tmp_path, dtype):
    rng = np.random.default_rng(6)
    top = 60_000 if dtype == "uint16" else 2**31
    shards = []
    for i in range(9):  # two sources, shards of 0 to 60 documents, some documents empty
        docs = [rng.integers(0, top, rng.choice([0, 1, 3, 40])).astype(dtype) for _ in range(rng.integers(0, 60))]
        shards.append((f"train-{i:02d}.arrow", "ab"[i % 2], docs))
    manifest = Manifest.load(write_shards(tmp_path, shards, vocab=top, dtype=dtype, chunk=int(rng.integers(1, 9))))
    for source in "ab":
        mine = [s for s in manifest.shards if s.source == source]
        for max_open in (1, 2, OPEN_SHARDS):
            stream = TokenStream(manifest, mine, max_open=max_open)
            check_reads(stream, reference_tokens(mine), rng, max(s.tokens for s in mine))


def test_token_stream_reads_equal_the_concatenated_prepared_shards(prepared_data):
    rng = np.random.default_rng(7)
    manifest = Manifest.load(prepared_data)
    for split in ("train", "validation"):
        shards = manifest.split_shards(split)
        check_reads(TokenStream(manifest, shards, max_open=2), reference_tokens(shards), rng,
                    max(s.tokens for s in shards))


def test_token_stream_memory_and_open_files_do_not_grow_with_record_batches(tmp_path):
    """20,000 record batches in 250 shards: the layout costs 16 bytes a batch, and no shard
    stays open after the open, nor more than OPEN_SHARDS while reading."""
    rng = np.random.default_rng(8)
    n_shards, per_shard = 250, 80
    shards = [(f"train-{i:03d}.arrow", "a", list(rng.integers(0, 1000, (per_shard, 3), dtype=np.uint16)))
              for i in range(n_shards)]
    manifest = Manifest.load(write_shards(tmp_path, shards, chunk=1))
    mine = manifest.split_shards("train")
    gc.collect()
    fds, rss = open_fds(), rss_bytes()
    stream = TokenStream(manifest, mine)
    rss_per_batch = (rss_bytes() - rss) / (n_shards * per_shard)
    assert open_fds() == fds  # every shard closed after its metadata was read
    tracemalloc.start()  # on a fifth of the shards: tracing slows the open fivefold
    try:
        part = TokenStream(manifest, mine[:50])
        held_per_batch = tracemalloc.get_traced_memory()[0] / (50 * per_shard)
    finally:
        tracemalloc.stop()
    # About 16 bytes a batch. An array view and its Arrow buffers per batch took ~1.5 kB of RSS
    # (RSS is noisier than the traced heap, hence its looser bound).
    assert held_per_batch <= 32 and rss_per_batch <= 200, (held_per_batch, rss_per_batch)
    assert np.array_equal(stream.read(0, stream.num_tokens), reference_tokens(mine))  # through every shard
    assert open_fds() - fds == OPEN_SHARDS
    del stream, part
    assert open_fds() == fds
