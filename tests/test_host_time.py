"""bench/host_time.py: the host-time table and its breakdown of the fused
eager call, at a tiny size with few repetitions (the timings themselves are
not asserted: only that each piece ran and was accounted for)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from resfuse_kernels.bench.ops import Case

_PATH = Path(__file__).resolve().parents[1] / "bench" / "host_time.py"
_spec = importlib.util.spec_from_file_location("host_time", _PATH)
host_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_time)


@pytest.mark.parametrize("op", ["highway_gate", "resfuse_tail", "resfuse_tail_carry"])
def test_breakdown_pieces_replay_the_fused_call(op):
    """The pieces re-run what the op's call runs: the kernels' forward gives
    the fused output, and the update moves the running statistics as the
    op's own call moved them."""
    torch.manual_seed(0)
    case = Case(op, (2, 4, 3, 3), "cpu", torch.float64, False, seed=1)
    bn = case.bns[0]
    before = bn.running_mean.clone()
    y = case.fused()
    moved = bn.running_mean - before
    assert moved.abs().max() > 0
    pieces = host_time.parts(case)
    assert set(pieces) == {"kernels", "checks", "running update",
                           "autograd.Function floor"}
    snapshot = bn.running_mean.clone()
    pieces["running update"]()
    # the same batch mean m folded in again with momentum 0.1, where the
    # op's call moved the running mean by 0.1 (m - before)
    expected = torch.lerp(snapshot, before + moved / 0.1, 0.1)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-12, atol=1e-12)
    pieces["checks"]()
    pieces["kernels"]()
    torch.testing.assert_close(case.fused(), y, rtol=0, atol=0)
    # the floor hands autograd the gradients the op's backward gives
    for got, want in zip(pieces["autograd.Function floor"](), case.backward(case.fused())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_measure_reports_a_breakdown_that_adds_up():
    row = host_time.measure("resfuse_tail", (1, 4, 2, 2), "cpu", ["eager"], reps=2, count=1)
    pieces = row["breakdown_us"]
    measured = ["kernels", "checks", "running update", "autograd.Function floor"]
    assert list(pieces) == measured + ["the rest"]
    assert all(pieces[k] > 0 for k in measured)
    assert sum(pieces.values()) == pytest.approx(row["median_us"]["fused eager"])
    text = host_time.markdown({"device": "cpu", "torch": torch.__version__, "threads": 1,
                               "backend": "cpu", "rounds": 1, "reps": 2, "routes": ["eager"],
                               "rows": [row]})
    assert "| resfuse_tail | 1x4x2x2 |" in text and "autograd.Function floor" in text
