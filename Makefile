# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo_data
DEMO_HELDOUT ?= demo_heldout
DEMO_OUT ?= outputs/demo

.PHONY: demo test test-fast venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files so the (large) install runs again only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

$(DEMO_DATA)/images: | $(VENV)/.installed
	$(BIN)/charseg generate $(DEMO_DATA) --layout lines --num-images 220 --size 192x192 --chars-per-image 10-80 --font-size 12-30 --seed 1

$(DEMO_HELDOUT)/images: | $(VENV)/.installed
	$(BIN)/charseg generate $(DEMO_HELDOUT) --held-out --num-images 40 --seed 2026

# Trains through `mlflow run` from random init on the CPU (about 10 minutes on 2 cores), then prints
# what the final model scores on held-out pages made by another process (docs/QUALITY.md).
demo: $(VENV)/.installed $(DEMO_DATA)/images $(DEMO_HELDOUT)/images
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . -e train --env-manager local --experiment-name charseg-demo \
		-P data_dir=$(DEMO_DATA) -P heldout_dir=$(DEMO_HELDOUT) -P weights=none -P backbone=resnet18 -P norm=group \
		-P fpn_channels=128 -P mask_head_channels=64 -P mask_pixels=true -P mask_dice=1 -P lr_schedule=cosine -P lr=0.02 \
		-P augment=true -P epochs=6 -P val_every=3 \
		-P min_size=192 -P max_size=1024 -P scale_train=1 -P scale_test=1.25 -P detections_per_img=200 \
		-P anchor_sizes=16,32,64,128,256 \
		-P roi_samples=128 -P rpn_proposals_train=500 -P output_dir=$(DEMO_OUT) \
		-P register_as=charseg-demo
	@echo
	@echo "Checkpoints: $(DEMO_OUT)/model_epoch_00N.pth, $(DEMO_OUT)/best.pth and $(DEMO_OUT)/model_final.pth"
	@echo "Registry:    model charseg-demo; load it with mlflow.pyfunc.load_model('models:/charseg-demo@champion')"
	@echo "Runs:        $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"
	@echo "Resume:      PATH=$(abspath $(BIN)):\$$PATH $(BIN)/mlflow run . -e resume --env-manager local -P run_id=<RUN_ID> -P epochs=6"

# Every test, in one pytest-xdist worker per core (at most 4; tests/conftest.py shares the cores
# out among them and puts the slow tests first), each worker handed one test at a time as it
# frees up, except that the tests of one xdist_group (a module whose session fixture trains a run
# or starts a server) go to one worker; the slowest 15 are listed at the end so that slow tests
# stay visible.
PYTEST := $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadgroup
test: $(VENV)/.installed-test
	$(PYTEST) --durations=15

# The inner loop: everything but the tests marked slow or server (markers in pyproject.toml).
test-fast: $(VENV)/.installed-test
	$(PYTEST) -m "not slow and not server" --durations=10

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_HELDOUT) outputs mlflow.db mlruns
