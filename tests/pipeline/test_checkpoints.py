"""The checkpoint directory's pointer and the one safe loader, without DeepSpeed processes
(saving, conversion and resuming run through the launcher in test_train.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pipeline.checkpoint_reader import ALLOWED_GLOBALS, CheckpointError, safe_loading
from pipeline.checkpoints import Checkpoints


def test_an_empty_or_dangling_latest_is_an_error_with_the_fix(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2)
    assert ckpts.latest() is None  # no `latest`: a fresh run
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("\n")  # failed first: read as "start fresh"
    with pytest.raises(CheckpointError, match=r"latest is empty; write the tag of a complete checkpoint into it "
                                              r"\(one of \['global_step4'\]\), or pass --resume global_stepN"):
        ckpts.latest()
    (tmp_path / "latest").write_text("global_step8\n")
    with pytest.raises(CheckpointError, match="names global_step8, which does not exist"):
        ckpts.latest()
    (tmp_path / "latest").write_text("global_step4\n")
    assert ckpts.latest() == "global_step4"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_safe_loading_routes_every_torch_load_through_the_allow_list(tmp_path):
    """DeepSpeed's loaders (its checkpoint engine, universal checkpoints, ds_to_universal) call
    torch.load(weights_only=False); inside safe_loading that argument is overridden."""
    f = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2), "note": _Payload(tmp_path / "pwned")}, f)
    with safe_loading(), pytest.raises(CheckpointError, match="refused to load a pickled object outside the allow-list"):
        torch.load(f, weights_only=False)
    assert not (tmp_path / "pwned").exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored after the block

    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"w": torch.ones(2), "stage": ZeroStageEnum.weights}, f)
    with safe_loading():
        state = torch.load(f, weights_only=False)
    assert state["stage"] is ZeroStageEnum.weights  # DeepSpeed's own class, for its engine
    assert "deepspeed.runtime.zero.config.ZeroStageEnum" in ALLOWED_GLOBALS


def test_a_save_that_cannot_write_is_one_error_naming_the_path(tmp_path, monkeypatch):
    """A real ZeRO-3 engine in this process (one rank, gloo). Failed first: DeepSpeed's OSError
    escaped as a traceback (a full disk or a read-only mount alike; here a file in the way)."""
    from runs import free_port

    from pipeline.config import load_profile
    from pipeline.distributed import init_distributed
    from pipeline.engines import build_engine
    from pipeline.faults import FaultInjection

    for k, v in dict(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    init_distributed()
    try:
        profile = load_profile("ds_configs/tiny_cpu.json", 1, [f"data.manifest={tmp_path}/manifest.json"], vocab_size=512)
        engine = build_engine(profile)
        ckpts = Checkpoints(tmp_path / "checkpoints", keep_last=2)
        assert ckpts.save(engine, 1, {}, {}, FaultInjection()) == "global_step1"
        shutil.rmtree(ckpts.staging)
        ckpts.staging.write_text("in the way")
        with pytest.raises(CheckpointError) as e:
            ckpts.save(engine, 2, {}, {}, FaultInjection())
    finally:
        torch.distributed.destroy_process_group()
    assert str(e.value).count("\n") == 0 and str(e.value).startswith(f"{ckpts.staging}: saving checkpoint global_step2 failed")
    assert ckpts.latest() == "global_step1" and ckpts.tags() == ["global_step1"]  # the complete save is untouched
