"""Shared test machinery: the device, the backends under test, tolerances.

Every contract test that takes the ``backend`` fixture runs once per backend
that can run on the test device: ``torch`` always; ``cpu`` when the C++
extension is built; ``triton`` on a GPU, or on CPU tensors when
``TRITON_INTERPRET=1``; ``cuda`` on a GPU when built.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without a GPU the Triton backend is tested through Triton's interpreter on
# CPU tensors. Set before the backend first imports Triton (it is lazy).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import resfuse_kernels as rk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# pytest-xdist runs a worker per core, and torch's default is a thread per
# core in each worker: on 2 cores that oversubscription made the CPU tests
# 2.5x slower (OpenMP threads spin waiting for a core). Each worker gets its
# share of the cores; test_ops.py runs the ops on several threads explicitly.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

# float32 means float32 in every comparison: cuDNN runs convolutions in TF32
# by default (the reference's and the composite's carry), which alone would
# miss the float32 tolerance. The kernels never use TF32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# The one tolerance rule of the suite, for every test file and backend. A
# result's largest error against the float64 oracle is at most
#
#     K * (PyTorch's own largest error at the same precision) + ULPS * eps * scale
#
# where PyTorch's error is that of the same formula run by PyTorch with the
# same inputs stored in ``dtype`` (STYLE.md: a fused kernel may err about as
# much as PyTorch does), eps is ``torch.finfo(dtype).eps`` and scale the
# largest magnitude of the expected tensor, at least 1: the inputs' scale in
# every test, so that a result that is a small difference of O(1) terms
# (a channel's mean, an output near 0) is allowed their rounding. The ULPS
# term covers another order of the same roundings where PyTorch's happened
# to land near exact.
# float64 has no higher precision to measure PyTorch against: its PyTorch
# error is zero and the ULPS term alone bounds it, wide enough for a whole
# trained block or network (2^20 ulps is 2.3e-10 of the scale: the errors of
# correct kernels reached 3.7e4 ulps there, where BatchNorm over four values
# amplifies float64's rounding; a wrong kernel errs by 1e-6 or more).
#
# float32's K and ULPS come from the soak (`make soak`): where BatchNorm runs
# over three values, or a gradient is a sum that cancels, two correct
# float32 computations err as two draws of a wide spread. At (2, 8) the cpu
# and torch backends (the latter PyTorch's own ops, rearranged) failed 19 of
# 108,000 oracle tests (errors up to 9x PyTorch's, where its run landed near
# exact); each of those passes (3, 16). A wrong kernel errs by 10^3x or more.
RULE = {  # dtype: (K, ULPS)
    torch.float64: (2.0, 2.0 ** 20),
    torch.float32: (3.0, 16.0),
    torch.bfloat16: (2.0, 2.0),
    torch.float16: (2.0, 2.0),
}


# ReLU's derivative jumps at 0, so where a ReLU's input lies within rounding
# of 0 a correct kernel and the oracle may take different sides (a CI case:
# z = 4e-6 there, and du erred 1.06). The ops' tests zero the loss gradient
# where the oracle's ReLU input lies within the output's allowed error
# (error_bound of y) of 0: a handful of elements, if any.


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (NaN where either has one)."""
    if not expected.numel():
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def error_bound(expected: torch.Tensor, pytorch: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The :data:`RULE` bound for a result of storage ``dtype`` whose oracle
    is ``expected`` and whose PyTorch run at ``dtype`` is ``pytorch`` (None:
    PyTorch's error is taken as zero, as it is in float64)."""
    k, ulps = RULE[dtype]
    scale = max(expected.detach().abs().max().item() if expected.numel() else 0.0, 1.0)
    base = 0.0 if pytorch is None else max_error(pytorch, expected)
    return k * base + ulps * torch.finfo(dtype).eps * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str = "tensor", pytorch: torch.Tensor | None = None) -> None:
    """``actual`` (storage ``dtype``) matches ``expected`` (the float64
    oracle) within :data:`RULE`, given ``pytorch``, PyTorch's own result at
    ``dtype``; shapes must match and NaN never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, bound = max_error(actual, expected), error_bound(expected, pytorch, dtype)
    assert err <= bound, (f"{what}: max error {err:.3g} exceeds the bound {bound:.3g} "
                          f"({dtype}: K, ULPS = {RULE[dtype]}; PyTorch's error "
                          f"{max_error(pytorch, expected) if pytorch is not None else 0:.3g})")


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs here through the Triton interpreter: each
    kernel launch is then a Python run of the kernel body, so tests scale
    their sizes (never their assertions) down for it."""
    return backend == "triton" and DEVICE.type == "cpu"


# Shapes that put several tiles, with a ragged last one, along the pixels or
# channels of every compiled kernel; the Triton interpreter's tiles are 16
# pixels and 32 channels (resfuse_kernels/triton/_launch.py), so there these
# smaller ones do that at a third of the cost or less.
INTERPRETER_SHAPES = {(2, 4, 33, 33): (2, 4, 17, 17), (4, 100, 1, 1): (4, 40, 1, 1)}


def sized(shape: tuple, backend: str) -> tuple:
    """``shape``, or its stand-in when ``backend`` runs through the interpreter."""
    return INTERPRETER_SHAPES.get(shape, shape) if interpreted(backend) else shape


def _backends_under_test() -> list[str]:
    """Every backend usable on DEVICE, or those named in RESFUSE_TEST_BACKENDS
    (comma-separated: a soak of one backend)."""
    wanted = [n for n in os.environ.get("RESFUSE_TEST_BACKENDS", "").split(",") if n]
    unknown = sorted(set(wanted) - set(rk.backends.NAMES))
    if unknown:
        raise ValueError(f"RESFUSE_TEST_BACKENDS names unknown backends {unknown}; "
                         f"known: {', '.join(rk.backends.NAMES)}")
    return [name for name in rk.backends.NAMES
            if (not wanted or name in wanted)
            and rk.backends.unavailable_reason(name, DEVICE.type) is None]


BACKENDS = _backends_under_test()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test with each backend that can run on DEVICE forced in turn."""
    with rk.backends.use(request.param):
        yield request.param


# Seeds. `make test` is deterministic: each test's seed is a hash of its id,
# offset by RESFUSE_TEST_SEED (default 0), so a run is repeatable and a
# failure's seed is printed with it. `--soak N` (`make soak`)
# runs every selected test N more times, each with a fresh random seed.

def pytest_addoption(parser):
    parser.addoption("--soak", type=int, default=0, metavar="N",
                     help="run each selected test with N random seeds (a soak, not CI)")


def pytest_generate_tests(metafunc):
    rounds = metafunc.config.getoption("soak")
    if rounds:
        metafunc.fixturenames.append("soak_seed")
        # RESFUSE_SOAK_BASE=B replays a soak (seeds B, B + 1, ...)
        base = int(os.environ.get("RESFUSE_SOAK_BASE") or int.from_bytes(os.urandom(4), "little"))
        metafunc.parametrize("soak_seed", [(base + i) % 2 ** 32 for i in range(rounds)],
                             ids=[f"soak{i}" for i in range(rounds)])


def fixed_seed(nodeid: str) -> int:
    """The seed of the test ``nodeid`` in a deterministic run (the id from its
    file's name on, so that it is the same whatever directory pytest runs in)."""
    name = nodeid[nodeid.rfind("/", 0, nodeid.find("::")) + 1:]
    offset = int(os.environ.get("RESFUSE_TEST_SEED_OFFSET", "0"))
    return (zlib.crc32(name.encode()) + offset) % 2 ** 32


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch for the test: RESFUSE_TEST_SEED if set, the soak's seed in a
    soak, else the test's fixed seed (:func:`fixed_seed`)."""
    given = os.environ.get("RESFUSE_TEST_SEED")
    params = getattr(request.node, "callspec", None)
    if given:
        seed = int(given)
    elif params is not None and "soak_seed" in params.params:
        seed = params.params["soak_seed"]
    else:
        seed = fixed_seed(request.node.nodeid)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"torch seed {seed} (rerun with RESFUSE_TEST_SEED={seed})")  # shown on failure
    yield seed


_FAILED_SEEDS: list[tuple[str, int]] = []


def pytest_runtest_logreport(report):
    if report.failed:
        seed = dict(report.user_properties).get("seed")
        _FAILED_SEEDS.append((report.nodeid, seed))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _FAILED_SEEDS:
        terminalreporter.section("failing seeds")
        for nodeid, seed in _FAILED_SEEDS:
            terminalreporter.write_line(f"RESFUSE_TEST_SEED={seed} {nodeid}")


def pytest_report_header(config):
    offset = os.environ.get("RESFUSE_TEST_SEED_OFFSET", "0")
    mode = (f"soak, {config.getoption('soak')} random seeds a test" if config.getoption("soak")
            else f"fixed seeds (hash of the test id + RESFUSE_TEST_SEED_OFFSET={offset})")
    return [f"resfuse device: {DEVICE}; backends under test: {', '.join(BACKENDS)}; {mode}"]
