# sdexport: the whole job and the tests, each in one command (see README).
PYTHON ?= python3
VENV ?= .venv
OPTIMUM_VENV ?= .venv-optimum
BIN := $(VENV)/bin
MODEL ?= tiny
# `make TARGET VENV=/some/venv INSTALL=` uses an existing environment as it is (no install step), for every
# target that installs.
INSTALL ?= install
OUT ?= engines/$(notdir $(abspath $(MODEL)))
DEMO_OUT ?= $(OUT)-demo
PROMPT ?= a photograph of an astronaut riding a horse
STEPS ?= 4

.PHONY: install optimum-env demo test gputest trt-check engines int8 clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,trt,serve]'
	touch $@

# Optimum's ORT pipeline needs transformers<4.58, so its interoperability test runs in its own venv.
optimum-env: $(OPTIMUM_VENV)/.installed
$(OPTIMUM_VENV)/.installed: tests/optimum/requirements.txt
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install -q -r tests/optimum/requirements.txt
	touch $@

# The main job on MODEL (a preset name or a diffusers directory): export -> validate -> infer -> bench.
demo: $(INSTALL)
	$(BIN)/sdexport export $(MODEL) -o $(DEMO_OUT)
	$(BIN)/sdexport validate $(DEMO_OUT)
	$(BIN)/sdexport infer $(DEMO_OUT) --prompt "$(PROMPT)" --steps $(STEPS) -o $(DEMO_OUT)/image.png
	$(BIN)/sdexport bench $(DEMO_OUT) --steps $(STEPS) --json $(DEMO_OUT)/bench.json

# TensorRT engines for MODEL: fp16 export -> engines -> validation, all in $(OUT)/ (see README "TensorRT
# engines"). A second run rebuilds nothing. Where engines cannot run here (no GPU, or a GPU the installed
# TensorRT cannot serve) `validate --backend trt` exits 8 with one line saying why and what works on this GPU
# (e.g. on a T4: NVIDIA's tensorrt, TRT=tensorrt): that is the expected path here, so the line is shown as a
# note (not as an error), the ONNX side is validated with ONNX Runtime and the target ends with a note that the
# engines were NOT validated. Any other validation failure fails the target (its error line shown).
# TRT picks the TensorRT (auto, tensorrt, rtx); BUILD_ARGS go to `sdexport build`
# (e.g. BUILD_ARGS="--static 512x512" or "--compute-capability 8.0").
TRT ?= auto
BUILD_ARGS ?=
engines: $(INSTALL)
	$(BIN)/sdexport export $(MODEL) -o $(OUT) --dtype fp16
	$(BIN)/sdexport build $(OUT) --precision fp16 --trt $(TRT) $(BUILD_ARGS)
	@log=$$(mktemp); rc=0; $(BIN)/sdexport validate $(OUT) --backend trt 2>$$log || rc=$$?; \
	if [ $$rc -eq 8 ]; then \
	  grep -v '^error: ' $$log >&2; \
	  echo "note: the TensorRT engines in $(OUT)/engines were NOT validated: they cannot run on this machine:"; \
	  echo "      $$(sed -n 's/^error: //p' $$log | tail -n 1)"; \
	  echo "      validating the ONNX with ONNX Runtime instead."; \
	  rm -f $$log; \
	  $(BIN)/sdexport validate $(OUT) --backend ort || exit $$?; \
	  echo "note: ONNX validated; engines built and checked, not run."; \
	else \
	  cat $$log >&2; rm -f $$log; [ $$rc -eq 0 ] || exit $$rc; \
	fi
	@echo "$(OUT): ONNX, engines/, manifest.json, validation.json"

# INT8 for MODEL: FP32 export (in $(OUT)-int8) -> calibration file in calibration/ -> INT8 Q/DQ UNet ->
# validation with the INT8 report (README "INT8"). CALIB_ARGS go to `sdexport calibrate`
# (e.g. CALIB_ARGS="--num-prompts 8 --steps 10" for a quick run).
CALIB ?= calibration/$(notdir $(abspath $(MODEL))).npz
CALIB_ARGS ?=
int8: $(INSTALL)
	$(BIN)/sdexport export $(MODEL) -o $(OUT)-int8
	$(BIN)/sdexport calibrate $(MODEL) -o $(CALIB) $(CALIB_ARGS)
	$(BIN)/sdexport quantize $(OUT)-int8 --calib $(CALIB) --precision int8
	$(BIN)/sdexport validate $(OUT)-int8
	@echo "$(OUT)-int8: INT8 UNet in unet_int8/, report in validation.json; calibration file $(CALIB)"

test: $(INSTALL) optimum-env
	SDEXPORT_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python $(BIN)/python -m pytest -q -n 2 --durations=15

gputest: $(INSTALL)  ## the tests that need a CUDA GPU (skipped by `make test` on CPU-only machines)
	$(BIN)/python -m pytest -q -m gpu

# The TensorRT first-run check, once on the GPU host: one screen that says whether TensorRT works here
# (tests/test_trt_check.py; skipped without a GPU or a TensorRT that runs on it, with the reason).
trt-check: $(INSTALL)
	SDEXPORT_TRT=$(TRT) $(BIN)/python -m pytest -q -rs -m trt -p no:cacheprovider tests/test_trt_check.py

clean:
	rm -rf engines/*/ .pytest_cache
