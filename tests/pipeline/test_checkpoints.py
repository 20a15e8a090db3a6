"""The checkpoint directory's pointer and the one safe loader, without DeepSpeed processes
(saving, conversion and resuming run through the launcher in test_train.py)."""

from __future__ import annotations

import os

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
