"""Dry-run planner: will this profile fit, how long will it take, what will it cost?

    python -m pipeline.plan --profile ds_configs/7b_zero3.json --nodes 8 --gpus-per-node 8 --gpu h100-80gb

Prints parameters, FLOPs per token, per-GPU memory (model states next to DeepSpeed's own ZeRO-2
or ZeRO-3 estimator, activations with and without activation checkpointing), tokens per step, steps for
the token budget, wall-clock and GPU-hours at a stated MFU. A plan that does not fit is refused
(exit status 1) with the reason and the cheapest changes that make it fit.

Memory model, per GPU, in bytes (N parameters, W GPUs, bf16/fp16 mixed precision):

    ZeRO-1        4·N + 16·N/W               — 16-bit weights and 16-bit gradients whole on every GPU;
                                               fp32 master, Adam m, v and fp32 gradients (4 + 8 + 4
                                               bytes) partitioned: stage 1 partitions the optimizer
                                               states only. DeepSpeed has no ZeRO-1 estimator.
    ZeRO-2        2·N + 18·N/W               — DeepSpeed's estimator: as ZeRO-1 with the 16-bit
                                               gradients partitioned too (stage 2 partitions gradients)
      + offload_optimizer=cpu                2·N on the GPU (the 16-bit weights)
    ZeRO-3        18·N/W + 4·largest_layer   — DeepSpeed's estimator: 2 (16-bit weights) + 4 (fp32
                                               master) + 8 (Adam m, v) + 4 (fp32 gradients) bytes
                                               per parameter, partitioned over all ranks, plus the
                                               largest layer gathered whole
      + offload_optimizer=cpu                2·N/W + 4·largest_layer on the GPU, 16·N per node set in host memory
      + offload_param=cpu                    4·largest_layer on the GPU
      + ZeRO++ hpZ (partition size P)        + 2·N/P: the secondary weight copy, partitioned within a node
    pipeline + ZeRO-1 (S stages, D = W/S)    a stage of Nₛ parameters holds 2·Nₛ (weights) + 4·Nₛ (fp32
                                             gradient accumulation) + 12·Nₛ/D (master + Adam, partitioned)
    fp32 training                            4 (weights) + 4 (gradients) + 8 (Adam) bytes per parameter,
                                             each partitioned from the stage that partitions it

Activations are counted tensor by tensor in `activation_bytes`; they are an estimate (allocator
fragmentation and temporary buffers come on top), so a plan must leave `HEADROOM` free.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from pipeline.config import Profile, ProfileError, apply_overrides, parse_profile, read_profile_json, resolve
from pipeline.metrics import PEAK_FLOPS, flops_per_token
from pipeline.model import PRESETS, ModelConfig

GiB = 2**30

# Memory per GPU as the driver reports it (datasheets), bytes.
GPU_MEMORY = {
    "h100-80gb": 80 * GiB,
    "h100-pcie": 80 * GiB,
    "h200": 141 * GiB,
    "a100-80gb": 80 * GiB,
    "a100-40gb": 40 * GiB,
    "l40s": 48 * GiB,
}
# Kept free: CUDA context and NCCL buffers (~1-3 GiB) plus allocator fragmentation.
HEADROOM = 0.10
RUNTIME_RESERVE = 3 * GiB


@dataclass(frozen=True)
class Layout:
    """How a model's parameters fall into layers (what DeepSpeed's estimator needs)."""

    total_params: int
    largest_layer_params: int  # the largest single module's own parameters (the embedding for LLaMA)
    block_params: int
    embedding_params: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Layout":
        d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
        attn = 2 * d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd
        block = attn + 3 * d * f + 2 * d
        # Fused projections (pipeline/model.py) make wqkv and w13 the largest weights of a block.
        q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
        block_weights = (d * (q + 2 * kv), 2 * d * f) if cfg.fused_projections else (d * q, d * f)
        largest = max(cfg.vocab_size * d, *block_weights)
        return cls(cfg.num_params(), largest, block, cfg.vocab_size * d)

    def stage_params(self, n_layers: int, stages: int) -> int:
        """Parameters of the heaviest pipeline stage: an even share of blocks plus the embedding
        (first stage) or the final norm and output head (last stage)."""
        blocks = math.ceil(n_layers / stages)
        return blocks * self.block_params + self.embedding_params + (0 if stages > 1 else self.embedding_params)


@dataclass
class Memory:
    """Bytes per GPU, by component (model states) plus activations."""

    states: dict[str, float]
    deepspeed_estimate: float | None  # DeepSpeed's own ZeRO-2/3 estimator, GPU bytes; None where it has none
    host_per_node: float  # CPU memory per node the offloaded states need (0 without offload)
    activations_checkpointed: float
    activations_full: float
    checkpointing: bool
    estimator: str = ""  # the name of DeepSpeed's function behind deepspeed_estimate

    @property
    def model_states(self) -> float:
        return sum(self.states.values())

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    @property
    def total(self) -> float:
        return self.model_states + self.activations + RUNTIME_RESERVE


def _offload(profile: Profile) -> tuple[bool, bool]:
    zero = profile.deepspeed.get("zero_optimization", {})
    dev = lambda key: (zero.get(key) or {}).get("device", "none")  # noqa: E731
    return dev("offload_optimizer") in ("cpu", "nvme"), dev("offload_param") in ("cpu", "nvme")


def deepspeed_zero3_estimate(layout: Layout, nodes: int, gpus_per_node: int, offload_optimizer: bool,
                             offload_param: bool) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) from DeepSpeed's own ZeRO-3 estimator."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=layout.total_params, largest_layer_params=layout.largest_layer_params,
        num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param, zero_init=True)
    return gpu, cpu


def deepspeed_zero2_estimate(layout: Layout, nodes: int, gpus_per_node: int, offload_optimizer: bool) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) from DeepSpeed's own ZeRO-2 estimator."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(
        total_params=layout.total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer)
    return gpu, cpu


def _zero_states(n: int, world: int, stage: int, mixed: bool) -> dict[str, float]:
    """Per-GPU bytes of the data-parallel engine's model states before offload, by component:
    each is whole on every GPU below the stage that partitions it (optimizer states from 1,
    gradients from 2, weights at 3) and divided by W from there on."""
    # (component, bytes per parameter, the first stage that partitions it)
    if not mixed:
        parts = [("weights (fp32)", 4, 3), ("gradients (fp32)", 4, 2), ("Adam m, v", 8, 1)]
    else:
        parts = [("weights (16-bit)", 2, 3), ("gradients (16-bit)", 2, 2), ("fp32 master", 4, 1),
                 ("Adam m, v", 8, 1), ("gradients (fp32)", 4, 1)]
        if stage == 3:  # as DeepSpeed's ZeRO-3 estimator, which counts no 16-bit gradients
            del parts[1]
    states = {}
    for name, per_param, partitioned_from in parts:
        split = stage >= partitioned_from
        states[f"{name} / W" if split else name] = per_param * n / world if split else per_param * n
    return states


def model_state_bytes(profile: Profile, nodes: int, gpus_per_node: int) -> tuple[dict[str, float], float]:
    """Per-GPU model-state bytes by component, and host bytes per node for offloaded states."""
    layout = Layout.of(profile.model)
    n, world = layout.total_params, nodes * gpus_per_node
    mixed = profile.train.precision != "fp32"
    zero = profile.deepspeed.get("zero_optimization", {})
    if profile.topology.engine == "pipeline":
        ns = layout.stage_params(profile.model.n_layers, profile.topology.pipeline_stages)
        dp = world // profile.topology.pipeline_stages
        if not mixed:
            return {"weights (fp32)": 4 * ns, "gradients (fp32)": 4 * ns, "Adam m, v / D": 8 * ns / dp}, 0.0
        states = {"weights (16-bit)": 2 * ns, "gradients (fp32 accumulation)": 4 * ns}
        if zero.get("stage", 1) >= 1:
            states["fp32 master + Adam m, v / D"] = 12 * ns / dp
        else:
            states["fp32 master + Adam m, v"] = 12 * ns
        return states, 0.0
    off_opt, off_param = _offload(profile)
    states = _zero_states(n, world, profile.zero_stage, mixed)
    host = 0.0
    if off_opt:
        moved = [k for k in states if not k.startswith("weights")]
        host_bytes = sum(states.pop(k) for k in moved)
        if off_param:
            host_bytes += states.pop(next(k for k in states if k.startswith("weights")))
        # As DeepSpeed's estimator: the offloaded states of a node's ranks, with a 1.5× buffer.
        host = host_bytes * gpus_per_node * 1.5
    if profile.zero_stage < 3:
        return states, host
    states["largest layer gathered"] = 4 * layout.largest_layer_params
    hpz = zero.get("zero_hpz_partition_size", 1)
    if isinstance(hpz, int) and hpz > 1 and not off_param:
        states[f"ZeRO++ hpZ secondary weights / {hpz}"] = 2 * n / hpz
    return states, host


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, layers: int, checkpointing: bool,
                     bytes_per_value: int = 2, with_head: bool = True, checkpoint_every: int = 1,
                     loss_chunk_tokens: int = 0) -> float:
    """Activation memory of one micro-batch through `layers` blocks (and the output head).

    Per block and token, in values (SDPA's fused kernels keep no T×T score matrix):
      two RMSNorms: input, fp32 internals (2 values' worth), output    4·2d + 2·2d (fp32) = 12d
      attention: q, k, v; the SDPA output and the reshaped copy for wo  d + 2·d_kv + 2d
      SwiGLU: w1 and w3 outputs, silu(w1 x), the product fed to w2      4f
    With activation checkpointing every k-th block keeps only its input (d values), the others
    keep everything, and one block is recomputed at a time. The head keeps 16-bit logits plus
    the fp32 log-softmax of the loss; with the chunked loss (`loss_chunk_tokens` = C) one
    chunk's 16-bit logits, their fp32 copy, the fp32 softmax and its 16-bit cast (12 bytes per
    value) exist at a time, plus the fp32 gradient of the head's V·d weight built in the forward.
    """
    d_kv = cfg.kv_heads * cfg.head_dim
    tokens = micro_batch * seq_len
    per_block = tokens * (12 * cfg.dim + 3 * cfg.dim + 2 * d_kv + 4 * cfg.ffn_dim) * bytes_per_value
    if not with_head:
        head = 0.0
    elif loss_chunk_tokens:
        head = min(tokens, loss_chunk_tokens) * cfg.vocab_size * 12 + 4 * cfg.vocab_size * cfg.dim
    else:
        head = tokens * cfg.vocab_size * (bytes_per_value + 4)
    if checkpointing:
        recomputed = layers // checkpoint_every
        return (recomputed * tokens * cfg.dim * bytes_per_value + (layers - recomputed) * per_block
                + per_block + head)
    return layers * per_block + head


def memory(profile: Profile, nodes: int, gpus_per_node: int, micro_batch: int | None = None,
           checkpointing: bool | None = None) -> Memory:
    states, host = model_state_bytes(profile, nodes, gpus_per_node)
    cfg, t = profile.model, profile.train
    mb = micro_batch or t.micro_batch_size
    bpv = 4 if t.precision == "fp32" else 2
    layers, in_flight = cfg.n_layers, 1
    if profile.topology.engine == "pipeline":
        stages = profile.topology.pipeline_stages
        layers = math.ceil(cfg.n_layers / stages)
        # 1F1B: the first stage holds the activations of up to `stages` micro-batches at once.
        in_flight = min(stages, profile.grad_accum_steps)
    act = lambda ckpt: in_flight * activation_bytes(  # noqa: E731
        cfg, mb, profile.data.seq_len, layers, ckpt, bpv, checkpoint_every=t.activation_checkpointing_every,
        loss_chunk_tokens=t.loss_chunk_tokens)
    estimate, estimator = None, ""
    if profile.topology.data_parallel and t.precision != "fp32" and profile.zero_stage >= 2:
        off_opt, off_param = _offload(profile)
        if profile.zero_stage == 3:
            estimate, _ = deepspeed_zero3_estimate(Layout.of(cfg), nodes, gpus_per_node, off_opt, off_param)
        else:
            estimate, _ = deepspeed_zero2_estimate(Layout.of(cfg), nodes, gpus_per_node, off_opt)
        estimator = f"estimate_zero{profile.zero_stage}_model_states"
    return Memory(states, estimate, host, act(True), act(False),
                  t.activation_checkpointing if checkpointing is None else checkpointing, estimator)


@dataclass
class Plan:
    profile: Profile
    nodes: int
    gpus_per_node: int
    gpu: str
    mfu: float
    memory: Memory
    gpu_memory: float
    flops_per_token: float
    refusals: list[str] = field(default_factory=list)
    ways_out: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return not self.refusals

    @property
    def seconds(self) -> float:
        return self.profile.total_tokens * self.flops_per_token / (self.world * PEAK_FLOPS[self.gpu] * self.mfu)


def _fits(mem: Memory, usable: float) -> bool:
    return mem.total <= usable


def _ways_out(profile: Profile, nodes: int, gpn: int, usable: float, overrides: list[str],
              vocab_size: int | None, combined: bool = False) -> list[str]:
    """Changes that make the plan fit, cheapest first: they cost nothing in throughput or little
    (smaller micro-batch, recomputation), then money (more nodes), then speed (offload)."""
    out = []
    t = profile.train
    mb = t.micro_batch_size
    while mb > 1:
        mb //= 2
        if _fits(memory(profile, nodes, gpn, micro_batch=mb), usable):
            out.append(f"smaller micro-batch: --set train.micro_batch_size={mb} (gradient accumulation grows, "
                       "the global batch stays)")
            break
    if not t.activation_checkpointing and _fits(memory(profile, nodes, gpn, checkpointing=True), usable):
        out.append("activation checkpointing: --set train.activation_checkpointing=true (~1/3 more compute)")

    def replanned(extra: list[str], n: int) -> Profile | None:
        try:
            raw = parse_profile(apply_overrides(read_profile_json(profile.source), overrides + extra), profile.source)
            return resolve(raw, profile.source, n * gpn, vocab_size)
        except ProfileError:
            return None

    for more in (2, 4, 8, 16, 32, 64):
        p = replanned([], nodes * more)
        if p and _fits(memory(p, nodes * more, gpn), usable):
            out.append(f"more GPUs: {nodes * more} nodes × {gpn} GPUs (model states shrink with the world size)")
            break
    if profile.topology.engine == "pipeline":
        s = profile.topology.pipeline_stages
        while s * 2 <= min(profile.model.n_layers, nodes * gpn):
            s *= 2
            p = replanned([f"topology.pipeline_stages={s}"], nodes)
            if p and _fits(memory(p, nodes, gpn), usable):
                out.append(f"more pipeline stages: --set topology.pipeline_stages={s}")
                break
    else:
        for stage in range(profile.zero_stage + 1, 4):  # more partitioned, more communication
            p = replanned([f"deepspeed.zero_optimization.stage={stage}"], nodes)
            if p and _fits(memory(p, nodes, gpn), usable):
                out.append(f"a higher ZeRO stage: --set deepspeed.zero_optimization.stage={stage} (more communication "
                           "per step)")
                break
        off_opt, off_param = _offload(profile)
        if not off_opt:
            p = replanned(['deepspeed.zero_optimization.offload_optimizer={"device": "cpu", "pin_memory": true}'],
                          nodes)
            if p and _fits(memory(p, nodes, gpn), usable):
                m = memory(p, nodes, gpn)
                out.append("offload optimizer states to CPU: --set deepspeed.zero_optimization.offload_optimizer="
                           f"'{{\"device\": \"cpu\", \"pin_memory\": true}}' (needs {m.host_per_node / GiB:.0f} GiB "
                           "host memory per node; steps get slower)")
        if not off_param:
            p = replanned(['deepspeed.zero_optimization.offload_optimizer={"device": "cpu", "pin_memory": true}',
                           'deepspeed.zero_optimization.offload_param={"device": "cpu", "pin_memory": true}'], nodes)
            if p and _fits(memory(p, nodes, gpn), usable):
                m = memory(p, nodes, gpn)
                out.append("offload optimizer states and weights to CPU (offload_optimizer and offload_param "
                           f"device cpu; needs {m.host_per_node / GiB:.0f} GiB host memory per node; much slower)")
    cheap = ["train.activation_checkpointing=true", "train.micro_batch_size=1"]
    if not out and not combined and (t.micro_batch_size > 1 or not t.activation_checkpointing):
        # No single change is enough: try each again on top of the two that cost no memory to apply.
        p = replanned(cheap, nodes)
        if p is not None:
            both = "--set train.activation_checkpointing=true --set train.micro_batch_size=1"
            if _fits(memory(p, nodes, gpn), usable):
                return [both]
            out = [f"{both}, and {w}" for w in _ways_out(p, nodes, gpn, usable, overrides + cheap, vocab_size, True)]
    return out


def make_plan(profile: Profile, nodes: int, gpus_per_node: int, gpu: str, mfu: float,
              overrides: list[str] = (), vocab_size: int | None = None) -> Plan:
    mem = memory(profile, nodes, gpus_per_node)
    plan = Plan(profile, nodes, gpus_per_node, gpu, mfu, mem, GPU_MEMORY[gpu],
                flops_per_token(profile.model, profile.data.seq_len))
    hpz = profile.deepspeed.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    if isinstance(hpz, int) and hpz > 1 and gpus_per_node % hpz:
        plan.refusals.append(f"deepspeed.zero_optimization.zero_hpz_partition_size={hpz} does not divide the "
                             f"{gpus_per_node} GPUs of a node: the secondary weight copy would cross nodes; set it "
                             f"to {gpus_per_node}")
    if not _fits(mem, plan.usable):
        plan.refusals.append(
            f"needs {mem.total / GiB:.1f} GiB per GPU (model states {mem.model_states / GiB:.1f}, activations "
            f"{mem.activations / GiB:.1f}, runtime {RUNTIME_RESERVE / GiB:.0f}) but a {gpu} offers "
            f"{plan.usable / GiB:.1f} GiB ({1 - HEADROOM:.0%} of {plan.gpu_memory / GiB:.0f})")
        plan.ways_out = _ways_out(profile, nodes, gpus_per_node, plan.usable, list(overrides), vocab_size)
    return plan


def _gib(b: float) -> str:
    return f"{b / GiB:8.2f} GiB"


def format_plan(plan: Plan) -> str:
    p, m = plan.profile, plan.memory
    cfg, t = p.model, p.train
    lines = [
        f"profile          {p.source}",
        f"cluster          {plan.nodes} node(s) × {plan.gpus_per_node} {plan.gpu} = {plan.world} GPUs "
        f"(engine {p.topology.engine}, data-parallel {p.data_parallel_size}, pipeline stages "
        f"{p.topology.pipeline_stages})",
        f"model            {cfg.num_params() / 1e9:.3f} B parameters ({cfg.n_layers} layers, dim {cfg.dim}, "
        f"ffn {cfg.ffn_dim}, heads {cfg.n_heads}/{cfg.kv_heads} kv, vocab {cfg.vocab_size})",
        f"FLOPs per token  {plan.flops_per_token / 1e9:.2f} GFLOP (6N + 12·L·d·T, training)",
        f"batch            {p.global_batch_size} sequences × {p.data.seq_len} = {p.tokens_per_step:,} tokens per step "
        f"(micro-batch {t.micro_batch_size} × accumulation {p.grad_accum_steps} × data-parallel "
        f"{p.data_parallel_size})",
        f"run              {t.steps:,} steps = {p.total_tokens / 1e9:,.1f} B tokens"
        + (f" (budget train.total_tokens={t.total_tokens:,})" if t.total_tokens else ""),
        f"schedule         peak lr {t.lr:g}, warmup {t.warmup_steps} steps, cosine to {t.min_lr_ratio:g}× peak, "
        f"weight decay {t.weight_decay:g}, clip {t.grad_clip:g}, {t.precision}",
        "",
        "memory per GPU (model states)",
    ]
    for k, v in m.states.items():
        lines.append(f"  {k:<40}{_gib(v)}")
    lines.append(f"  {'total (this planner)':<40}{_gib(m.model_states)}")
    if m.deepspeed_estimate is not None:
        lines.append(f"  {'DeepSpeed ' + m.estimator:<40}{_gib(m.deepspeed_estimate)}"
                     + ("   (no hpZ copy in DeepSpeed's formula)" if any("hpZ" in k for k in m.states) else ""))
    else:
        lines.append(f"  {'DeepSpeed estimator':<40}     n/a   (it covers ZeRO-2 and ZeRO-3 with mixed precision only)")
    if m.host_per_node:
        lines.append(f"  {'host memory per node (offloaded)':<40}{_gib(m.host_per_node)}")
    lines += [
        "memory per GPU (activations, one micro-batch"
        + (f", {min(p.topology.pipeline_stages, p.grad_accum_steps)} in flight" if p.topology.engine == "pipeline"
           else "") + ")",
        f"  {'with activation checkpointing':<40}{_gib(m.activations_checkpointed)}"
        + ("   ← this profile" if m.checkpointing else ""),
        f"  {'without':<40}{_gib(m.activations_full)}" + ("" if m.checkpointing else "   ← this profile"),
        f"  {'runtime reserve (CUDA, NCCL)':<40}{_gib(RUNTIME_RESERVE)}",
        f"  {'total':<40}{_gib(m.total)}   of {plan.usable / GiB:.1f} GiB usable on a {plan.gpu}",
        "",
    ]
    hours = plan.seconds / 3600
    lines.append(f"time at {plan.mfu:.0%} MFU   {hours:,.1f} h wall-clock ({hours / 24:,.1f} days), "
                 f"{hours * plan.world:,.0f} GPU-hours on {plan.world} {plan.gpu} "
                 f"(peak {PEAK_FLOPS[plan.gpu] / 1e12:.0f} TFLOP/s bf16 dense)")
    if plan.fits:
        lines.append("verdict          fits")
    else:
        lines += [f"REFUSED          {r}" for r in plan.refusals]
        if plan.ways_out:
            lines.append(f"cheapest way out {plan.ways_out[0]}")
            lines += [f"  or             {w}" for w in plan.ways_out[1:]]
        elif not _fits(m, plan.usable):
            lines.append("no change found that fits; use a smaller model or a larger GPU")
    return "\n".join(lines)


def _vocab_from_manifest(path: str) -> int | None:
    from pipeline.data import Manifest, ManifestError

    try:
        return Manifest.load(path).tokenizer.vocab_size
    except ManifestError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="JSON profile (see ds_configs/)")
    ap.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPU_MEMORY), help="GPU kind (default h100-80gb)")
    ap.add_argument("--mfu", type=float, default=0.40,
                    help="model FLOPs utilisation assumed for the time estimate (default 0.40)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a profile value, as the trainer's --set (repeatable)")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        ap.error("--nodes and --gpus-per-node must be at least 1")
    if not 0 < args.mfu <= 1:
        ap.error("--mfu must be in (0, 1]")
    try:
        raw = parse_profile(apply_overrides(read_profile_json(args.profile), args.overrides), args.profile)
        vocab = None
        if raw.model.vocab_size == "auto":
            vocab = _vocab_from_manifest(raw.data.manifest)
            if vocab is None:
                vocab = PRESETS[raw.model.preset].vocab_size
                print(f"note: model.vocab_size is \"auto\" and {raw.data.manifest} is not readable; planning with "
                      f"the preset's {vocab}", file=sys.stderr)
        profile = resolve(raw, args.profile, args.nodes * args.gpus_per_node, vocab)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(profile, args.nodes, args.gpus_per_node, args.gpu, args.mfu, args.overrides, vocab)
    print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
