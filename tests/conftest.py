"""Shared test machinery: the device, the backends under test, tolerances.

Every contract test that takes the ``backend`` fixture runs once per backend
that can run on the test device: ``torch`` always; ``cpu`` when the C++
extension is built; ``triton`` on a GPU, or on CPU tensors when
``TRITON_INTERPRET=1``; ``cuda`` on a GPU when built.
"""

from __future__ import annotations

import os

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

# Largest error allowed against the float64 oracle, relative to the largest
# magnitude of the expected tensor (at least 1), per storage dtype. Normwise,
# not elementwise: a gradient is a sum of cancelling terms, so a tiny element
# carries the absolute error of its large neighbours. bf16/fp16 are also held
# to STYLE.md's rule (at most ~2x PyTorch's own error at that precision) in
# tests/test_ops.py.
TOLERANCES = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 4e-3,
}


def _error_and_bound(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                     floor: float) -> tuple[float, float, float]:
    expected = expected.detach().double()
    err = (actual.detach().double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    return err, max(TOLERANCES[dtype] * scale, floor), scale


def within_tolerance(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`assert_close` without a floor would pass."""
    if actual.shape != expected.shape:
        return False
    err, bound, _ = _error_and_bound(actual, expected, dtype, 0.0)
    return err <= bound


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str = "tensor", floor: float = 0.0) -> None:
    """``actual`` matches ``expected`` (any dtype, compared in float64) within
    TOLERANCES[dtype] of expected's scale, or within ``floor`` (an absolute
    error allowed anyway: tests pass twice PyTorch's own error at ``dtype``
    for problems that are ill-conditioned at that precision, such as batch
    statistics over three values); shapes must match."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, bound, scale = _error_and_bound(actual, expected, dtype, floor)
    assert err <= bound, (
        f"{what}: max error {err:.3g} exceeds {TOLERANCES[dtype]:.1g} x scale {scale:.3g}"
        f" (and the floor {floor:.3g})")


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
    names = []
    for name in rk.backends.NAMES:
        if rk.backends.unavailable_reason(name, DEVICE.type) is None:
            names.append(name)
    return names


BACKENDS = _backends_under_test()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test with each backend that can run on DEVICE forced in turn."""
    with rk.backends.use(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random data in every test, reproducible from the test's seed."""
    seed = int(os.environ.get("RESFUSE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch seed {seed} (rerun with RESFUSE_TEST_SEED={seed})")  # shown on failure
    yield seed


def pytest_report_header(config):
    return [f"resfuse device: {DEVICE}; backends under test: {', '.join(BACKENDS)}"]
