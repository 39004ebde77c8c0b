# Every setup step lives here: `make train` and `make test` work on a fresh clone.
# The stack is pinned to versions that load together on Python 3.11 (see README "Stack").
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.stack-installed
EXT_STAMP := $(VENV)/.ext-built

.PHONY: venv train train-dist test install-check sweep clean

# Native kernels (C++ CPU ops, CUDA compile check): targets `ext` and `nvcc-check`.
include cuda/build.mk

venv: $(STAMP)

# The third-party stack. torch first and exact, so pip takes the local CPU wheel instead of
# pulling CUDA wheels; torchrec with --no-deps because it names the CUDA package fbgemm-gpu.
# The package itself is installed by `ext` (cuda/build.mk): `pip install -e .` builds the native ops.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q fbgemm-gpu-cpu==1.8.0
	$(VPY) -m pip install -q --no-deps torchrec==1.8.0
	$(VPY) -m pip install -q tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy \
	    torchx hydra-core pytest hypothesis matplotlib iopath
	touch $(STAMP)

# The main job: full vs FIITED at the default budget on the synthetic data, then their table.
TRAIN_DIR ?= outputs/make_train
train: venv ext
	rm -rf $(TRAIN_DIR)
	$(VPY) -m torchrec_fiited.train -m emb=full,fiited train.progress=false \
	    hydra.sweep.dir=$(TRAIN_DIR) $(ARGS)
	$(VPY) -m torchrec_fiited.report $(TRAIN_DIR)

# The same app on 2 processes (gloo on CPU): torchrec's DMP shards the tables, rank 0 writes
# $(TRAIN_DIST_DIR)/metrics.json. DIST_EMB=fiited once the FIITED sharder is in; ARGS adds overrides.
TRAIN_DIST_DIR ?= outputs/make_train_dist
DIST_EMB ?= full
train-dist: venv ext
	rm -rf $(TRAIN_DIST_DIR)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m torchrec_fiited.train \
	    emb=$(DIST_EMB) train.progress=false hydra.run.dir=$(TRAIN_DIST_DIR) $(ARGS)

test: venv ext nvcc-check
	$(VPY) -m pytest -q tests

# Only the user-install check: a fresh venv, `pip install --no-build-isolation .` from a copy of
# the sources, the native ops loaded, `python -m torchrec_fiited.train train.steps=5`, pip check.
install-check: venv
	$(VPY) -m pytest -q tests/packaging

# The budget sweep (issue 3's preset): 5 methods x 6 budgets x 3 seeds, plus full x 3 seeds.
SWEEP_DIR ?= multirun/budget_sweep
sweep: venv ext
	rm -rf $(SWEEP_DIR)
	$(VPY) -m torchrec_fiited.train -m +experiment=budget_sweep hydra.sweep.dir=$(SWEEP_DIR)/methods $(ARGS)
	$(VPY) -m torchrec_fiited.train -m +experiment=budget_sweep emb=full budget=1.0 \
	    hydra.sweep.dir=$(SWEEP_DIR)/full $(ARGS)
	$(VPY) -m torchrec_fiited.report $(SWEEP_DIR)

clean:
	rm -rf $(VENV) build dist *.egg-info torchrec_fiited/_C*.so
