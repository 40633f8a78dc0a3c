# Two-command quick start: `make demo`, `make test`. Every target installs first when needed.
# `make test PYTHON=/path/to/python3.X` builds and uses .venv-3.X; NUMPY=1 installs NumPy 1.26 (.venv-3.X-numpy1).
PYTHON ?= python3
NUMPY ?= 2
comma := ,
PYTHONS ?= $(sort $(wildcard /root/.pyenv/versions/3.1[0-3].*/bin/python))
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ifeq ($(origin PYTHON)$(NUMPY),file2)
VENV ?= .venv
else
VENV ?= .venv-$(PYVER)$(if $(filter 1,$(NUMPY)),-numpy1)
endif
NUMPY_SPEC := $(if $(filter 1,$(NUMPY)),numpy>=1.26$(comma)<2,numpy>=2)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Build-time only: Chainer 7.8.1's sdist needs an old setuptools to build; run time takes any setuptools.
export PIP_BUILD_CONSTRAINT := $(CURDIR)/constraints.txt
DEMO_CONFIG ?= configs/doom_takecover_small.yaml

.PHONY: install demo test test-matrix bench lint clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@if [ "$(NUMPY)" = 1 ] && [ "$(PYVER)" != 3.10 ] && [ "$(PYVER)" != 3.11 ] && [ "$(PYVER)" != 3.12 ]; then \
		echo "NumPy 1.26 has no wheel for Python $(PYVER): use NUMPY=2, or Python 3.10-3.12 with NUMPY=1"; exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.3" wheel
	$(PY) -m pip install --quiet -e ".[dev,dask,mpi]" "$(NUMPY_SPEC)"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wm-trainer pipeline -c $(DEMO_CONFIG)

test: $(STAMP)
	$(PY) -c "import sys, numpy; print('Python', sys.version.split()[0], 'NumPy', numpy.__version__)"
	$(PY) -m pytest -q

# every interpreter in PYTHONS with NumPy 2, one after another (each in its own .venv-3.X)
test-matrix:
	@set -e; for p in $(PYTHONS); do $(MAKE) --no-print-directory test PYTHON=$$p; done

bench: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0" \
		|| echo "torch not available: PyTorch columns will say so"
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.bench_gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf .venv .venv-3.* build *.egg-info
