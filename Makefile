# make test   -- set up .venv and run the test suite
# make bench  -- set up .venv and run the main job (the Table 3 report)
#
# The venv sees the system's packages, so a machine that already has torch
# (a GPU machine with a CUDA build) keeps it; elsewhere the CPU build is
# installed. Never let pip pick torch itself: that downloads the CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: test bench venv clean

venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m resfuse_kernels.bench table3

clean:
	rm -rf $(VENV) build *.egg-info
