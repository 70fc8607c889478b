"""Shared benchmark machinery: timing, peak memory, environment, output files.

Timing rules (DESIGN.md section 7):

* warm-up runs are never timed (the first call of a compiled callable, which
  compiles it, is timed on its own and reported as the compile time);
* on CUDA each timed run is bracketed by ``torch.cuda.Event``s and the
  elapsed time read after a synchronisation; on CPU by ``time.perf_counter``
  (CPU work is synchronous);
* the figure reported is the median of the repeated runs (min and max are
  kept in the JSON too).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before each
measurement; reported as the peak above what was allocated before it). On
CPU it is not measured (reported as ``None``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

DEFAULT_OUT = Path("bench") / "results"


def log(message: str) -> None:
    """One progress line, flushed at once."""
    print(message, flush=True)


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return device.type


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model or platform.processor()} ({os.cpu_count()} logical cores, " \
           f"torch threads {torch.get_num_threads()})"


def _version(module: str) -> Optional[str]:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - absent or broken: report, never fail
        return None


def git_commit(where: Optional[Path] = None) -> Optional[str]:
    """The commit of the checkout holding ``where`` (default: this package),
    with ``-dirty`` if a tracked file outside ``bench/results`` has changes
    (results written by an earlier run are not a change to the code
    measured), or None."""
    here = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top)", ":(top,exclude)bench/results"],
                               cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Device, versions, commit and time: written into every JSON result."""
    from .. import __version__, backends
    return {
        "device": device_description(device),
        "device_type": device.type,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "resfuse_kernels": __version__,
        },
        "git_commit": git_commit(),
        "driver": cuda_driver() if device.type == "cuda" else None,
        "backends": {name: reason or "usable" for name, reason in backends.status().items()},
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def cuda_driver() -> Optional[str]:
    """The NVIDIA driver version (nvidia-smi), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (x86: AVX512-BF16
    or AMX; Arm: the BF16 extension). Without it PyTorch emulates bf16 and a
    bf16 convolution runs several times slower than a float32 one (9x on an
    AVX2 AMD EPYC here), so a bf16 benchmark there measures the emulation."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in probes):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("Features") and " bf16" in line for line in f)
        except OSError:
            return False
    return False


def load_average() -> Optional[list[float]]:
    """The host's 1/5/15-minute load averages (other jobs skew CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def load_note(env: dict) -> Optional[str]:
    """A report line on the host load, for CPU runs."""
    start, end = env.get("load_average_at_start"), env.get("load_average_at_end")
    if env.get("device_type") != "cpu" or not start:
        return None
    return (f"host load average (1 min) {start[0]} at start, "
            f"{end[0] if end else '?'} at end, on {os.cpu_count()} logical cores: "
            "other jobs on a shared CPU skew absolute times; ratios within one run are "
            "the figures that count")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times one region: device events on CUDA, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
        else:
            self.seconds_ = time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return self.seconds_


def wall(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()`` including a final synchronisation
    (used for first calls: compilation is host time, not device time)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def rounds(items: list, count: int) -> Iterator:
    """The items of ``count`` interleaved rounds, each round in another order
    (round ``i`` starts with item ``i mod len``): providers timed this way
    share whatever the machine's load does during the run."""
    for i in range(count):
        k = i % len(items)
        yield from items[k:] + items[:k]


def summarize(times: Iterable[float]) -> dict:
    times = list(times)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": len(times), "times_s": times}


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the bytes allocated now."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def read_peak(device: torch.device, baseline: int = 0) -> Optional[int]:
    """Peak bytes allocated since :func:`reset_peak`, above ``baseline``; None on CPU."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return None


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
