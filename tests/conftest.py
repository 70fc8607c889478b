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

import resfuse_kernels as rk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (rtol, atol) of a fused result against the float64 oracle, per storage
# dtype, for O(1) data. The low-precision rows follow STYLE.md's rule: a
# fused op may err about twice as much as PyTorch's own ops at that dtype
# (tests/test_ops.py measures that error too and checks the ratio).
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


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
