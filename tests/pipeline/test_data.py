import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from pipeline.data import Manifest, ManifestError, blend_counts, build_blend_index, open_split


def write_manifest(root: Path, sources: dict[str, list[np.ndarray]], vocab: int = 1000) -> Path:
    """Shards per the contract in docs/formats.md, one per source, written with pyarrow."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for name, docs in sources.items():
        path = root / f"train-{name}.arrow"
        table = pa.table({"input_ids": pa.array(docs, type=pa.list_(pa.uint16()))})
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table, max_chunksize=7)  # several record batches per shard
        shards.append({"path": path.name, "split": "train", "source": name, "documents": len(docs),
                       "tokens": int(sum(len(d) for d in docs)), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"format": "arrow-token-shards", "version": 1, "column": "input_ids", "dtype": "uint16",
                "tokenizer": {"model": "tok.model", "sha256": "0", "vocab_size": vocab, "bos_id": 1, "eos_id": 2},
                "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


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


def test_order_depends_on_seed_only_and_index_is_cached(tmp_path):
    rng = np.random.default_rng(1)
    path = write_manifest(tmp_path, {"a": docs_of(rng, 80, 5, 60, 10)})
    first = open_split(Manifest.load(path), "train", 16, seed=7)
    cached = list((tmp_path / "index").glob("*.npy"))
    assert len(cached) == 2
    again = open_split(Manifest.load(path), "train", 16, seed=7)
    assert isinstance(again.ids, np.memmap)  # read back from the cache, not rebuilt
    other = open_split(Manifest.load(path), "train", 16, seed=8)
    positions = range(0, 3 * first.num_samples, 5)  # across epochs
    assert all(np.array_equal(first.at(p), again.at(p)) for p in positions)
    assert not all(np.array_equal(first.at(p), other.at(p)) for p in range(10))


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
    ids, draws = build_blend_index(counts)
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
