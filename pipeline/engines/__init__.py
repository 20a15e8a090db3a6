"""DeepSpeed engines. Each takes the plain model of `pipeline/model.py` and wraps it.

An engine offers the same few calls to the training loop:
    train_step(micro_batches, poison=False) -> mean loss of this rank's micro-batches (a float)
    eval_loss(micro_batches)  -> mean loss, no gradients
    save(dir, tag, client_state) / load(dir, tag) -> client_state
    lr, grad_norm, skipped_steps (optimizer steps DeepSpeed discarded for a non-finite gradient norm), dp_rank
    recomputations.count: block forwards this rank ran again in backward passes (activation checkpointing)
"""

from pipeline.config import Profile


def build_engine(profile: Profile, init_state=None, packing=None):
    """`init_state`: weights in the plain model's names to start from (--init-from), or None.
    The ZeRO data-parallel engine needs them on rank 0 only; the pipeline engine on every rank.
    `packing`: document masking (pipeline/model.py Packing), or None for plain causal attention."""
    if profile.topology.data_parallel:
        from pipeline.engines.zero import ZeroEngine

        return ZeroEngine(profile, init_state, packing)
    from pipeline.engines.pipe import PipelineEngine

    return PipelineEngine(profile, init_state, packing)
