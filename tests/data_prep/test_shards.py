"""Shard writer: dtype by vocabulary size, rolling at the target size, whole files only."""
import hashlib

import datasets
import pyarrow as pa

from data_prep.shards import ShardWriter, id_dtype, is_validation


def test_dtype_rolling_and_hashes(tmp_path):
    assert id_dtype(65536) == pa.uint16() and id_dtype(65537) == pa.uint32()
    w = ShardWriter(tmp_path, "train", 7, id_dtype(100_000), target_bytes=4000, source="s")
    docs = [[1] + list(range(99_990, 99_990 + n % 9)) + [2] for n in range(300)]
    for i in range(0, 300, 50):
        w.write(docs[i : i + 50])
    w.close()
    assert len(w.shards) > 1 and [s["path"] for s in w.shards][:2] == ["train-00007-0000.arrow", "train-00007-0001.arrow"]
    back = []
    for s in w.shards:
        ds = datasets.Dataset.from_file(str(tmp_path / s["path"]))
        assert ds.features["input_ids"].feature.dtype == "uint32"
        assert hashlib.sha256((tmp_path / s["path"]).read_bytes()).hexdigest() == s["sha256"]
        back += ds["input_ids"]
    assert back == docs and sum(s["tokens"] for s in w.shards) == sum(map(len, docs))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s["path"] for s in w.shards)


def test_validation_split_is_a_stable_fraction():
    val = [is_validation("web", f"doc{i}", 0.02, 0) for i in range(20_000)]
    assert 0.015 < sum(val) / len(val) < 0.025
    assert val == [is_validation("web", f"doc{i}", 0.02, 0) for i in range(20_000)]
    assert not any(is_validation("web", f"doc{i}", 0.0, 0) for i in range(1000))
