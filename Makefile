# Every target works on a fresh machine with only Python and pip: it creates .venv when
# missing, installs the pinned CPU torch first (so no dependency can pull a CUDA build),
# then curvscope itself in editable mode with its dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.curvscope-installed

.PHONY: install demo test lint reports bench peers browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else 'torch changed to ' + torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/curvscope example digits-mlp --out demo
	$(BIN)/curvscope spectrum demo/model.pt --top 5 --bottom 2 --out demo/spectrum
	$(BIN)/curvscope report demo/model.pt --out demo/report --preset quick
	@echo ""
	@echo "Spectrum result: $$(pwd)/demo/spectrum/spectrum.json"
	@echo "Report: $$(pwd)/demo/report/report.html (open it in a browser; it works offline)"

# Chromium renders the HTML report in the browser test; installed when apt can, skipped otherwise.
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the browser test will be skipped")

lint: install
	$(BIN)/ruff check curvscope tests benchmarks scripts examples

test: install lint browser
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

reports: install
	$(PY) scripts/make_reports.py

# Installing the peers needs the network: without it (or if pip fails) `make bench` goes on,
# and each benchmark prints a skip line for every peer that is missing.
peers: install
	-bash benchmarks/install-peers.sh $(PY)

# Every benchmark at full size, one after another, stopping at the first failure (long: the
# figures in benchmarks/RESULTS.md were measured on an otherwise idle machine; gpu.py skips
# without CUDA). `OMP_NUM_THREADS=1 $(PY) benchmarks/NAME.py --quick` checks one in seconds;
# tests/test_scripts.py runs them all so.
BENCHMARKS := $(sort $(wildcard benchmarks/*.py))
bench: peers
	@set -e; for b in $(BENCHMARKS); do \
	  echo "== $$b"; OMP_NUM_THREADS=1 $(PY) $$b; \
	done

clean:
	rm -rf $(VENV) demo curvscope-out .pytest_cache
