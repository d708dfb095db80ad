# Two commands do all set-up: `make train` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test lint format install clean ds-ops golden test-matrix gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall when pyproject.toml changes. torch is pinned (CPU wheel here, CUDA on a GPU box).
# The dali extra (NVIDIA DALI, ~425 MB wheel) is installed so CI tests data.backend=dali for real;
# the offload extra (DeepSpeed) so the tests and benchmarks compare against DeepSpeed's ops.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,dali,offload]"
	touch $(STAMP)

# DeepSpeed's cpu_adam and async_io are JIT-built once into torch's extension cache (about 4 min
# on 2 cores; async_io needs Debian's libaio-dev and is skipped with a message without it), so
# tests and `offload.*=auto` can use them; a training run never waits for a C++ build.
DSOPS := $(VENV)/.dsops
$(DSOPS): $(STAMP)
	$(BIN)/python -m offload.build_ops
	touch $(DSOPS)

# TorchRec (DLRM/DMT) pairs with torch by minor version. Its metadata pulls an unpinned CUDA
# fbgemm-gpu that breaks `import fbgemm_gpu` on CPU, so it is installed without deps, next to the
# CPU fbgemm (on a CUDA box: make FBGEMM=fbgemm-gpu==1.8.0) and its other deps.
TORCHREC := $(VENV)/.torchrec
FBGEMM ?= fbgemm-gpu-cpu==1.8.0
$(TORCHREC): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0 $(FBGEMM)
	$(BIN)/pip install -q --disable-pip-version-check tensordict==0.15.3 torchmetrics==1.9.0 pyre-extensions==0.0.32
	touch $(TORCHREC)

install: $(STAMP) $(TORCHREC) $(DSOPS)

ds-ops: $(STAMP)  # rebuild the DeepSpeed ops (e.g. after clearing ~/.cache/torch_extensions)
	$(BIN)/python -m offload.build_ops

train: $(STAMP) $(TORCHREC)
	$(BIN)/python -m train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) $(TORCHREC) $(DSOPS) lint
	$(BIN)/python -m pytest $(ARGS)

# The whole layout matrix (issue 19): every gpt/gpt_moe layout on 1-8 ranks against the single
# process, and every invalid one's error; writes benchmarks/results/layout_matrix.{md,json}.
# The suite runs its pairwise subset (tests/distributed/test_layout_matrix.py).
test-matrix: $(STAMP) $(TORCHREC)
	$(BIN)/python -m tests.matrix.run $(ARGS)

# Every GPU path in at most 8 minutes on one GPU (issue 21): GPU tests, a ~150M bf16 run with MFU,
# checkpoint stall vs torch.save and DCP async_save, offload, grouped-GEMM MoE, DALI; writes
# benchmarks/results/gpu_suite.{md,json}. Without a GPU every step reports "skipped: no GPU".
gpu-check: $(STAMP) $(TORCHREC)
	PY=$(BIN)/python benchmarks/gpu_suite.sh $(ARGS)

# Rewrite the golden loss files (tests/golden/) from this tree; only for an intended math change,
# never to make a refactor pass (docs/testing.md): make golden ARGS='--why "..." [case ...]'
golden: $(STAMP) $(TORCHREC)
	$(BIN)/python -m tests.golden.regenerate $(ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
