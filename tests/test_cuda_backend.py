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
import platform
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import resfuse_kernels as rk
from conftest import assert_close, error_bound
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
# the kernels against the composite: on a GPU, and on the CPU emulation

_REASON = rk.backends.unavailable_reason("cuda", "cuda")
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend: {_REASON}")


def _act(shape, dtype, layout, device, mean=0.0):
    t = (torch.randn(shape, device=device) + mean).to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a buffer twice as wide
        wide = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return t


def _bn(c, device):
    return (1 + 0.5 * torch.randn(c, device=device), 0.5 * torch.randn(c, device=device),
            0.2 * torch.randn(c, device=device), 0.5 + torch.rand(c, device=device))


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _close(got, oracle, base, dtype, what):
    """``got`` has the dtype, shape and strides of ``base`` (the composite at
    the same precision) and is within the suite's rule (conftest.RULE) of
    ``oracle`` (the composite in float64), ``base`` being PyTorch's own."""
    assert got.shape == base.shape and got.dtype == base.dtype, (what, got.shape, base.shape,
                                                                 got.dtype, base.dtype)
    if got.dim() == 4 and got.numel() > 0:
        assert got.stride() == base.stride(), f"{what}: strides {got.stride()} != {base.stride()}"
    assert_close(got, oracle, dtype, what, base)


def _compare(ops, name, args, names, chained=None):
    """ops.<name> against the composite's, the composite at float64 being
    the oracle. Returns the three runs' outputs (composite, oracle, ops).

    ``chained`` (a backward after a forward): a function of a run's forward
    outputs giving the statistics to append to its arguments, so that each
    backward gets the statistics its own forward returned, as autograd hands
    them (the cpu and cuda backwards centre the carry on the batch mean they
    recompute in double, not on the rounded mean they are given)."""
    dtype = args[0].dtype
    runs = [(getattr(composite, name), args), (getattr(composite, name), _f64(args)),
            (getattr(ops, name), args)]
    outs = []
    for i, (fn, a) in enumerate(runs):
        outs.append(fn(*(a if chained is None else chained(a, i))))
    base, oracle, got = outs
    for what, g, o, b in zip(names, got, oracle, base):
        _close(g, o, b, dtype, what)
    return outs


def _compare_highway(ops, device, shape, dtype, layout, training):
    """ops.highway_gate_{forward,backward} against the composite's."""
    a, b, x, g = (_act(shape, dtype, layout, device, mean=m) for m in (3.0, -1.0, 0.0, 0.0))
    wh, bh, rmh, rvh = _bn(shape[1], device)
    wt, bt, rmt, rvt = _bn(shape[1], device)
    args = (a, b, x, wh, bh, rmh, rvh, wt, bt, rmt, rvt, training, 1e-5, 1e-3)
    forwards = _compare(ops, "highway_gate_forward", args,
                        ("y", "mean_h", "var_h", "mean_t", "var_t"))

    def with_stats(tensors, run):
        g_, a_, b_, x_, wh_, bh_, wt_, bt_ = tensors
        _, mh, vh, mt, vt = forwards[run]
        return (g_, a_, b_, x_, wh_, bh_, mh, vh, wt_, bt_, mt, vt, training, 1e-5, 1e-3)

    # g zero where the oracle's BN_h(a), the ReLU's input, lies within y's
    # allowed error of 0, as for the tail (_off_the_kink): there a correct
    # kernel may take the other side (soak seed 4067512519, bf16: da erred
    # the whole gradient of one such element)
    _, mh, vh, _, _ = forwards[1]
    a64, wh64, bh64 = _f64((a, wh, bh))
    z = (a64 - mh.view(1, -1, 1, 1)) * (wh64 / (vh + 1e-5).sqrt()).view(1, -1, 1, 1)
    z = z + bh64.view(1, -1, 1, 1)
    g = g.masked_fill_(z.abs() <= error_bound(forwards[1][0], forwards[0][0], dtype), 0.0)
    tensors = (g, a, b, x, wh, bh, wt, bt)
    _compare(ops, "highway_gate_backward", tensors,
             ("da", "db", "dx", "dweight_h", "dbias_h", "dweight_t", "dbias_t"),
             chained=with_stats)


def _off_the_kink(g, forwards, u, h, wd, bd, x, w, wk, bk, dtype):
    """g, zero where the oracle's ReLU input z lies within y's allowed error
    of 0 (conftest.py: there a correct kernel may take the other side)."""
    _, md, vd, mk, vk = forwards[1]  # the oracle's statistics (eval: the running ones)
    z = (u - md.view(1, -1, 1, 1)) * (wd / (vd + 0.1).sqrt()).view(1, -1, 1, 1)
    z = z + bd.view(1, -1, 1, 1) + h
    if x is not None:
        v = torch.nn.functional.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1))
        z = z + ((v - mk.view(1, -1, 1, 1)) * (wk / (vk + 1e-4).sqrt()).view(1, -1, 1, 1)
                 + bk.view(1, -1, 1, 1))
    width = error_bound(forwards[1][0], forwards[0][0], dtype)
    return g.masked_fill_(z.abs() <= width, 0.0)


def _compare_tail(ops, device, shape, dtype, layout, training, carry, carry_channels=5):
    """ops.resfuse_tail_{forward,backward} against the composite's."""
    n, c, hgt, wid = shape
    u, h, g = (_act(shape, dtype, layout, device, mean=m) for m in (2.0, 0.0, 0.0))
    wd, bd, rmd, rvd = _bn(c, device)
    if carry:
        x = _act((n, carry_channels, hgt, wid), dtype, layout, device)
        w = 0.3 * torch.randn(c, carry_channels, 1, 1, device=device)
        wk, bk, rmk, rvk = _bn(c, device)
    else:
        x = w = wk = bk = rmk = rvk = None
    args = (u, h, wd, bd, rmd, rvd, x, w, wk, bk, rmk, rvk, training, 0.1, 1e-4)
    forwards = _compare(ops, "resfuse_tail_forward", args,
                        ("y", "mean_d", "var_d", "mean_k", "var_k"))
    g = _off_the_kink(g, forwards, *_f64((u, h, wd, bd, x, w, wk, bk)), dtype)

    def with_stats(tensors, run):
        g_, u_, h_, wd_, bd_, x_, w_, wk_, bk_ = tensors
        _, md, vd, mk, vk = forwards[run]
        return (g_, u_, h_, wd_, bd_, md, vd, x_, w_, wk_, bk_, mk, vk, training, 0.1, 1e-4)

    _compare(ops, "resfuse_tail_backward", (g, u, h, wd, bd, x, w, wk, bk),
             ("du", "dh", "dweight_d", "dbias_d", "dx", "dw", "dweight_k", "dbias_k"),
             chained=with_stats)


LAYOUTS = ["nchw", "channels_last", "strided"]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_highway_gate_matches_composite(dtype, layout, training):
    from resfuse_kernels import _ext_cuda

    # odd H*W (scalar path in NCHW); C a multiple of every vector width
    _compare_highway(_ext_cuda, "cuda", (3, 24, 7, 9), dtype, layout, training)
    _compare_highway(_ext_cuda, "cuda", (4, 64, 8, 8), dtype, layout, training)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("carry", [True, False], ids=["carry", "plain"])
def test_resfuse_tail_matches_composite(dtype, layout, training, carry):
    from resfuse_kernels import _ext_cuda

    _compare_tail(_ext_cuda, "cuda", (2, 16, 6, 5), dtype, layout, training, carry)
    _compare_tail(_ext_cuda, "cuda", (4, 64, 8, 8), dtype, layout, training, carry)


@needs_cuda
def test_statistics_at_a_large_mean():
    """Variance stays accurate (and non-negative) when the mean dwarfs the spread."""
    from resfuse_kernels import _ext_cuda

    a = (1000.0 + 0.01 * torch.randn(4, 8, 33, 33, device="cuda", dtype=torch.float64)).float()
    x = torch.randn_like(a)
    wh, bh, _, _ = _bn(8, "cuda")
    wt, bt, _, _ = _bn(8, "cuda")
    for t in (a, a.contiguous(memory_format=torch.channels_last)):
        _, mean, var, _, _ = _ext_cuda.highway_gate_forward(
            t, t, x, wh, bh, None, None, wt, bt, None, None, True, 1e-5, 1e-5)
        want_var, want_mean = torch.var_mean(a.double(), dim=(0, 2, 3), correction=0)
        assert (var >= 0).all()
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-3, atol=0)


# The same sources compiled as C++ on csrc/cuda/emulation.h (fibers for CUDA
# threads, barriers for __syncthreads) run on CPU tensors: index math,
# reductions, block synchronisation and the host code are checked without a
# GPU. Every CUDA thread runs as a fiber, so the cases are few and small.

EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")


def _build_emulation(out_dir):
    from torch.utils.cpp_extension import include_paths

    compiler = os.environ.get("CXX", "g++")
    flags = ["-std=c++17", "-O1", "-fPIC", "-DRESFUSE_CUDA_EMULATION", "-Wno-unknown-pragmas",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in include_paths())]
    objects = []
    for name in ("highway_gate", "resfuse_tail", "register"):
        obj = os.path.join(out_dir, f"{name}.o")
        subprocess.run([compiler, *flags, "-c", os.path.join(EMULATION, f"{name}.cpp"), "-o", obj],
                       check=True, capture_output=True, text=True, timeout=900)
        objects.append(obj)
    lib = os.path.join(out_dir, "libresfuse_cuda_emu.so")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    subprocess.run([compiler, "-shared", "-o", lib, *objects, f"-L{torch_lib}", "-lc10",
                    "-ltorch_cpu", "-ltorch", "-pthread"],
                   check=True, capture_output=True, text=True, timeout=300)
    return lib


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """torch.ops.resfuse_cuda_emu: the CUDA kernels on the CPU emulation."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the CPU emulation of the CUDA kernels")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the CUDA emulation's fibers switch stacks in x86-64 assembly, "
                    f"not on {platform.machine()}")
    if not hasattr(torch.ops.resfuse_cuda_emu, "highway_gate_forward"):
        try:
            lib = _build_emulation(str(tmp_path_factory.mktemp("cuda_emu")))
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"building the CUDA emulation failed:\n{exc.stderr[-6000:]}")
        torch.ops.load_library(lib)
    return torch.ops.resfuse_cuda_emu


EMULATED_CASES = [  # (shape, dtype, layout, training)
    ((2, 16, 4, 4), torch.float32, "nchw", True),          # vectorised NCHW
    ((2, 16, 4, 4), torch.float32, "channels_last", True),  # vectorised channels_last
    ((3, 24, 7, 9), torch.bfloat16, "channels_last", True),
    ((3, 24, 7, 9), torch.float32, "nchw", False),          # scalar path (odd H*W)
    ((1, 3, 5, 5), torch.float16, "channels_last", True),   # scalar path (odd C)
    ((2, 8, 3, 4), torch.float64, "strided", True),         # copied, then vectorised
    ((2, 8, 1, 1), torch.float32, "nchw", True),            # 1x1 images
    ((0, 8, 4, 4), torch.float32, "channels_last", True),   # empty batch
]


# One worker runs every test of the emulation (pytest-xdist --dist loadgroup),
# so that it is built once (~50 s).
@pytest.mark.xdist_group("cuda_emulation")
@pytest.mark.parametrize("shape,dtype,layout,training", EMULATED_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}-"
                              f"{'train' if c[3] else 'eval'}" for c in EMULATED_CASES])
def test_emulated_kernels_match_composite(emulated, shape, dtype, layout, training):
    _compare_highway(emulated, "cpu", shape, dtype, layout, training)
    for carry in (True, False):
        _compare_tail(emulated, "cpu", shape, dtype, layout, training, carry)


@pytest.mark.xdist_group("cuda_emulation")
def test_emulated_kernels_propagate_nan(emulated):
    shape = (2, 8, 4, 4)
    for training in (True, False):
        u, h = torch.randn(shape), torch.randn(shape)
        x = torch.randn(2, 3, 4, 4)
        u[0, 1, 2, 2] = float("nan")
        x[1, 0, 0, 3] = float("nan")
        wd, bd, rmd, rvd = _bn(8, "cpu")
        wk, bk, rmk, rvk = _bn(8, "cpu")
        w = torch.randn(8, 3)
        args = (u, h, wd, bd, rmd, rvd, x, w, wk, bk, rmk, rvk, training, 1e-5, 1e-5)
        want = composite.resfuse_tail_forward(*args)[0]
        got = emulated.resfuse_tail_forward(*args)[0]
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True)
