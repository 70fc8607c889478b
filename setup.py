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
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if cu and torch.version.cuda and CUDA_HOME:
        from torch.utils.cpp_extension import CUDAExtension
        exts.append(CUDAExtension("resfuse_kernels._C_cuda",
                                  sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))) + cu,
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return exts, {"build_ext": TolerantBuild}


if __name__ == "__main__":  # setuptools runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
