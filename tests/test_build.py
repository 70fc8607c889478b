"""setup.py's extension plan and which compiled backends this install has."""

from __future__ import annotations

import glob
import json
import os
import runpy
import shutil
import subprocess
import sys

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
    assert _plan(monkeypatch, RESFUSE_SKIP_EXT="1") == ([], {}, ["torch>=2.4", "numpy"])


def test_cpu_extension_is_planned(monkeypatch):
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    exts, cmdclass, requires = _plan(monkeypatch)
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


def test_the_wheel_requires_the_torch_it_was_built_against(monkeypatch):
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    major, minor = torch.__version__.split(".")[:2]
    assert _plan(monkeypatch)[2] == [f"torch=={major}.{minor}.*", "numpy"]


def test_cpu_extension_links_torchs_openmp_stripped(monkeypatch):
    """The planned link line: torch's own libgomp (the runtime torch itself
    loads), a run path to it in a wheel's layout, and -s (stripped)."""
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    monkeypatch.delenv("RESFUSE_DEBUG_EXT", raising=False)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    gomp = sorted(glob.glob(os.path.join(torch_lib, "libgomp*.so*")))
    if not gomp:
        pytest.skip("this torch ships no libgomp (it uses the compiler's)")
    (cpu,) = [e for e in _plan(monkeypatch)[0] if e.name == "resfuse_kernels._C_cpu"]
    assert cpu.extra_link_args == [gomp[0], "-Wl,-rpath,$ORIGIN/../torch/lib", "-s"]
    assert "-fopenmp" in cpu.extra_compile_args


@pytest.mark.parametrize("command", ["bdist_wheel", "editable_wheel", "build_ext"])
def test_build_without_torch_stops_with_the_command_to_run(monkeypatch, command):
    """pip's build isolation hides torch: the build stops and says what to run,
    instead of installing a package without its C++ backend."""
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch fails
    monkeypatch.setattr(sys, "argv", ["setup.py", command])
    with pytest.raises(SystemExit) as stop:
        _plan(monkeypatch)
    message = str(stop.value)
    assert "pip install --no-build-isolation ." in message
    assert "RESFUSE_SKIP_EXT=1 pip install ." in message


def test_metadata_without_torch_needs_no_compiler(monkeypatch):
    """egg_info / sdist (what pip asks before building) work without torch."""
    monkeypatch.delenv("RESFUSE_SKIP_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(sys, "argv", ["setup.py", "egg_info"])
    assert _plan(monkeypatch) == ([], {}, ["torch>=2.4", "numpy"])


def _built_cpu_library():
    if rk.backends.status()["cpu"] is not None:
        pytest.skip(f"cpu backend: {rk.backends.status()['cpu']}")
    if shutil.which("readelf") is None:
        pytest.skip("no readelf")
    import importlib.util
    return importlib.util.find_spec("resfuse_kernels._C_cpu").origin


def test_built_library_is_stripped():
    origin = _built_cpu_library()
    sections = subprocess.run(["readelf", "-S", "-W", origin], capture_output=True,
                              text=True, check=True).stdout
    assert ".dynsym" in sections                      # the exported symbols stay
    assert ".symtab" not in sections and ".debug_info" not in sections, origin


def test_built_library_resolves_openmp_to_torchs():
    origin = _built_cpu_library()
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if not glob.glob(os.path.join(torch_lib, "libgomp*.so*")):
        pytest.skip("this torch ships no libgomp")
    dynamic = subprocess.run(["readelf", "-d", origin], capture_output=True, text=True,
                             check=True).stdout
    assert "$ORIGIN/../torch/lib" in dynamic
    ldd = subprocess.run(["ldd", origin], capture_output=True, text=True).stdout
    (line,) = [ln for ln in ldd.splitlines() if "libgomp" in ln]
    resolved = line.split("=>")[1].split("(")[0].strip()
    assert os.path.realpath(os.path.dirname(resolved)) == os.path.realpath(torch_lib), line


# ---------------------------------------------------------------- info's reasons


def test_reason_without_a_build_names_the_command(monkeypatch, tmp_path):
    from resfuse_kernels import _build
    monkeypatch.setattr(_build, "INFO", str(tmp_path / "absent.json"))
    monkeypatch.setattr(_build, "installed_elsewhere", lambda: None)
    reason = _build.missing_reason("cpu")
    assert reason.startswith("not built: this copy was installed without compiling csrc/")
    assert reason.endswith(f"pip install --no-build-isolation -e {ROOT}")


def test_reason_recorded_by_the_build_is_reported(monkeypatch, tmp_path):
    from resfuse_kernels import _build
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch": "2.0.0", "reasons": {
        "cpu": None, "cuda": "not built: torch has CUDA but nvcc was not found (set CUDA_HOME)"}}))
    monkeypatch.setattr(_build, "INFO", str(info))
    assert _build.missing_reason("cuda") == \
        "not built: torch has CUDA but nvcc was not found (set CUDA_HOME)"
    assert _build.missing_reason("cpu") == (
        f"not built: the install (torch 2.0.0) left no library for it; to rebuild: "
        f"pip install --no-build-isolation -e {ROOT}")
    # A library built against another torch: say so, not just the loader's error.
    reason = _build.load_failure_reason("/x/_C_cpu.so", OSError("/x/_C_cpu.so: undefined "
                                                                 "symbol: _ZN3c10"))
    assert reason.startswith(f"built against torch 2.0.0 but this is torch {torch.__version__}")
    assert "undefined symbol" in reason and "--no-build-isolation" in reason


def test_info_reports_the_cpu_backend_reason(monkeypatch):
    """info prints each backend's reason as the loader gives it."""
    from resfuse_kernels import backends, info
    monkeypatch.setitem(backends._loaded, "cpu", "not available: not built: TEST REASON")
    assert "  cpu     not available: not built: TEST REASON" in info.report().splitlines()


def test_reason_names_the_installed_copy_when_a_checkout_shadows_it(monkeypatch, tmp_path):
    """`pip install .` then `python -m resfuse_kernels.info` in the clone: Python
    imports the clone's uncompiled source, not the installed package."""
    from resfuse_kernels import _build
    monkeypatch.setattr(_build, "INFO", str(tmp_path / "absent.json"))
    monkeypatch.setattr(_build, "installed_elsewhere", lambda: "/site/resfuse_kernels")
    reason = _build.missing_reason("cpu")
    assert reason.startswith(f"not built in {_build.HERE}, the copy Python imported")
    assert "the installed copy is /site/resfuse_kernels: run from another directory" in reason
