# One command sets up and runs the main job; one command runs the tests.
#   make demo        virtual environment + install + the whole pipeline on the built-in corpus
#   make test        the test suite (real DeepSpeed processes on the CPU; datatrove in .venv-bench)
#   make gpu-bundle  on a machine with a registry: gpu-bundle/, what a GPU machine lacks for the check
#   make gpu-check   on a machine with NVIDIA GPUs: prove the GPU path and measure it (docs/gpu.md);
#                    GPU_ARGS=--dry-run prints its plan here. Without make: bash launch/gpu_check.sh
#   make tf4-env     transformers 4.x beside the 5.x of the main venv (the export's tokenizer must load in both)
#   make llamacpp-env llama.cpp's Python binding, built from source (~10 min on 2 cores): the tests run
#                    the GGUF files of pipeline/to_gguf.py in it
PYTHON ?= python3
VENV   ?= .venv
OUT    ?= runs/demo
# make gpu-check: the bundle's wheels go into GPU_VENV beside the machine's own torch; GPU_ARGS are
# passed to launch/gpu_check.py, e.g. GPU_ARGS="--steps c,a --budget-s 600" or GPU_ARGS=--dry-run.
BUNDLE   ?= gpu-bundle
GPU_VENV ?= .venv-gpu
GPU_OUT  ?= runs/gpu-check
GPU_ARGS ?=

# transformers 4.x, tokenizers only (no torch): the test that exported tokenizers load in 4.x runs in it.
TF4_VENV ?= .venv-tf4
BENCH_VENV ?= .venv-bench
# llama.cpp (through llama-cpp-python, which builds it from source: PyPI has no wheel), in a venv
# that sees the main venv's packages, as the bench venv does.
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# make test: pytest-xdist workers. Each runs 2-process DeepSpeed jobs and builds its own copy of the
# suite's session fixtures (prepared data, the reference runs), so more than the cores is slower.
TEST_WORKERS ?= 2

.PHONY: demo test install bench-install clean-demo gpu-check gpu-bundle tf4-env llamacpp-env beside-main

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
	$(MAKE) -s beside-main DIR=$(BENCH_VENV)
	$(VENV)/bin/pip --python $(BENCH_VENV)/bin/python install --quiet -r bench/requirements-bench.txt
	touch $@

llamacpp-env: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: $(VENV)/.installed
	$(MAKE) -s beside-main DIR=$(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(VENV)/bin/pip --python $(LLAMACPP_VENV)/bin/python install --quiet "llama-cpp-python==0.3.36"
	touch $@

# A venv without pip that sees the main venv's packages through a .pth file: what it installs
# itself comes first (DIR=path).
beside-main:
	$(VENV)/bin/python -m venv --without-pip $(DIR)
	$(VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(DIR)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main-packages.pth"

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
test: install tf4-env bench-install llamacpp-env
	TF4_PYTHON="$(abspath $(TF4_VENV))/bin/python" LLAMACPP_PYTHON="$(abspath $(LLAMACPP_VENV))/bin/python" PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25 tests || [ $$? -eq 5 ]

tf4-env: $(TF4_VENV)/.installed

$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install --quiet "transformers>=4.57,<5" sentencepiece protobuf
	touch $@

clean-demo:
	rm -rf $(OUT)

# The GPU bundle (launch/gpu_bundle.py): wheels of what the check imports and the GPU image
# (launch/gpu_image.txt) lacks, and one prepared data set; built once, again when its inputs change.
gpu-bundle: $(BUNDLE)/bundle.json

$(BUNDLE)/bundle.json: $(VENV)/.installed requirements.txt launch/gpu_image.txt launch/gpu_bundle.py data_prep/configs/demo.json
	$(VENV)/bin/python launch/gpu_bundle.py --out $(BUNDLE)

# A dry run needs no GPU and no install: the plan, from this machine's environment. A real run
# installs the bundle (pip --no-index, never over the machine's torch) and runs the check, as the
# one-line command of docs/gpu.md does on a machine without make.
ifneq ($(filter --dry-run,$(GPU_ARGS)),)
gpu-check: install $(BUNDLE)/bundle.json
	$(VENV)/bin/python launch/gpu_check.py --bundle $(BUNDLE) --out $(GPU_OUT) $(GPU_ARGS)
else
gpu-check:
	PYTHON=$(PYTHON) GPU_VENV=$(GPU_VENV) bash launch/gpu_check.sh --bundle $(BUNDLE) --out $(GPU_OUT) $(GPU_ARGS)
endif
