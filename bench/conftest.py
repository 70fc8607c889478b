"""pytest-benchmark suites of the fused ops (not part of ``make test``).

Run: ``pytest bench/ --benchmark-only`` (``make bench-ops`` does; ``pip install
-e '.[bench]'`` brings pytest-benchmark). ``--shape-scale S`` (or the
environment variable RESFUSE_BENCH_SHAPE_SCALE) multiplies the batch of the
three stage shapes: 1 on a GPU by default, 1/16 on a CPU.
"""

from __future__ import annotations

import os

import torch

from resfuse_kernels.bench import ops as bench_ops


def pytest_addoption(parser):
    parser.addoption("--shape-scale", type=float, default=None,
                     help="multiply the batch of the stage shapes (default 1 on a GPU, "
                          f"{bench_ops.CPU_SHAPE_SCALE:g} on a CPU; env "
                          f"{bench_ops.SHAPE_SCALE_ENV})")


def shape_scale(config) -> float:
    scale = config.getoption("--shape-scale")
    if scale is None:
        default = 1.0 if torch.cuda.is_available() else bench_ops.CPU_SHAPE_SCALE
        scale = float(os.environ.get(bench_ops.SHAPE_SCALE_ENV, default))
    return scale


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        scale = shape_scale(metafunc.config)
        shapes = [bench_ops.scale_shape(s, scale) for s in bench_ops.STAGE_SHAPES]
        metafunc.parametrize("shape", shapes, ids=["x".join(map(str, s)) for s in shapes])
