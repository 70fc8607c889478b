"""setup.py's extension plan and which compiled backends this install has."""

from __future__ import annotations

import os
import runpy

import pytest
import torch

import resfuse_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="plan")["_extensions"]()


def test_skip_ext_gives_a_pure_python_install(monkeypatch):
    assert _plan(monkeypatch, RESFUSE_SKIP_EXT="1") == ([], {})


def test_cpu_extension_is_planned(monkeypatch):
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    exts, cmdclass = _plan(monkeypatch)
    names = {ext.name: ext for ext in exts}
    assert "resfuse_kernels._C_cpu" in names
    assert os.path.join("csrc", "cpu", "ops.cpp") in names["resfuse_kernels._C_cpu"].sources
    assert "build_ext" in cmdclass
    if torch.version.cuda is None:  # a CPU torch never plans the CUDA extension
        assert "resfuse_kernels._C_cuda" not in names


@pytest.mark.skipif(os.environ.get("CI") != "true",
                    reason="outside CI a pure-Python install (RESFUSE_SKIP_EXT=1) is legitimate")
def test_ci_builds_the_cpu_backend_and_makes_it_the_default():
    """On CI the install must have built the C++ kernels: they are the
    default backend for CPU tensors."""
    assert rk.backends.status()["cpu"] is None, rk.backends.status()["cpu"]
    assert rk.backends.resolve(torch.device("cpu")) == "cpu"


def test_cpu_extension_runs_in_parallel():
    """at::parallel_for is inline OpenMP in torch's headers: a library built
    without -fopenmp silently runs every kernel on one thread. The built
    library must call into the OpenMP runtime."""
    if rk.backends.status()["cpu"] is not None:
        pytest.skip(f"cpu backend: {rk.backends.status()['cpu']}")
    import importlib.util
    origin = importlib.util.find_spec("resfuse_kernels._C_cpu").origin
    with open(origin, "rb") as library:
        assert b"GOMP_parallel" in library.read(), f"{origin} was built without OpenMP"
