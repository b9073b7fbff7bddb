PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench clean

# The venv is created once and reused; editing pyproject.toml reinstalls.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[train,bench,dev,eval]"
	# LPIPS linear weights only (vqkit reads its files, never imports it): --no-deps, or it
	# pulls torchvision and another torch.
	$(BIN)/python -m pip install -q --no-deps lpips==0.1.4
	touch $(STAMP)

venv: $(STAMP)

# Train the quickstart tokenizer on the bundled Fluent Emoji 3D set (fetched with npm once) and
# print its codebook usage. About 10 minutes on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/vqkit data fetch fluent-emoji-3d
	$(BIN)/vqkit fit --config configs/quickstart.yaml
	@echo "run folder, checkpoints and pictures: runs/quickstart/ (summary.json, reconstructions.png, code_usage.png)"
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs/quickstart"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
