# `make run` and `make test` install into .venv on first use, then do their job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SEEDS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

RUNS ?= runs/easy_vqa

# the pipeline on Meta-EasyVQA (conf/easy_vqa/pipeline.yaml): prepare, then for each of SEEDS seeds the base
# variants, hnet, adaptation dataset, hvae, hyperclip, hyperldm (each tested on the meta-test tasks), then the
# report ($(RUNS)/report), printed at the end. A re-run skips finished stages.
run: $(STAMP)
	$(BIN)/meta-vqa pipeline -c conf/easy_vqa/pipeline.yaml --seeds $(SEEDS) --out $(RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check meta_vqa tests
	$(BIN)/ruff format --check meta_vqa tests

clean:
	rm -rf runs lightning_logs
