"""Builds resfuse_kernels and, where it can, its compiled backends from csrc/.

* C++ sources (csrc/cpu/*.cpp) become the ``cpu`` backend's library
  ``resfuse_kernels._C_cpu`` whenever a compiler is there (built for AVX2,
  as ATen's own vectorised kernels; the loader checks the CPU); CUDA sources
  (csrc/cuda/*) become ``resfuse_kernels._C_cuda`` when torch has CUDA and
  nvcc is found. A failed or impossible build warns and installs the pure-Python
  package: the ``torch`` (and ``triton``) backends still work.
* ``RESFUSE_SKIP_EXT=1`` skips the extension altogether.

Metadata lives in pyproject.toml.
"""

import glob
import os
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# ATen's Vectorized<T> compiles to AVX2 with these, as ATen's own AVX2 kernels.
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without the
# flag it silently runs on one thread.
CPU_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
             "-fopenmp"]


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


def _cuda_extension(torch, cuda_home):
    """The ``_C_cuda`` extension when torch has CUDA and nvcc is found, else None."""
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cu or not torch.version.cuda:
        return None
    if _nvcc(cuda_home) is None:
        warnings.warn("torch has CUDA but nvcc was not found (set CUDA_HOME): installing "
                      "without the cuda backend")
        return None
    try:
        from torch.utils.cpp_extension import CUDAExtension
        return CUDAExtension(
            "resfuse_kernels._C_cuda",
            sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))) + cu,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *_cuda_arch_flags()]})
    except Exception as exc:  # noqa: BLE001 - a broken CUDA toolkit setup
        warnings.warn(f"cannot plan the cuda backend ({exc}); it will be unavailable")
        return None


def _extensions():
    if os.environ.get("RESFUSE_SKIP_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: installing without the "
                      "compiled backends (use pip install --no-build-isolation)")
        return [], {}

    class TolerantBuild(BuildExtension):
        """Never fail the install because a compiled backend did not build."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure
                warnings.warn(f"building {ext.name} failed ({exc}); it will be unavailable")

    exts = [CppExtension("resfuse_kernels._C_cpu", cpp, extra_compile_args=CPU_FLAGS,
                         extra_link_args=["-fopenmp"])]
    cuda_ext = _cuda_extension(torch, CUDA_HOME)
    if cuda_ext is not None:
        exts.append(cuda_ext)
    return exts, {"build_ext": TolerantBuild}


if __name__ == "__main__":  # setuptools runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
