"""Fused synchronised BatchNorm: the contract of issue 16, part 3.

Two processes on gloo, batch B_r each (uneven, one of them empty, one with a
single value a channel), give what one process gives with the whole batch:
outputs, the gradients of the inputs (each rank its rows), of the weights and
of the carry's W (summed over the ranks: each rank's loss is its rows' part),
and the running statistics, in float64 to 1e-9 of scale; for both ops, with
and without the carry, on the torch and cpu backends, NCHW and channels_last.
Fused blocks with synchronised BatchNorm match their reference twins (the
BatchNorms CpuSyncBatchNorm) and one process, over two training steps.
One pair of processes runs every case (tests/_sync_bn_worker.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import resfuse_kernels as rk

sys.path.insert(0, str(Path(__file__).parent))
import _sync_bn_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9

pytestmark = pytest.mark.skipif(not dist.is_available(),
                                reason="this PyTorch has no torch.distributed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results (run once for the module)."""
    tmp = tmp_path_factory.mktemp("sync_bn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("RESFUSE_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, str(Path(worker.__file__)), str(rank), "2",
                               str(tmp / "init"), str(tmp / f"rank{rank}.pt")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-4000:]
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(2)]


def _err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |got - expected| relative to max(|expected|, 1)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.numel() == 0:
        return 0.0
    return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


def _check(label: str, parts: list, expected: torch.Tensor, how: str, report: dict) -> None:
    got = {"rows": lambda: torch.cat(parts), "sum": lambda: sum(parts),
           "each": None}[how]
    errs = [_err(p, expected) for p in parts] if how == "each" else [_err(got(), expected)]
    report[label] = max(errs)
    assert max(errs) <= TOL, f"{label}: 2 ranks differ from 1 process by {max(errs):.3g}"


OP_CASES = worker.op_cases()


@pytest.mark.parametrize("index", range(len(OP_CASES)),
                         ids=[f"{c['backend']}-{c['op']}-{c['split'][0]}+{c['split'][1]}"
                              f"-{c['layout']}" for c in OP_CASES])
def test_two_ranks_equal_one_process(ranks, index, record_property):
    case = OP_CASES[index]
    inputs = worker.op_inputs(case)
    one = worker.run_op(case, inputs, slice(None), None)
    two = [r["ops"][index] for r in ranks]
    report: dict = {}
    for key in ("y", "y_eval"):
        _check(key, [t[key] for t in two], one[key], "rows", report)
    for name, expected in one["grads"].items():
        how = "rows" if name in inputs["acts"] else "sum"
        _check(f"d{name}", [t["grads"][name] for t in two], expected, how, report)
    for name, expected in one["running"].items():
        _check(name, [t["running"][name] for t in two], expected, "each", report)
    record_property("max_rel_err", max(report.values()))


def test_an_empty_rank_gets_empty_results(ranks):
    (index,) = [i for i, c in enumerate(OP_CASES)
                if c["split"] == (5, 0) and c["op"] == "tail_carry" and c["backend"] == "torch"]
    empty = ranks[1]["ops"][index]
    assert empty["y"].shape[0] == 0 and empty["grads"]["x"].shape[0] == 0
    assert empty["grads"]["w"].abs().max() == 0  # no rows: no local contribution


def test_a_group_of_one_rank_changes_nothing(ranks):
    for rank in ranks:
        for solo, alone in rank["solo"]:
            for key in ("y", "y_eval"):
                assert torch.equal(solo[key], alone[key])
            for name, g in alone["grads"].items():
                assert torch.equal(solo["grads"][name], g), name
            for name, r in alone["running"].items():
                assert torch.equal(solo["running"][name], r), name


def test_process_group_needs_torch_distributed_in_training_only():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    case = dict(OP_CASES[0], op="highway", split=(4,))
    inputs = worker.op_inputs(case)
    group = object()  # never looked at: eval mode exchanges nothing
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        worker.run_op(case, inputs, slice(None), group)
    acts = list(inputs["acts"].values())
    bn_args = [inputs["bns"][b][k] for b in ("h", "t")
               for k in ("weight", "bias", "running_mean", "running_var")]
    y = rk.ops.highway_gate(*acts, *bn_args, training=False, process_group=group)
    assert torch.equal(y, rk.ops.highway_gate(*acts, *bn_args, training=False))


def test_meta_tensors_with_a_process_group_are_a_clear_error(ranks):
    """(After the ranks ran: this process is not in their group.) The check
    comes before any exchange; a fake group of 2 ranks stands in."""
    from resfuse_kernels.ops.highway_gate import OP
    case = dict(OP_CASES[0], op="highway", split=(4,))
    inputs = worker.op_inputs(case)
    acts = [t.to("meta") for t in inputs["acts"].values()]
    bn_args = [inputs["bns"][b][k].to("meta") for b in ("h", "t")
               for k in ("weight", "bias", "running_mean", "running_var")]
    with pytest.raises(ValueError, match="needs real tensors"):
        OP._synchronised((*acts, *bn_args, True, 1e-5, 1e-5), object())


BLOCK_CASES = worker.block_cases()


@pytest.mark.parametrize("index", range(len(BLOCK_CASES)),
                         ids=[f"{c['block']}-{'fused' if c['fused'] else 'reference'}"
                              for c in BLOCK_CASES])
def test_blocks_with_sync_bn_equal_one_process(ranks, index, record_property):
    case = BLOCK_CASES[index]
    block, x, cotangent = worker.block_inputs(case)
    rk.convert(block, fused=False)
    one = worker.run_block(block, x, cotangent)  # the reference block, one process
    two = [r["blocks"][index] for r in ranks]
    report: dict = {}
    for key, expected in one.items():
        how = ("rows" if key[:2] in ("y0", "y1", "dx")  # outputs, input gradients
               else "each" if key.startswith("buffer.") else "sum")  # else parameter gradients
        _check(key, [t[key] for t in two], expected, how, report)
    record_property("max_rel_err", max(report.values()))


def test_fused_and_reference_blocks_are_twins_under_sync_bn(ranks):
    """Same rank, same rows: the fused block with synchronised BatchNorm gives
    the reference block's results (with CpuSyncBatchNorm), to float64 rounding."""
    for block in ("resfuse", "highway"):
        ref, fused = (BLOCK_CASES.index(dict(block=block, fused=f, split=(3, 2), seed=7))
                      for f in (False, True))
        for rank in ranks:
            for key, expected in rank["blocks"][ref].items():
                err = _err(rank["blocks"][fused][key], expected)
                assert err <= TOL, f"{block} {key}: fused differs from reference by {err:.3g}"
