#!/usr/bin/env bash
# Pretrain LLaMA-7B. Two ways to start it, same result:
#
#   bash launch/pretrain_7b.sh [options] [trainer arguments]
#   deepspeed [launcher options] launch/pretrain_7b.sh [--profile F] [--out D] [trainer arguments]
#
# This file is both a bash script and a Python program. The deepspeed launcher starts one
# process per GPU and runs its script *with Python* (`python -u SCRIPT --local_rank=N ...`)
# unless given --no_python. Bash reads the line `""":"` below as the no-op command `:` and runs
# the bash part, which ends in `exit`; Python reads the same line as the start of a string that
# ends at the line `":"""`, skips the bash part and runs the Python part at the bottom. The bash
# form therefore just calls the deepspeed launcher on this very file, and both forms end in the
# Python part: read launch/env.sh, then run `pipeline.train` in this process.
#
# Options (bash form; each also an environment variable, defaults in launch/env.sh):
#   --profile FILE       PROFILE        JSON profile (default ds_configs/7b_zero3.json)
#   --out DIR            OUT_DIR        run directory: checkpoints/, logs/, metrics.jsonl, profile.json
#   --resume MODE        RESUME         auto (newest complete checkpoint, the default) | none | global_stepN
#   --hostfile FILE      HOSTFILE       MPI-style hostfile ("node-1 slots=8" per line); none: this node only
#   --nodes N            NNODES         use the first N hosts of the hostfile
#   --gpus-per-node N    GPUS_PER_NODE  processes per node (default: all GPUs)
#   --master-addr ADDR   MASTER_ADDR    address of node 0 (default: found via the hostfile's first host)
#   --master-port PORT   MASTER_PORT    rendezvous port (default 29500)
#   --launcher NAME      LAUNCHER       how the launcher reaches the other nodes: pdsh (default), openmpi, mvapich
#   --node-rank K        NODE_RANK      start only this node's processes, without ssh (SLURM: one launcher per
#                                       node; needs --hostfile and --master-addr)
#   --dry-run                           print the deepspeed command and stop
#   -h, --help                          this text
# Anything else (e.g. --set train.steps=100) is passed to the trainer (`python -m pipeline.train --help`).
#
# Logs: the launcher's output (every rank's, pdsh prefixes remote lines with the host) is also
# appended to OUT/logs/launch-node<K>-<time>.log.
""":"
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/env.sh
source "$here/env.sh"

usage() { awk 'NR > 1 && /^"/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

extra=()
dry_run=0
need() { [[ $# -ge 2 ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) need "$@"; PROFILE="$2"; shift 2 ;;
    --out) need "$@"; OUT_DIR="$2"; shift 2 ;;
    --resume) need "$@"; RESUME="$2"; shift 2 ;;
    --hostfile) need "$@"; HOSTFILE="$2"; shift 2 ;;
    --nodes) need "$@"; NNODES="$2"; shift 2 ;;
    --gpus-per-node) need "$@"; GPUS_PER_NODE="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT="$2"; shift 2 ;;
    --launcher) need "$@"; LAUNCHER="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

case "$LAUNCHER" in pdsh|openmpi|mvapich) ;; *)
  echo "error: --launcher must be pdsh, openmpi or mvapich (got $LAUNCHER)" >&2; exit 2 ;;
esac
[[ -f "$PROFILE" ]] || { echo "error: --profile $PROFILE: no such file" >&2; exit 2; }
if [[ -n "${HOSTFILE:-}" && ! -f "$HOSTFILE" ]]; then
  echo "error: --hostfile $HOSTFILE: no such file" >&2; exit 2
fi
if [[ -n "${NODE_RANK:-}" ]]; then
  [[ -n "${HOSTFILE:-}" && -n "${MASTER_ADDR:-}" ]] || {
    echo "error: --node-rank needs --hostfile (all nodes) and --master-addr (node 0)" >&2; exit 2; }
fi

cmd=("${DEEPSPEED:-deepspeed}")
if [[ -n "${HOSTFILE:-}" ]]; then
  cmd+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
else
  # No hostfile: this node only. (An empty path stops the launcher from picking up /job/hostfile.)
  cmd+=(--hostfile /dev/null)
fi
[[ -n "${NNODES:-}" ]] && cmd+=(--num_nodes "$NNODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && cmd+=(--num_gpus "$GPUS_PER_NODE")
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--master_port "$MASTER_PORT")
[[ -n "${NODE_RANK:-}" ]] && cmd+=(--no_ssh --node_rank "$NODE_RANK")
cmd+=("$here/pretrain_7b.sh" --profile "$PROFILE" --out "$OUT_DIR" --resume "$RESUME" ${extra[@]+"${extra[@]}"})

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$OUT_DIR/logs"
log="$OUT_DIR/logs/launch-node${NODE_RANK:-0}-$(date +%Y%m%d-%H%M%S).log"
echo "launch: $(printf '%q ' "${cmd[@]}")" | tee -a "$log"
# SIGUSR1 asks the trainers to checkpoint at the next step boundary and exit (SLURM's
# --signal=USR1@600, or `scancel --signal=USR1 JOB`). Ignored here and, by inheritance, by tee
# and the launcher processes, so they outlive the trainers instead of dying on it.
trap '' USR1
set +e
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "launch: exit status $status (log $log)" | tee -a "$log"
exit "$status"
":"""
# ---- Python part: one process per GPU, started by the deepspeed launcher ----
import os
import re
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
# The same defaults the bash part sourced; values already in the environment win.
with open(os.path.join(here, "env.sh")) as f:
    for line in f:
        m = re.match(r'^export (\w+)="\$\{\1:-(.*)\}"', line)
        if m:
            os.environ.setdefault(m.group(1), m.group(2))
sys.path.insert(0, root)
argv = sys.argv[1:]
for flag, env in (("--profile", "PROFILE"), ("--out", "OUT_DIR"), ("--resume", "RESUME")):
    if not any(a == flag or a.startswith(flag + "=") for a in argv):
        argv += [flag, os.environ[env]]

from pipeline.distributed import exit_process  # noqa: E402
from pipeline.train import main  # noqa: E402

exit_process(main(argv))
