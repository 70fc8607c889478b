# make test   -- set up .venv, build, run the C++ tests (ctest) and the pytest suite
# make bench  -- set up .venv (+ the [bench] extra) and run the main job: Table 3,
#                parameters and time per epoch, into a new git-ignored bench/runs/<device>-<time>/
# make bench-ops -- the op benchmarks (time, GB/s, fraction of copy bandwidth)
# make ctest  -- build csrc/ with CMake against the venv's libtorch and run ctest
# make cuda-compile -- compile csrc/cuda with nvcc, no GPU needed (skipped without nvcc)
# make gpu-dry-run -- bench/gpu_session.sh --device cpu: every phase of the GPU session at
#                toy size on this CPU (~5 min on 2 cores), into build/gpu-dry-run
#
# The venv sees the system's packages, so a machine that already has torch
# (a GPU machine with a CUDA build) keeps it; elsewhere the CPU build is
# installed. Never let pip pick torch itself: that downloads the CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Triton 3.9 runs its interpreter with numpy >= 2.3 (3.6 needs numpy < 2.3).
TRITON ?= triton==3.9.0

.PHONY: test bench bench-ops venv ctest cuda-compile clean mutants soak gpu-dry-run

venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml setup.py $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# MONAI for tests/test_convert.py, without its dependencies (torch, numpy:
	# already here), so that pip never touches torch
	$(PY) -c "import monai" 2>/dev/null || $(PY) -m pip install -q --no-deps "monai==1.6.1"
	touch $@

# Tests in parallel, one worker per core (pytest-xdist): the Triton
# interpreter's tests are single-threaded Python. loadgroup keeps the tests
# that share an expensive module fixture (a compilation) on one worker.
# PYTEST_WORKERS=1 on a machine shared with other jobs.
PYTEST_WORKERS ?= auto

test: venv ctest
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

ctest: venv
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

cuda-compile: venv
	PYTHON=$(PY) csrc/cuda/compile_check.sh

gpu-dry-run: venv
	OUT=build/gpu-dry-run PYTHON=$(PY) bash bench/gpu_session.sh --device cpu

# The soak: the oracle tests of the ops (and of the CUDA emulation's kernels)
# with SEEDS fresh random seeds each, on SOAK_BACKENDS (comma-separated;
# the triton interpreter is slow: give it fewer seeds). Prints every failing
# seed; `make test` itself runs fixed seeds. E.g. make soak SEEDS=2000 SOAK_BACKENDS=cpu
SEEDS ?= 200
SOAK_BACKENDS ?= torch,cpu
SOAK_TESTS ?= tests/test_ops.py -k "oracle or outliers or large_means or low_precision or one_value"

# The seeds run in pytest sessions of SOAK_CHUNK, each with its own random
# seeds: one session of 2,000 seeds holds 432,000 items (2 GB), and a
# session's failing seeds are printed as it ends, not after the whole soak.
# Two soaks at once: pin each to its own core (taskset -c N) or their
# threads oversubscribe the cores (a 20x slowdown, seen here).
SOAK_CHUNK ?= 100

soak: venv
	@left=$(SEEDS); rc=0; \
	while [ $$left -gt 0 ]; do \
	  n=$$(( left < $(SOAK_CHUNK) ? left : $(SOAK_CHUNK) )); \
	  echo "== soak: $$n seeds of $$left left"; \
	  RESFUSE_TEST_BACKENDS=$(SOAK_BACKENDS) $(PY) -m pytest -q -n auto -p no:cacheprovider \
	    $(SOAK_TESTS) --soak $$n || rc=1; \
	  left=$$(( left - n )); \
	done; exit $$rc

# The mutation check of the suite (tests/mutants.py): one planted bug at a time
# in a scratch copy of the tree, each of which some test must catch. Slow (tens
# of minutes), so not part of `make test`; e.g. MUTANTS_ARGS="--only cpu-eps-k".
MUTANTS_ARGS ?=

mutants: venv
	$(PY) tests/mutants.py $(MUTANTS_ARGS)

# The [bench] extra of pyproject.toml, installed without rebuilding the package.
BENCH_DEPS ?= matplotlib Pillow pytest-benchmark

$(VENV)/.bench-ready: $(VENV)/.ready pyproject.toml
	$(PY) -c "import matplotlib, PIL, pytest_benchmark" 2>/dev/null || $(PY) -m pip install -q $(BENCH_DEPS)
	touch $@

# make bench BENCH_ARGS=--full-table: every model, precision and compiled provider.
BENCH_ARGS ?=

bench: $(VENV)/.bench-ready
	$(PY) -m resfuse_kernels.bench table3 $(BENCH_ARGS)

bench-ops: $(VENV)/.bench-ready
	$(PY) -m resfuse_kernels.bench ops

clean:
	rm -rf $(VENV) build *.egg-info
