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


def test_manifest_lists_shards_in_task_order_past_five_digit_task_numbers(tmp_path):
    """Failed first: shards were sorted by name, and train-100000-0000 sorts before train-20000-0000."""
    from data_prep.config import PrepConfig
    from data_prep.shards import build_manifest

    model = tmp_path / "tok.model"
    model.write_bytes(b"model")

    def shard(split, task):
        return {"path": f"{split}-{task:05d}-0000.arrow", "split": split, "source": "web", "documents": 1, "tokens": 9}

    tasks = [20000, 99999, 100000, 100001]
    toks = [{"shards": [shard("validation", t), shard("train", t)]} for t in tasks]
    cfg = PrepConfig.model_validate({"sources": [{"name": "web", "type": "jsonl", "paths": [str(tmp_path)]}]})
    m = build_manifest(cfg, toks, model, {"vocab_size": 100, "bos_id": 1, "eos_id": 2, "pad_id": -1, "unk_id": 0})
    assert [s["path"] for s in m["shards"]] == ([shard("train", t)["path"] for t in tasks]
                                                 + [shard("validation", t)["path"] for t in tasks])
