"""Builds resfuse_kernels and its compiled backends from csrc/.

Install with the torch you will run it with already installed:

    pip install --no-build-isolation .        (or -e . for a checkout you edit)

A torch extension must be compiled against the torch that loads it, and pip's
default build isolation hides the installed torch from this script (or would
download another one into a throwaway environment), so, as flash-attention
and apex do, the build runs in your environment. Without a visible torch the
build stops and prints the command to run; ``RESFUSE_SKIP_EXT=1`` installs the
pure-Python package (``torch`` and ``triton`` backends only).

* csrc/cpu/*.cpp become the ``cpu`` backend, ``resfuse_kernels._C_cpu``
  (built for AVX2 as ATen's own vectorised kernels; the loader checks the
  CPU). It is stripped, and linked against the OpenMP runtime that torch
  ships (torch/lib/libgomp*), found at run time next to torch. A missing
  compiler or a failed compile stops the install with what to do.
* csrc/cuda/* become the ``cuda`` backend, ``resfuse_kernels._C_cuda``, when
  torch has CUDA and nvcc is found; if that build fails the install goes on
  without it (the ``triton`` backend covers CUDA tensors).
* The wheel requires the torch minor version it was built against (and
  numpy, without which torch warns at import); what was
  built, and why anything was not, is written to
  ``resfuse_kernels/_build_info.json``, which ``python -m
  resfuse_kernels.info`` reads.

Metadata lives in pyproject.toml.
"""

import glob
import json
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# ATen's Vectorized<T> compiles to AVX2 with these, as ATen's own AVX2 kernels.
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without the
# flag it silently runs on one thread.
CPU_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
             "-fopenmp"]
BUILD_INFO = "_build_info.json"
# Commands that compile; metadata-only ones (egg_info, sdist) never need torch.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop",
            "bdist_egg"}
PURE = "RESFUSE_SKIP_EXT=1 pip install .   (pure Python: torch and triton backends only)"


def _stop(*lines):
    """End the install with what to do (pip prints it under 'error')."""
    raise SystemExit("\n".join(["", "resfuse-kernels: cannot build the C++ backend.", *lines, ""]))


def _nvcc(cuda_home):
    """The nvcc that torch's CUDAExtension will use, or None."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def _cuda_arch_flags():
    """sm_90 code plus compute_90 PTX (which newer GPUs JIT-compile), unless
    TORCH_CUDA_ARCH_LIST is set: then torch's own arch flags apply."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def _cuda_extension(torch, cuda_home, reasons):
    """The ``_C_cuda`` extension when torch has CUDA and nvcc is found, else
    None with the reason in ``reasons['cuda']``."""
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cu:
        return None
    if not torch.version.cuda:
        reasons["cuda"] = f"not built: torch {torch.__version__} at build time had no CUDA"
        return None
    if _nvcc(cuda_home) is None:
        reasons["cuda"] = "not built: torch has CUDA but nvcc was not found (set CUDA_HOME)"
        warnings.warn(reasons["cuda"])
        return None
    try:
        from torch.utils.cpp_extension import CUDAExtension
        return CUDAExtension(
            "resfuse_kernels._C_cuda",
            sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))) + cu,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *_cuda_arch_flags()]},
            extra_link_args=_strip_args())
    except Exception as exc:  # noqa: BLE001 - a broken CUDA toolkit setup
        reasons["cuda"] = f"not built: cannot plan it ({exc})"
        warnings.warn(reasons["cuda"])
        return None


def _strip_args():
    """Link stripped (a 12 MB library becomes ~0.6 MB) unless RESFUSE_DEBUG_EXT=1."""
    return [] if os.environ.get("RESFUSE_DEBUG_EXT") == "1" else ["-s"]


def torch_openmp(torch_lib):
    """torch's own OpenMP runtime (torch/lib/libgomp*.so*), or None if torch
    ships none (then the compiler's -fopenmp runtime is the one torch uses)."""
    found = sorted(glob.glob(os.path.join(torch_lib, "libgomp*.so*")))
    return found[0] if found else None


def _cpu_link_args(torch_lib):
    gomp = torch_openmp(torch_lib)
    if gomp is None:
        return ["-fopenmp", *_strip_args()]
    # The file itself (NEEDED: its soname) and a run path to torch's lib dir in
    # a wheel's layout (site-packages/resfuse_kernels -> site-packages/torch/lib).
    return [gomp, "-Wl,-rpath,$ORIGIN/../torch/lib", *_strip_args()]


def _torch_requirement(torch):
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def _extensions():
    """(ext_modules, cmdclass, install_requires) for this environment."""
    if os.environ.get("RESFUSE_SKIP_EXT") == "1":
        return [], {}, ["torch>=2.4", "numpy"]
    cpp = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension
    except ImportError:
        if BUILDING.intersection(sys.argv[1:]):
            _stop("torch is not importable here: pip's build isolation hides the installed",
                  "torch from the build. Install torch first, then:",
                  "    pip install --no-build-isolation .      (or -e . for a checkout)",
                  "(in a bare venv also: pip install setuptools wheel), or, without C++:",
                  f"    {PURE}")
        return [], {}, ["torch>=2.4", "numpy"]   # metadata only (egg_info, sdist)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    reasons = {"cpu": None, "cuda": None}

    class Build(BuildExtension):
        """Stops on a failed cpu build; goes on without the cuda one; writes
        what was built, against which torch, to _build_info.json."""

        def run(self):
            compiler = os.environ.get("CXX", "c++")
            if shutil.which(compiler) is None:
                _stop(f"No C++ compiler ({compiler!r}) on PATH: install one (Debian/Ubuntu:",
                      "apt-get install g++; or set CXX) and rerun, or, without C++:",
                      f"    {PURE}")
            super().run()
            self._write_info()

        def build_extension(self, ext):
            if ext.name.endswith("_C_cpu") and torch_openmp(torch_lib) and (
                    self.inplace or getattr(self, "editable_mode", False)):
                # An in-place (editable) build has no torch/ beside it: name torch's lib dir.
                ext.extra_link_args = [*ext.extra_link_args, f"-Wl,-rpath,{torch_lib}"]
            if ext.name.endswith("_C_cuda"):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001 - any toolchain failure
                    reasons["cuda"] = f"not built: its build failed ({exc})"
                    warnings.warn(reasons["cuda"])
                return
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - report, with the way out
                _stop(f"Compiling {ext.name} failed: {exc}",
                      "(pip install -v ... shows the compiler's output). Fix the compiler "
                      "(g++ >= 9) or, without C++:", f"    {PURE}")

        def _write_info(self):
            where = os.path.dirname(self.get_ext_fullpath("resfuse_kernels._C_cpu"))
            os.makedirs(where, exist_ok=True)
            info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "openmp": torch_openmp(torch_lib), "reasons": reasons}
            with open(os.path.join(where, BUILD_INFO), "w") as f:
                json.dump(info, f, indent=1)

    exts = [CppExtension("resfuse_kernels._C_cpu", cpp, extra_compile_args=CPU_FLAGS,
                         extra_link_args=_cpu_link_args(torch_lib))]
    cuda_ext = _cuda_extension(torch, CUDA_HOME, reasons)
    if cuda_ext is not None:
        exts.append(cuda_ext)
    return exts, {"build_ext": Build}, [_torch_requirement(torch), "numpy"]


if __name__ == "__main__":  # setuptools runs this file as __main__
    ext_modules, cmdclass, requires = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=requires)
