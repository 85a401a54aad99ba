# sdexport: the whole job and the tests, each in one command (see README).
PYTHON ?= python3
VENV ?= .venv
OPTIMUM_VENV ?= .venv-optimum
BIN := $(VENV)/bin
MODEL ?= tiny
OUT ?= engines/$(MODEL)
PROMPT ?= a photograph of an astronaut riding a horse
STEPS ?= 4

.PHONY: install optimum-env demo test engines clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
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
	$(BIN)/sdexport export $(MODEL) -o $(OUT)
	$(BIN)/sdexport validate $(OUT)
	$(BIN)/sdexport infer $(OUT) --prompt "$(PROMPT)" --steps $(STEPS) -o $(OUT)/image.png
	$(BIN)/sdexport bench $(OUT) --steps $(STEPS) --json $(OUT)/bench.json

test: install optimum-env
	SDEXPORT_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf engines/*/ .pytest_cache
