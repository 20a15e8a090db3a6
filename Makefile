# One command sets up and runs the main job; one command runs the tests.
#   make demo        virtual environment + install + the whole pipeline on the built-in corpus
#   make test        the test suite (real DeepSpeed processes on the CPU; datatrove in .venv-bench)
#   make gpu-check   on a machine with NVIDIA GPUs: prove the GPU path and measure it (docs/gpu.md)
#   make gpu-wheels  on a machine with a registry: the wheel directory for a GPU machine without one
#   make tf4-env     transformers 4.x beside the 5.x of the main venv (the export's tokenizer must load in both)
PYTHON ?= python3
VENV   ?= .venv
OUT    ?= runs/demo
# make gpu-check: WHEELS=DIR installs from that directory only (no registry); GPU_ARGS are passed
# to launch/gpu_check.py, e.g. GPU_ARGS="--steps a,c" or GPU_ARGS=--dry-run.
GPU_VENV ?= .venv-gpu
GPU_OUT  ?= runs/gpu-check
GPU_ARGS ?=
WHEELS   ?=
# make gpu-wheels: HAVE=FILE is `python3 -m pip freeze` of the GPU machine (what it need not be sent).
HAVE     ?=

# transformers 4.x, tokenizers only (no torch): the test that exported tokenizers load in 4.x runs in it.
TF4_VENV ?= .venv-tf4
BENCH_VENV ?= .venv-bench
# make test: pytest-xdist workers. Each runs 2-process DeepSpeed jobs and builds its own copy of the
# suite's session fixtures (prepared data, the reference runs), so more than the cores is slower.
TEST_WORKERS ?= 2

.PHONY: demo test install bench-install clean-demo gpu-check gpu-install gpu-wheels tf4-env

install: $(VENV)/.installed $(VENV)/.ds-ops

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: install
	VENV=$(VENV) OUT=$(OUT) bash launch/demo.sh

# datatrove, the reference the quality filters are tested against (tests/data_prep/test_filters.py)
# and the peer of bench/, needs xxhash<4, which the main environment cannot have: a venv that
# sees the main venv's packages through a .pth file and holds only datatrove's own pins in front.
bench-install: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: bench/requirements-bench.txt $(VENV)/.installed
	$(VENV)/bin/python -m venv --without-pip $(BENCH_VENV)
	$(VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(BENCH_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main-packages.pth"
	$(VENV)/bin/pip --python $(BENCH_VENV)/bin/python install --quiet -r bench/requirements-bench.txt
	touch $@

# DeepSpeed compiles its CPU ops (shared-memory all-reduce, CPU Adam) on first use, under a lock
# file in ~/.cache/torch_extensions. Built with the environment, once, no test's timeout can kill
# a compile half-way and leave that lock behind, on which every later DeepSpeed process would
# wait forever. The venv's ninja first on PATH, as for the tests and launch/demo.sh: the system's
# ninja hashes the compile commands differently, and each switch would compile the ops again.
$(VENV)/.ds-ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -c "from deepspeed.ops.op_builder.cpu \
	  import CPUAdamBuilder, ShareMemCommBuilder; [b().load(verbose=False) for b in (ShareMemCommBuilder, CPUAdamBuilder)]"
	touch $@

# pytest exits 5 when it collects no tests; that is not a failure of the suite itself.
test: install tf4-env bench-install
	TF4_PYTHON="$(abspath $(TF4_VENV))/bin/python" PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25 tests || [ $$? -eq 5 ]

tf4-env: $(TF4_VENV)/.installed

$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install --quiet "transformers>=4.57,<5" sentencepiece protobuf
	touch $@

clean-demo:
	rm -rf $(OUT)

# The GPU check runs on the machine's own CUDA build of torch and never replaces it: a venv that
# sees the machine's packages, with everything of requirements.txt but torch installed into it.
gpu-install: $(GPU_VENV)/.installed

$(GPU_VENV)/.installed: requirements.txt
	@$(PYTHON) -c "import torch" || { echo "error: $(PYTHON) cannot import torch; make gpu-check uses the machine's own (CUDA) torch: set PYTHON=" >&2; exit 2; }
	@# No pip or setuptools of its own: the machine's pip installs into it (pip --python), and the
	@# machine's setuptools stays visible (Python <= 3.11 would put an older one in, which torch's
	@# extension builds and its requirement setuptools>=77 then find instead).
	$(PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV)
	@# --system-site-packages shows the base interpreter's packages only; where PYTHON is itself a
	@# venv (CUDA images often keep torch in one), a .pth file shows that venv's packages too.
	$(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(GPU_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/machine-packages.pth"
	grep -v '^torch==' requirements.txt > $(GPU_VENV)/requirements.txt
	@# A constraint on the machine's own torch: pip fails rather than replace it.
	$(GPU_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(GPU_VENV)/keep-torch.txt
ifneq ($(WHEELS),)
	@# No registry: the directory's wheels only; packages it has no wheel for stay at the machine's version.
	$(PYTHON) -m pip --python $(GPU_VENV)/bin/python install --quiet -c $(GPU_VENV)/keep-torch.txt --no-index --find-links $(WHEELS) $(WHEELS)/*.whl
else
	$(PYTHON) -m pip --python $(GPU_VENV)/bin/python install --quiet -c $(GPU_VENV)/keep-torch.txt -r $(GPU_VENV)/requirements.txt
endif
	touch $@

gpu-check: gpu-install
	PATH="$(abspath $(GPU_VENV))/bin:$$PATH" $(GPU_VENV)/bin/python launch/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)

gpu-wheels: install
	$(VENV)/bin/python launch/gpu_wheels.py --out $(or $(WHEELS),gpu-wheels) $(if $(HAVE),--have $(HAVE))
