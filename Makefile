# make demo / make test: fresh clone -> .venv -> install -> run. Nothing needs to be installed first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo and CI run on the CPU. torch==2.13.0 resolves to a CPU wheel on the project's CI machines;
# on a GPU workstation use `make install TORCH='torch'` (or your CUDA index) or plain `pip install -e .`.
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: install demo test viewer clean

# One pip run (one resolution), then the bytecode compiled on every core: pip compiles one file at a time, and with
# PYTHONDONTWRITEBYTECODE set (as on the CI machines) nothing compiled later is kept, so each process that imports
# torch would compile it again. As pip does, a file that does not compile (torch ships one in 3.12 syntax) is left
# to fail where it is imported.
$(BIN)/medldm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile "$(TORCH)" -e ".[dev]"
	$(BIN)/python -c "import compileall; compileall.compile_dir('$(VENV)/lib', quiet=2, workers=0)"
	touch $(BIN)/medldm

install: $(BIN)/medldm

# the demo always starts from an empty output folder
demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/medldm demo --out $(DEMO_OUT)

# lint and import order (a second), types (twenty seconds from a fresh clone), then the suite on every core
# (pytest-xdist: one worker per core, at most 4, as each worker builds the shared phantom runs once)
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal tests

# the pages' 3D viewer: NiiVue at the version viewer/package-lock.json pins, copied into the package's assets (which
# are committed: a pip install needs no Node.js). Run after changing viewer/package.json; needs Node.js and npm.
viewer:
	npm ci --prefix viewer --ignore-scripts --no-audit --no-fund
	$(PYTHON) viewer/build.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
