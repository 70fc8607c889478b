"""The ``cuda`` backend (csrc/cuda): it compiles, loads or says why not, and
matches the composite ``torch`` backend.

The compile check runs wherever nvcc is installed, GPU or not (about a
minute on 2 cores: two .cu files and one .cpp). The comparison needs a CUDA
device and the built extension; the generic contract tests (test_ops.py and
the rest) cover the backend in depth on such a machine, since they run once
per usable backend.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import resfuse_kernels as rk
from resfuse_kernels.ops import composite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "csrc", "cuda", "compile_check.sh")


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("NVCC"),
                    reason="nvcc is not installed: the CUDA sources cannot be compiled here")
def test_cuda_sources_compile(tmp_path):
    """nvcc -c of every csrc/cuda source for sm_90 against this torch's headers."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "skipped" not in proc.stdout, log
    sources = [f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
               if f.endswith((".cu", ".cpp"))]
    for source in sources:
        assert (tmp_path / (os.path.splitext(source)[0] + ".o")).exists(), log


def test_compile_check_skips_without_nvcc(tmp_path):
    env = {**os.environ, "PATH": "/nonexistent", "NVCC": "", "OUT": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped: nvcc not found" in proc.stdout


def test_unavailable_cuda_backend_says_why_in_one_line():
    reason = rk.backends.unavailable_reason("cuda")
    if reason is None:
        assert torch.cuda.is_available()
    else:
        assert "\n" not in reason and reason.startswith("not available: ")


def test_setup_plans_sm90_code_and_ptx_unless_arch_list_is_set(monkeypatch):
    monkeypatch.chdir(ROOT)
    arch_flags = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="plan")["_cuda_arch_flags"]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert arch_flags() == ["-gencode=arch=compute_90,code=sm_90",
                            "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert arch_flags() == []  # torch's own flags from the list apply


# ---------------------------------------------------------------------------
# on a GPU: the kernels against the composite

_REASON = rk.backends.unavailable_reason("cuda", "cuda")
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend: {_REASON}")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """The composite's carry is F.conv2d, which cuDNN runs in TF32 by default
    (allow_tf32 is True for convolutions): that alone would miss the fp32
    tolerance. The kernels' cuBLAS products are full fp32 either way."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _act(shape, dtype, channels_last, mean=0.0):
    t = (torch.randn(shape, device="cuda") + mean).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _bn(c):
    kw = dict(device="cuda")
    return (1 + 0.5 * torch.randn(c, **kw), 0.5 * torch.randn(c, **kw),
            0.2 * torch.randn(c, **kw), 0.5 + torch.rand(c, **kw))


def _close(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    if got.dim() == 4:
        assert got.is_contiguous(memory_format=torch.channels_last) == \
            want.is_contiguous(memory_format=torch.channels_last), f"{what}: memory format"
    if want.numel() == 0:
        return
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2,
           torch.float16: 4e-3}[dtype]
    scale = max(want.double().abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:.1g} x {scale:.3g}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_highway_gate_matches_composite(dtype, channels_last, training):
    from resfuse_kernels import _ext_cuda

    shape = (3, 24, 7, 9)  # odd S; C divisible by the vector widths
    a, b, x, g = (_act(shape, dtype, channels_last, mean=m) for m in (3.0, -1.0, 0.0, 0.0))
    wh, bh, rmh, rvh = _bn(shape[1])
    wt, bt, rmt, rvt = _bn(shape[1])
    args = (a, b, x, wh, bh, rmh, rvh, wt, bt, rmt, rvt, training, 1e-5, 1e-3)
    want = composite.highway_gate_forward(*args)
    got = _ext_cuda.highway_gate_forward(*args)
    for name, w_, g_ in zip(("y", "mean_h", "var_h", "mean_t", "var_t"), want, got):
        _close(g_, w_, dtype, name)
    _, mh, vh, mt, vt = want
    bargs = (g, a, b, x, wh, bh, mh, vh, wt, bt, mt, vt, training, 1e-5, 1e-3)
    want = composite.highway_gate_backward(*bargs)
    got = _ext_cuda.highway_gate_backward(*bargs)
    for name, w_, g_ in zip(("da", "db", "dx", "dweight_h", "dbias_h", "dweight_t", "dbias_t"),
                            want, got):
        _close(g_, w_, dtype, name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("carry", [True, False], ids=["carry", "plain"])
def test_resfuse_tail_matches_composite(dtype, channels_last, training, carry):
    from resfuse_kernels import _ext_cuda

    n, c, cx, hgt, wid = 2, 16, 5, 6, 5
    u, h, g = (_act((n, c, hgt, wid), dtype, channels_last, mean=m) for m in (2.0, 0.0, 0.0))
    wd, bd, rmd, rvd = _bn(c)
    if carry:
        x = _act((n, cx, hgt, wid), dtype, channels_last)
        w = 0.3 * torch.randn(c, cx, 1, 1, device="cuda")
        wk, bk, rmk, rvk = _bn(c)
    else:
        x = w = wk = bk = rmk = rvk = None
    args = (u, h, wd, bd, rmd, rvd, x, w, wk, bk, rmk, rvk, training, 1e-5, 1e-5)
    want = composite.resfuse_tail_forward(*args)
    got = _ext_cuda.resfuse_tail_forward(*args)
    for name, w_, g_ in zip(("y", "mean_d", "var_d", "mean_k", "var_k"), want, got):
        _close(g_, w_, dtype, name)
    _, md, vd, mk, vk = want
    bargs = (g, u, h, wd, bd, md, vd, x, w, wk, bk, mk, vk, training, 1e-5, 1e-5)
    want = composite.resfuse_tail_backward(*bargs)
    got = _ext_cuda.resfuse_tail_backward(*bargs)
    for name, w_, g_ in zip(("du", "dh", "dweight_d", "dbias_d", "dx", "dw", "dweight_k",
                             "dbias_k"), want, got):
        _close(g_, w_, dtype, name)


@needs_cuda
def test_statistics_at_a_large_mean():
    """Variance stays accurate (and non-negative) when the mean dwarfs the spread."""
    from resfuse_kernels import _ext_cuda

    a = 1000.0 + 0.01 * torch.randn(4, 8, 33, 33, device="cuda", dtype=torch.float64)
    x = torch.randn_like(a)
    wh, bh, _, _ = _bn(8)
    wt, bt, _, _ = _bn(8)
    _, mean, var, _, _ = _ext_cuda.highway_gate_forward(
        a.float(), a.float(), x.float(), wh, bh, None, None, wt, bt, None, None, True, 1e-5, 1e-5)
    want_var, want_mean = torch.var_mean(a.float().double(), dim=(0, 2, 3), correction=0)
    assert (var >= 0).all()
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-3, atol=0)
