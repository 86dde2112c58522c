# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo_data
DEMO_OUT ?= outputs/demo

.PHONY: demo test venv clean

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
	$(BIN)/charseg generate $(DEMO_DATA) --num-images 48 --size 128x128 --seed 1

# Trains from random init on CPU in a few minutes; the loss falls from ~6 to ~2.
demo: $(VENV)/.installed $(DEMO_DATA)/images
	$(BIN)/charseg train $(DEMO_DATA) --weights none --backbone resnet18 --min-size 128 --max-size 128 \
		--roi-samples 128 --rpn-proposals-train 500 --epochs 4 --output-dir $(DEMO_OUT)
	@echo "checkpoints: $(DEMO_OUT)/model_epoch_00N.pth and $(DEMO_OUT)/model_final.pth"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DATA) outputs
