# make demo / make test: fresh clone -> .venv -> install -> run. Nothing needs to be installed first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo and CI run on the CPU. torch==2.13.0 resolves to a CPU wheel on the project's CI machines;
# on a GPU workstation use `make install TORCH='torch'` (or your CUDA index) or plain `pip install -e .`.
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: install demo test clean

$(BIN)/medldm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/medldm

install: $(BIN)/medldm

# the demo always starts from an empty output folder
demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/medldm demo --out $(DEMO_OUT)

# lint and import order (a second), types (half a minute from a fresh clone), then the suite
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
