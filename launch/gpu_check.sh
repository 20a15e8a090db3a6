#!/usr/bin/env bash
# The GPU check on a GPU machine without network or make, in one line:
#   bash launch/gpu_check.sh --bundle gpu-bundle --budget-s 480 --results "$OUT"
# Installs the bundle's wheels (make gpu-bundle, built elsewhere) into $GPU_VENV with
# `pip install --no-index`, beside the machine's own packages and never over its torch, then runs
# launch/gpu_check.py with every argument given here (python launch/gpu_check.py --help).
#   PYTHON    the interpreter that holds the machine's CUDA torch (default python3)
#   GPU_VENV  where the wheels go (default .venv-gpu); made again when the bundle changes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_VENV=${GPU_VENV:-.venv-gpu}

bundle=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --bundle) bundle="${args[i + 1]:-}" ;;
    --bundle=*) bundle="${args[i]#--bundle=}" ;;
  esac
done
if [ -z "$bundle" ] || [ ! -f "$bundle/bundle.json" ]; then
  echo "error: --bundle DIR: ${bundle:-(not given)}/bundle.json not found; build it with \`make gpu-bundle\` and carry it here" >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "error: $PYTHON cannot import torch; the check runs on the machine's own (CUDA) torch: set PYTHON=" >&2
  exit 2
fi

want=$(cksum < "$bundle/bundle.json")
if [ "$(cat "$GPU_VENV/.installed" 2>/dev/null)" != "$want" ]; then
  start=$(date +%s)
  rm -rf "$GPU_VENV"
  # No pip, no system site-packages: the machine's packages come in through a .pth file that adds
  # every site directory PYTHON reads (where PYTHON is itself a venv, as CUDA images often have
  # it, its own packages; `site.addsitedir` also runs their .pth files). The venv's own
  # site-packages come first, so a bundled wheel wins over the machine's copy, which stays as it is.
  "$PYTHON" -m venv --without-pip "$GPU_VENV"
  purelib=$("$GPU_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PYTHON" -c "import sys; print(''.join(f'import site; site.addsitedir({p!r})\n' for p in sys.path
                 if p.endswith(('site-packages', 'dist-packages'))), end='')" > "$purelib/machine-packages.pth"
  # pip (the machine's, seen through that file) installs into the venv, resolving against everything
  # visible, from the bundle only; the constraint makes it fail rather than shadow the machine's torch.
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$GPU_VENV/keep-torch.txt"
  "$GPU_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$bundle/wheels" -c "$GPU_VENV/keep-torch.txt" "$bundle"/wheels/*.whl
  echo "$want" > "$GPU_VENV/.installed"
  echo "installed $(ls "$bundle"/wheels/*.whl | wc -l) wheels from $bundle into $GPU_VENV in $(( $(date +%s) - start )) s"
fi
PATH="$(pwd)/$GPU_VENV/bin:$PATH" exec "$GPU_VENV/bin/python" launch/gpu_check.py "$@"
