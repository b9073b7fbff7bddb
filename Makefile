PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv lock demo demo3d test lint format bench clean

# The dev/test environment is exactly requirements/dev.lock (every direct and transitive
# dependency, pinned with sha256 hashes); `make lock` refreshes it. pip installs the locked uv,
# uv installs the rest (about 10x faster than pip from a cold cache). torch 2.13.0 is a CPU build
# that PyPI does not serve: FIND_LINKS names the folder that holds its wheel (this workplace's
# pip config names it; elsewhere: make test FIND_LINKS=/dir/with/wheel, or
# UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(wildcard /opt/wheels))
UV_LINKS := $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
UV := $(BIN)/uv
LOCK := requirements/dev.lock
LOCKS := $(LOCK) requirements/uv.lock

$(STAMP): $(LOCKS) pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements/uv.lock
	$(UV) pip sync -q --python $(BIN)/python $(UV_LINKS) $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Re-resolve the lock (newest releases within pyproject.toml's and dev.in's ranges) for
# Python 3.11 on x86-64 Linux, whoever runs it.
lock: $(STAMP)
	$(UV) pip compile -q pyproject.toml requirements/dev.in \
		--extra train --extra bench --extra dev --extra eval --extra hub --extra docs --extra sparse3d \
		--override requirements/overrides.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 $(UV_LINKS) \
		--custom-compile-command "make lock" -o $(LOCK)
	grep '^uv==' requirements/dev.in | $(UV) pip compile -q - --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -o requirements/uv.lock

venv: $(STAMP)

# Train the quickstart tokenizer on the bundled Fluent Emoji 3D set (fetched with npm once) and
# print its codebook usage. About 10 minutes on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/vqkit data fetch fluent-emoji-3d
	$(BIN)/vqkit fit --config configs/quickstart.yaml
	@echo "run folder, checkpoints and pictures: runs/quickstart/ (summary.json, reconstructions.png, code_usage.png)"
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs/quickstart"

# The sparse 3D example (seed 001): a sparse SDF VQ-VAE with 8,192 codes on procedural shapes
# (built once into the cache), the bunny, teapot and Snowden bust (npm) held out.
demo3d: $(STAMP)
	$(BIN)/vqkit data fetch meshes
	$(BIN)/vqkit fit --config configs/sparse3d/quickstart.yaml
	@echo "run folder: runs/sparse3d/ (summary.json, reconstructions.png with the meshes)"

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
