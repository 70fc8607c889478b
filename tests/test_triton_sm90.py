"""Every Triton kernel compiles for sm_90 with Triton's real compiler.

The other tests run the kernels under the interpreter, which never compiles
them: this one runs ``bench/triton_sm90.py --quick`` (every kernel the ops
launch, forward and backward, train and eval, fp32 and bf16, both layouts,
the first configuration of each; compiled through PTX and ptxas to sm_90
cubins, nothing run) and checks what the compiler reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One worker runs the whole module (pytest-xdist --dist loadgroup), so that
# the kernels are compiled once (~60 s).
pytestmark = pytest.mark.xdist_group("triton_sm90")

# Every kernel the backend launches (a new one must show up here).
KERNELS = {"_stats_kernel", "_stats_finalize", "_bn_grad_finalize", "_forward_kernel",
           "_backward_reduce_kernel", "_backward_apply_kernel", "_carry_stats_kernel",
           "_carry_shift_kernel", "_shift_mean_kernel"}

# Loops over tiles with no tl.dot inside: their per-tile work must stay in
# each thread (register accumulators, one reduction after the loop).
STREAMING = {"_stats_kernel", "_backward_reduce_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_sm90.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def test_every_kernel_compiles(report):
    assert report["errors"] == []
    assert {r["kernel"] for r in report["rows"]} == KERNELS
    layouts = {(r["kernel"], "cl" in r["what"].split()) for r in report["rows"]
               if r["config"]}  # the autotuned kernels, in both layouts
    assert len(layouts) == 2 * len({k for k, _ in layouts})


def test_no_bf16_kernel_spills(report):
    spills = [(r["kernel"], r["what"], r["config"], r["spill_stores"]) for r in report["rows"]
              if r["spill_stores"] and "bf16" in r["what"]]
    assert spills == []


def test_streaming_loops_stay_in_each_thread(report):
    synced = [(r["kernel"], r["what"], r["loop_barriers"], r["loop_shuffles"])
              for r in report["rows"] if r["kernel"] in STREAMING
              and "carry" not in r["what"] and (r["loop_barriers"] or r["loop_shuffles"])]
    assert synced == []
