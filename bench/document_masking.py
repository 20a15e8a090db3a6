"""Document masking's attention kernel against plain causal SDPA, on a GPU.

The same work on both sides: one attention call (forward and backward) of a LLaMA-7B layer's
shape, 32 heads × 128, on windows of --seq tokens that pack documents of about
--mean-doc-tokens each (exponential lengths, fixed seed), bf16:

- ours: `pipeline.model.attend` under `document_mask` (FlexAttention, compiled, with a block
  mask: blocks wholly outside every document are skipped);
- peer: `F.scaled_dot_product_attention(is_causal=True)`, torch's fused causal kernel (flash),
  which attends across documents;
- agreement: the output and the gradients of q, k and v against a float32 reference (SDPA with
  the same mask as a dense boolean tensor, the CPU path, on the inputs upcast), as the relative
  error ‖ours − ref‖ / ‖ref‖; SDPA with the dense mask in bf16 beside it shows what bf16 alone
  costs (bf16 operands land between 1e-3 and 1e-2).

    python bench/document_masking.py [--seq 4096] [--batch 1] [--mean-doc-tokens 1024] [--iters 20] [--json FILE]

Each time is the median of --iters calls after 3 untimed ones (CUDA events on a GPU, so the
compile stays out of it). Prints milliseconds per call, the ratio and the errors; --json writes
them too (the GPU check's step e reads it). --device cpu runs the same script on small shapes
to check the script and its agreement check; there "ours" is the CPU path, SDPA with the dense
mask (`document_mask` on CPU tensors), as FlexAttention has no backward on the CPU, so its times
say nothing of the kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import attend, document_layout, document_mask  # noqa: E402

EOS = 2


def packed_tokens(batch: int, seq: int, mean_doc: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (batch, seq), generator=g)
    for row in tokens:
        pos = 0
        while True:
            pos += max(1, int(torch.empty(1).exponential_(1 / mean_doc, generator=g).item()))
            if pos >= seq:
                break
            row[pos - 1] = EOS
    return tokens.to(device)


def timed(fn, iters: int, dev: torch.device) -> float:
    """Milliseconds per call: the median of `iters` calls after 3 untimed ones."""
    for _ in range(3):
        fn()
    if dev.type != "cuda":
        times = []
        for _ in range(iters):
            tic = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tic) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def forward_backward(q, k, v, grad, mask, dtype) -> list[torch.Tensor]:
    """[output, dq, dk, dv] of attention under `mask`, from the inputs cast to `dtype`, in float32."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = attend(qq, kk, vv, mask, False)
    out.backward(grad.to(dtype))
    return [x.detach().float() for x in (out, qq.grad, kk.grad, vv.grad)]


def relative_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(‖out − ref‖ / ‖ref‖, the largest of the same for dq, dk, dv); NaN stays NaN."""
    rel = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
    return rel[0], max(rel[1:], key=lambda x: float("inf") if x != x else x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mean-doc-tokens", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a check of this script on small shapes, not a measurement of the kernel")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (FlexAttention is compiled for it); "
              "--device cpu checks the script only", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    tokens = packed_tokens(args.batch, args.seq, args.mean_doc_tokens, dev)
    doc, _ = document_layout(tokens, EOS)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=dev, dtype=torch.bfloat16)

    def step(mask):
        def run():
            out = attend(q, k, v, mask, False)
            out.backward(grad)
        return run

    block_mask = document_mask(doc)
    ours = timed(step(block_mask), args.iters, dev)
    causal = timed(step(None), args.iters, dev)
    dense = document_mask(doc, flex=False)
    reference = forward_backward(q, k, v, grad, dense, torch.float32)
    ours_bf16 = forward_backward(q, k, v, grad, block_mask, torch.bfloat16)
    dense_bf16 = forward_backward(q, k, v, grad, dense, torch.bfloat16)
    ours_rel, dense_rel = relative_errors(ours_bf16, reference), relative_errors(dense_bf16, reference)
    diff = (ours_bf16[0] - dense_bf16[0]).abs().max().item()  # the two outputs, as computed in bf16
    docs = int(doc.max(dim=1).values.sum().item()) + args.batch
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (ours: SDPA with the dense mask; no FlexAttention)"
    print(f"{device}: batch {args.batch} × {args.seq} tokens, {docs} documents, "
          f"{args.heads} heads × {args.head_dim}, bf16, forward + backward")
    print(f"  document masking (FlexAttention, block mask)  {ours:8.3f} ms")
    print(f"  causal SDPA (attends across documents)         {causal:8.3f} ms")
    print(f"  ratio ours / causal                            {ours / causal:8.2f}x")
    print(f"  relative error against fp32, output / gradients: ours {ours_rel[0]:.2e} / {ours_rel[1]:.2e}, "
          f"SDPA with the dense mask in bf16 {dense_rel[0]:.2e} / {dense_rel[1]:.2e}")
    print(f"  largest difference from SDPA with the dense mask in bf16: {diff:.3g}")
    if args.json:
        figures = {"device": device, "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
                   "heads": args.heads, "head_dim": args.head_dim, "documents": docs, "iters": args.iters,
                   "document_masking_ms": ours, "causal_sdpa_ms": causal, "ratio": ours / causal,
                   "max_abs_diff_from_dense_mask": diff, "rel_error_out": ours_rel[0],
                   "rel_error_grads": ours_rel[1], "dense_bf16_rel_error_out": dense_rel[0],
                   "dense_bf16_rel_error_grads": dense_rel[1], "timing": f"median of {args.iters} calls"}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
