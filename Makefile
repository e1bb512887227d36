# refusal-atlas: `make setup`, `make demo`, `make test`, `make bench`.
# torch is installed first and pinned: on this CPU-only setup `torch==2.13.0` is a local CPU build;
# an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
TORCH  ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: setup demo test unit integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,embedded,bench,lora,judge]"
	$(BIN)/refusal-atlas prepare
	touch $(STAMP)

demo: setup
	$(BIN)/refusal-atlas run --run-dir $(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/reliability
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

# Benchmarks print ratios against a baseline measured in the same run (CPU minutes each).
bench: setup
	$(BIN)/python bench/extraction.py
	$(BIN)/python bench/batch_size.py
	test -f $(RUN_DIR)/manifest.json || $(MAKE) demo
	$(BIN)/python bench/cheap_signal.py --run-dir $(RUN_DIR)
	$(BIN)/python bench/generation_length.py --activations $(RUN_DIR)/activations.safetensors
	$(BIN)/python bench/selection_speed.py --run-dir $(RUN_DIR)
	$(BIN)/python bench/search_fidelity.py --run-dir $(RUN_DIR)
	$(BIN)/python bench/trial_cost.py --run-dir $(RUN_DIR) --n 100 --trials 3
	$(BIN)/python bench/vs_heretic.py --work bench_out/vs_heretic_heldout --cli-check  # an estimated ~10 h; installs heretic-llm in its own venv
	$(BIN)/python bench/scaling.py --work bench_out/scaling  # hours: random-weight 0.5B-7B models, up to 15 GB of disk each

clean:
	rm -rf $(VENV) build dist src/*.egg-info
