"""Generate a continuation with an exported Hugging Face directory, using only `transformers`.

    python -m pipeline.generate runs/demo/hf --prompt "The license"
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="Hugging Face directory written by pipeline.export")
    p.add_argument("--prompt", default="Licensed under the", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true",
                   help="sample (temperature 0.8, top-p 0.95) instead of greedy decoding, the deterministic default")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = {"do_sample": True, "top_p": 0.95, "temperature": 0.8} if args.sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **sampling)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
