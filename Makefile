# Kiln: `make serve` and `make test` do all set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
TARGET ?=
MODEL ?= models/kiln-shapes
NAME ?=
SIZES ?=
BATCH ?=
export PYTHONUNBUFFERED := 1

.PHONY: help install test serve export info default-model eval-default-model bench soak clean

help:
	@echo "make serve [PORT=8000] [TARGET=cpu|openvino]  start a worker and the API on the bundled model (default: the fastest target installed)"
	@echo "make test                       run the test suite"
	@echo "make export MODEL=<dir|file.safetensors> [TARGET=cpu|cuda|tensorrt] [NAME=...] [SIZES=512x512,...] [BATCH=1,2,4]"
	@echo "            [VAE=<file|dir>] [PREDICTION_TYPE=epsilon|v_prediction] [DEFAULT_SIZE=512|768] [CONFIG=<dir>]"
	@echo "make bench                      benchmarks, results under benchmarks/results/"
	@echo "make soak [DURATION=600] [CONCURRENCY=16]  mixed load on kiln serve: nothing lost, RSS growth < 5 %"
	@echo "make default-model              retrain the bundled model (about 118 minutes on 2 cores; resumes)"
	@echo "make eval-default-model         score the bundled model's prompt following"

# Development install: serving + export (torch CPU, pinned) + test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

export: $(STAMP)
	$(BIN)/kiln export $(MODEL) --target $(or $(TARGET),cpu) $(if $(NAME),--name $(NAME)) $(if $(SIZES),--sizes $(SIZES)) $(if $(BATCH),--batch $(BATCH)) \
		$(if $(VAE),--vae $(VAE)) $(if $(PREDICTION_TYPE),--prediction-type $(PREDICTION_TYPE)) \
		$(if $(DEFAULT_SIZE),--default-size $(DEFAULT_SIZE)) $(if $(CONFIG),--config $(CONFIG))

info: $(STAMP)
	$(BIN)/kiln info build/$(if $(filter %.safetensors,$(MODEL)),$(basename $(notdir $(MODEL))),$(notdir $(MODEL)))/$(or $(TARGET),cpu)

serve: $(STAMP)
	$(BIN)/kiln serve --port $(PORT) --model $(MODEL) --target $(or $(TARGET),auto)

default-model: $(STAMP)
	$(BIN)/python -m export.default_model.train --run-dir runs/default-model --out $(MODEL) \
		--seed 0 --vae-minutes 20 --cache-minutes 8 --decoder-minutes 20 --unet-minutes 70

eval-default-model: $(STAMP)
	$(BIN)/python -m export.default_model.evaluate $(MODEL) --n 100 --backend engine --json benchmarks/results/default_model_eval.json --grid docs/eval-contact-sheet.png

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(if $(DURATION),--duration $(DURATION)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY))

clean:
	rm -rf build
