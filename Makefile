# sdexport: the whole job and the tests, each in one command (see README).
PYTHON ?= python3
VENV ?= .venv
OPTIMUM_VENV ?= .venv-optimum
BIN := $(VENV)/bin
MODEL ?= tiny
# `make engines VENV=/some/venv INSTALL=` uses an existing environment as it is (no install step).
INSTALL ?= install
OUT ?= engines/$(notdir $(abspath $(MODEL)))
DEMO_OUT ?= $(OUT)-demo
PROMPT ?= a photograph of an astronaut riding a horse
STEPS ?= 4

.PHONY: install optimum-env demo test gputest engines clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,trt]'
	touch $@

# Optimum's ORT pipeline needs transformers<4.58, so its interoperability test runs in its own venv.
optimum-env: $(OPTIMUM_VENV)/.installed
$(OPTIMUM_VENV)/.installed: tests/optimum/requirements.txt
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install -q -r tests/optimum/requirements.txt
	touch $@

# The main job on MODEL (a preset name or a diffusers directory): export -> validate -> infer -> bench.
demo: install
	$(BIN)/sdexport export $(MODEL) -o $(DEMO_OUT)
	$(BIN)/sdexport validate $(DEMO_OUT)
	$(BIN)/sdexport infer $(DEMO_OUT) --prompt "$(PROMPT)" --steps $(STEPS) -o $(DEMO_OUT)/image.png
	$(BIN)/sdexport bench $(DEMO_OUT) --steps $(STEPS) --json $(DEMO_OUT)/bench.json

# TensorRT engines for MODEL: fp16 export -> engines -> validation, all in $(OUT)/ (see README "TensorRT
# engines"). A second run rebuilds nothing. Where TensorRT engines cannot run (no GPU, or a GPU the TensorRT
# flavour refuses; `sdexport env` says why), the ONNX side is validated with ONNX Runtime and the target ends
# with a note instead of failing. Anything else that fails fails the target (exit 8 included where
# `sdexport env` says engines can run: engines built for other GPUs).
# BUILD_ARGS go to `sdexport build` (e.g. BUILD_ARGS="--compute-capability 7.5,8.6" or "--static 512x512").
BUILD_ARGS ?=
engines: $(INSTALL)
	$(BIN)/sdexport export $(MODEL) -o $(OUT) --dtype fp16
	$(BIN)/sdexport build $(OUT) --precision fp16 $(BUILD_ARGS)
	@why=$$($(BIN)/sdexport env --json | $(BIN)/python -c "import json, sys; \
	t = json.load(sys.stdin)['backends']['trt']; print('' if t['can_run'] else (t['why'] or 'no GPU'))") \
	  || exit $$?; \
	if [ -n "$$why" ]; then \
	  echo "note: the engines in $(OUT)/engines cannot run on this machine ($$why);"; \
	  echo "      validating the ONNX with ONNX Runtime instead."; \
	  $(BIN)/sdexport validate $(OUT) --backend ort || exit $$?; \
	  echo "note: engines built and checked, ONNX validated; TensorRT validation NOT run here:"; \
	  echo "      run 'sdexport validate $(OUT) --backend trt' on a GPU the engines target."; \
	else \
	  $(BIN)/sdexport validate $(OUT) --backend trt || exit $$?; \
	fi
	@echo "$(OUT): ONNX, engines/, manifest.json, validation.json"

test: install optimum-env
	SDEXPORT_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python $(BIN)/python -m pytest -q

gputest: install  ## the tests that need a CUDA GPU (skipped by `make test` on CPU-only machines)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf engines/*/ .pytest_cache
