"""Backend choice, the info command and the main job's parameter report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import resfuse_kernels as rk
from _cases import HighwayCase, TailCase
from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(*args, **env):
    environment = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=environment, timeout=300)


def _call_op():
    case = HighwayCase.random((2, 3, 2, 2))
    h, t = case.bn_h, case.bn_t
    return rk.ops.highway_gate(case.a, case.b, case.x, *h.args(), *t.args(), training=True)


def test_default_backend_per_device():
    name = rk.backends.resolve(DEVICE)
    assert name in rk.backends.PREFERENCE[DEVICE.type]
    assert rk.backends.unavailable_reason(name, DEVICE.type) is None


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", "torch")
    assert rk.backends.resolve(DEVICE) == "torch"
    monkeypatch.setenv("RESFUSE_BACKEND", "nonsense")
    with pytest.raises(rk.backends.BackendUnavailable, match="unknown backend 'nonsense'"):
        _call_op()


@pytest.mark.parametrize("name", [n for n in rk.backends.NAMES
                                  if rk.backends.unavailable_reason(n, DEVICE.type)])
def test_forcing_an_unusable_backend_says_why(monkeypatch, name):
    monkeypatch.setenv("RESFUSE_BACKEND", name)
    with pytest.raises(rk.backends.BackendUnavailable, match=f"resfuse backend '{name}'"):
        _call_op()
    reason = rk.backends.unavailable_reason(name, DEVICE.type)
    assert "\n" not in reason


@pytest.mark.parametrize("op", ["highway_gate", "resfuse_tail"])
def test_backward_runs_on_the_forward_backend(monkeypatch, backend, op):
    """A forward under backends.use(name) is differentiated by the same
    backend, also when backward() runs after the with block."""
    module = rk.backends.kernels(DEVICE)  # the forced backend's module
    calls = []
    original = getattr(module, f"{op}_backward")
    monkeypatch.setattr(module, f"{op}_backward",
                        lambda *args: calls.append(op) or original(*args))
    case = (HighwayCase.random((2, 3, 2, 2)) if op == "highway_gate" else
            TailCase.random((2, 3, 2, 2), carry_channels=4))
    y = case.run()
    with rk.backends.use(None):  # lift the fixture's forcing: the default backend
        y.sum().backward()
    assert calls == [op]


def test_use_forces_and_restores():
    before = rk.backends.resolve(DEVICE)
    with rk.backends.use("torch"):
        assert rk.backends.resolve(DEVICE) == "torch"
        y = _call_op()
    assert rk.backends.resolve(DEVICE) == before
    assert torch.isfinite(y).all()
    with pytest.raises(rk.backends.BackendUnavailable, match="unknown backend"):
        with rk.backends.use("nonsense"):
            pass


def test_info_lists_versions_and_backends():
    result = _run_module("resfuse_kernels.info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"torch           {torch.__version__}" in out
    for name in rk.backends.NAMES:
        assert f"  {name:7s} " in out
    assert "  torch   usable" in out
    assert f"cpu tensors run on: {rk.backends.resolve(torch.device('cpu'))}" in out


def test_main_job_prints_table3_parameters():
    result = _run_module("resfuse_kernels.bench", "table3", "--params-only")
    assert result.returncode == 0, result.stderr
    for row in ("| resnet19 | 4,235,172 | 4,235,172 | yes |",
                "| highway19 | 4,235,172 | 4,235,172 | yes |",
                "| resfuse19 | 4,322,084 | 4,322,084 | yes |"):
        assert row in result.stdout
