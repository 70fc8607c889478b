"""pytest-benchmark suites: both fused ops, forward / backward / both, at the
three stage shapes (N,C,H,W = 128x64x64x64, 128x128x32x32, 128x256x16x16,
batch scaled by ``--shape-scale``), per usable backend, against the eager
reference formulas and torch.compile of them.

    pytest bench/ --benchmark-only [--shape-scale 0.0625] [-k highway_gate]

Each benchmark's ``extra_info`` carries the minimum bytes moved and the
achieved GB/s (the counting rule is in ``resfuse_kernels/bench/ops.py``).
On CUDA every timed call ends with a synchronisation.
"""

from __future__ import annotations

import pytest
import torch

from resfuse_kernels import backends
from resfuse_kernels.bench import ops as bench_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = bench_ops.providers_for(DEVICE)
_COMPILED: dict = {}
_CASES: dict = {}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", bench_ops.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", bench_ops.OPS)
def test_op(benchmark, op, provider, mode, shape):
    key = (op, tuple(shape), provider)
    if key not in _CASES:                       # shared by the three modes: one compile
        case = bench_ops.Case(op, shape, DEVICE)
        _CASES[key] = case, bench_ops.forward_fn(case, provider, _COMPILED)
    case, forward = _CASES[key]
    backend = provider[6:] if provider.startswith("fused:") else None
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info.update(op=op, shape=list(shape), mode=mode, provider=provider,
                                device=str(DEVICE),
                                min_bytes=bench_ops.min_bytes(op, mode, shape, torch.float32))
    with backends.use(backend):
        for _ in range(2):                      # warm-up (compiles forward and backward)
            case.backward(forward())
        _sync()
        if mode == "backward":
            def setup():
                y = forward()
                _sync()
                return (y,), {}

            def target(y):
                case.backward(y)
                _sync()

            benchmark.pedantic(target, setup=setup, rounds=10 if DEVICE.type == "cpu" else 50,
                               iterations=1)
        else:
            fn = case.step(forward, mode)

            def target():
                fn()
                _sync()

            benchmark(target)
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["gb_per_s"] = benchmark.extra_info["min_bytes"] / median / 1e9


def test_copy(benchmark, shape):
    """The bandwidth yardstick: a device-to-device clone of one activation."""
    t = torch.randn(*shape, device=DEVICE)
    benchmark.group = f"copy {'x'.join(map(str, shape))}"
    benchmark.extra_info["bytes"] = 2 * t.numel() * t.element_size()

    def target():
        t.clone()
        _sync()

    benchmark(target)
