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

DATA ?= data/easy_vqa
RUNS ?= runs/easy_vqa
MV := $(BIN)/meta-vqa
BASE_VARIANTS := uncond_multitask cond_multitask cond_multitask_film mnet_maml

# prepare Meta-EasyVQA, then train and test every base-model variant for SEEDS seeds, then the table
run: $(STAMP)
	$(MV) prepare easy-vqa --out $(DATA)
	set -e; for seed in $$(seq 0 $$(( $(SEEDS) - 1 ))); do \
	  $(MV) test -c conf/easy_vqa/base.yaml --data.root $(DATA) --seed_everything $$seed \
	    --model.init_args.variant clip_zero_shot --model.init_args.results_dir $(RUNS)/base/clip_zero_shot/seed$$seed; \
	  for v in $(BASE_VARIANTS); do \
	    $(MV) fit -c conf/easy_vqa/base.yaml --data.root $(DATA) --seed_everything $$seed --test_after_fit true \
	      --model.init_args.variant $$v --model.init_args.results_dir $(RUNS)/base/$$v/seed$$seed \
	      --trainer.logger.init_args.name base_$$v; \
	  done; \
	done
	$(MV) report $(RUNS) --out $(RUNS)/report

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check meta_vqa tests
	$(BIN)/ruff format --check meta_vqa tests

clean:
	rm -rf runs lightning_logs
