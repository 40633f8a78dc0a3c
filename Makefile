# Two-command quick start: `make demo`, `make test`. Every target installs first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_BUILD_CONSTRAINT := $(CURDIR)/constraints.txt
DEMO_CONFIG ?= configs/doom_takecover_small.yaml

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2" "setuptools<70" wheel
	$(PY) -m pip install --quiet -e ".[dev,dask]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wm-trainer pipeline -c $(DEMO_CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0" \
		|| echo "torch not available: PyTorch columns will say so"
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.bench_gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
