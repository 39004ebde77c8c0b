# Every setup step lives here: `make train` and `make test` work on a fresh clone.
# The stack is pinned to versions that load together on Python 3.11 (see README "Stack").
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.stack-installed
EXT_STAMP := $(VENV)/.ext-built

.PHONY: venv train train-dist test install-check sweep calibrate clean

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
	$(VPY) -m pip install -q tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy pyarrow \
	    torchx hydra-core pytest hypothesis matplotlib iopath
	touch $(STAMP)

# The main job: full, FIITED and the hashing trick at budget 0.1 on the hard synthetic data,
# then their table.
TRAIN_DIR ?= outputs/make_train
train: venv ext
	rm -rf $(TRAIN_DIR)
	$(VPY) -m torchrec_fiited.train -m emb=full,fiited,hash budget=0.1 train.progress=false \
	    hydra.sweep.dir=$(TRAIN_DIR) $(ARGS)
	$(VPY) -m torchrec_fiited.report $(TRAIN_DIR)

# The hard data's calibration (README "Hard synthetic data"), seeds 0-2: full, hashing and the
# frequency oracle at 10x fewer rows, full at a quarter of the dimension; checks (a)-(c).
CAL_DIR ?= multirun/calibrate
calibrate: venv ext
	rm -rf $(CAL_DIR)
	$(VPY) -m torchrec_fiited.train -m emb=full,hash,freq_oracle budget=0.1 seed=0,1,2 \
	    train.progress=false hydra.sweep.dir=$(CAL_DIR)/arms $(ARGS)
	$(VPY) -m torchrec_fiited.train -m emb=full label=full_d4 model.embedding_dim=4 \
	    'model.dense_arch=[64,4]' seed=0,1,2 train.progress=false hydra.sweep.dir=$(CAL_DIR)/d4 $(ARGS)
	$(VPY) -m torchrec_fiited.calibration $(CAL_DIR)

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

# The equal-bytes sweep on the hard data, 3 seeds: the FIITED family (4 methods x 3 budgets),
# hash/qr/mixed_dim from 2x to 1000x (9 budgets), the frequency oracle, full; then the report.
# One thread per run (OMP_NUM_THREADS=1): the figures in docs/budget_sweep were taken so.
SWEEP_DIR ?= multirun/budget_sweep
sweep: venv ext
	rm -rf $(SWEEP_DIR)
	OMP_NUM_THREADS=1 $(VPY) -m torchrec_fiited.train -m +experiment=budget_sweep \
	    hydra.sweep.dir=$(SWEEP_DIR)/fiited $(ARGS)
	OMP_NUM_THREADS=1 $(VPY) -m torchrec_fiited.train -m +experiment=budget_sweep_baselines \
	    hydra.sweep.dir=$(SWEEP_DIR)/baselines $(ARGS)
	OMP_NUM_THREADS=1 $(VPY) -m torchrec_fiited.train -m +experiment=budget_sweep_baselines \
	    emb=freq_oracle budget=0.1,0.01,0.001 hydra.sweep.dir=$(SWEEP_DIR)/oracle $(ARGS)
	OMP_NUM_THREADS=1 $(VPY) -m torchrec_fiited.train -m emb=full budget=1.0 seed=0,1,2 \
	    train.progress=false hydra.sweep.dir=$(SWEEP_DIR)/full $(ARGS)
	$(VPY) -m torchrec_fiited.report $(SWEEP_DIR) --out docs/budget_sweep

clean:
	rm -rf $(VENV) build dist *.egg-info torchrec_fiited/_C*.so
