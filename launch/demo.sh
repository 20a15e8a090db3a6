#!/usr/bin/env bash
# The whole pipeline on the built-in corpus, on the CPU, in a few minutes:
#   read → clean → deduplicate → train a SentencePiece tokenizer → tokenize → Arrow shards
#   → train a tiny LLaMA with DeepSpeed ZeRO-3 on 2 processes through the deepspeed launcher
#   → checkpoint → export to Hugging Face → load with transformers in a fresh process and generate.
# Usually run as `make demo`, which creates the virtual environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-runs/demo}
NPROC=${NPROC:-2}
export PATH="$(pwd)/$VENV/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
start=$(date +%s)
stage() { printf '\n==> [%s] %s (%ds elapsed)\n' "$1" "$2" "$(( $(date +%s) - start ))"; }

stage 1/4 "data prep: read, clean, filter, deduplicate, train tokenizer, tokenize, shard → $OUT/prep"
if [ -f "$OUT/prep/shards/manifest.json" ]; then
  echo "already prepared: $OUT/prep/shards/manifest.json (remove $OUT to redo)"
else
  python -m data_prep run --out "$OUT/prep"
fi

stage 2/4 "train: tiny LLaMA, DeepSpeed ZeRO-3, $NPROC CPU processes → $OUT/train"
deepspeed --num_gpus "$NPROC" --module pipeline.train \
  --profile ds_configs/tiny_cpu.json --out "$OUT/train" \
  --set data.manifest="$OUT/prep/shards/manifest.json" --resume auto 2>&1 \
  | grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|FutureWarning|return func\(\*args'

stage 3/4 "export: checkpoint → Hugging Face LlamaForCausalLM → $OUT/hf"
rm -rf "$OUT/hf"
python -m pipeline.export --checkpoint "$OUT/train" --out "$OUT/hf"

stage 4/4 "load with transformers (AutoModelForCausalLM + AutoTokenizer) in a new process and generate"
python -m pipeline.generate "$OUT/hf" --prompt "Permission is hereby granted" --max-new-tokens 40

stage done "artifacts"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"  tokenizer        {out}/prep/tokenizer/tokenizer.model")
print(f"  token shards     {out}/prep/shards/manifest.json")
print(f"  prep statistics  {out}/prep/stats.json")
print(f"  checkpoints      {out}/train/checkpoints (latest: {open(out + '/train/checkpoints/latest').read().strip()})")
print(f"  metrics          {out}/train/metrics.jsonl, TensorBoard: tensorboard --logdir {out}/train/tensorboard")
print(f"  Hugging Face     {out}/hf")
losses = [json.loads(l) for l in open(f"{out}/train/metrics.jsonl")]
losses = [r["train/loss"] for r in losses if "train/loss" in r]
print(f"  training loss    {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses)} steps")
PY
