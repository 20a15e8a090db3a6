"""What both engines share: the calls on the wrapped DeepSpeed engine that do not depend on
the topology."""

from __future__ import annotations


class EngineBase:
    engine = None  # the DeepSpeed engine, set by the subclass through `_wrap`
    recomputations = None  # blocks.Recomputations of this rank's blocks, set by the subclass

    def _wrap(self, ds_engine) -> None:
        self.engine = ds_engine
        self.device = ds_engine.device

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed discarded because the gradient norm was inf or NaN."""
        return self.engine.skipped_steps

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        # `latest` is written by pipeline/checkpoints.py once every rank has finished.
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        return client_state
