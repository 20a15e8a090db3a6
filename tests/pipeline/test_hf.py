"""The streaming safetensors writer of pipeline/hf.py."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.hf import plan_shards, write_safetensors


def sample():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(10, 7, generator=g), "b": torch.randn(300, generator=g), "c": torch.randn(3, 5, 2, generator=g),
            "empty": torch.zeros(0, 4), "d": torch.randn(64, 64, generator=g)}


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_written_files_read_back_with_safetensors(tmp_path, dtype, torch_dtype):
    state = sample()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    index = write_safetensors(shapes, iter(state.items()), tmp_path, dtype, max_shard_bytes=2000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == 2
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    for name, t in state.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as f:
            got = f.get_tensor(name)
            assert f.metadata() == {"format": "pt"}
        assert got.dtype == torch_dtype and torch.equal(got, t.to(torch_dtype)), name
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_shards_respect_the_size_limit_and_order():
    shapes = {"a": (100,), "b": (100,), "c": (300,), "d": (1,)}
    assert plan_shards(shapes, "fp32", 800) == [["a", "b"], ["c"], ["d"]]  # c alone exceeds: its own file
    assert plan_shards(shapes, "fp32", None) == [["a", "b", "c", "d"]]


def test_single_file_without_index(tmp_path):
    state = sample()
    write_safetensors({k: tuple(v.shape) for k, v in state.items()}, iter(state.items()), tmp_path, "fp32", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_stream_must_follow_the_announced_shapes(tmp_path):
    state = sample()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    with pytest.raises(ValueError, match="expected 'a', got 'b'"):
        write_safetensors(shapes, iter(list(state.items())[1:]), tmp_path, "fp32", None)
    with pytest.raises(ValueError, match="shape"):
        write_safetensors({**shapes, "a": (7, 10)}, iter(state.items()), tmp_path, "fp32", None)
    with pytest.raises(ValueError, match="extra tensor 'z'"):
        write_safetensors(shapes, iter([*state.items(), ("z", torch.zeros(1))]), tmp_path, "fp32", None)
