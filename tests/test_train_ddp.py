"""The trainer under torchrun: 2 processes on the CPU (gloo), as in CI.

* Reference blocks with ``--sync-bn`` in float64: 2 ranks x 8 images, stopped
  after epoch 1 and resumed (every rank from rank 0's checkpoint), end where
  one process with batch 16 ends, to float64 rounding.
* Fused blocks with ``--sync-bn`` in float64: 2 ranks x 8 images end where
  one process with batch 16 ends, to float64 rounding (the fused ops'
  synchronised BatchNorm).
* Fused blocks: 2 ranks train (finite, falling-or-not is the single-process
  test's business) and end with bit-identical parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resfuse_kernels.train import main
from resfuse_kernels.train import checkpoint as ckpt
from resfuse_kernels.train import report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--classes", "10", "--image-size", "4", "--crop-padding", "1", "--quiet",
        "--synthetic-train", "32", "--synthetic-val", "20", "--batch", "16"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this PyTorch has no torch.distributed")


def torchrun(*args: str, timeout: float = 240) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m resfuse_kernels.train args``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("RESFUSE_BACKEND", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "resfuse_kernels.train", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_ranks_with_sync_bn_resume_and_match_one_process(tmp_path):
    args = ["--model", "resnet19", "--no-fused", *TINY, "--dtype", "float64", "--epochs", "2",
            "--schedule", "step"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(*args, "--sync-bn", "--out", str(two), "--stop-after-steps", "2")
    stopped = ckpt.load(two / ckpt.LAST)
    assert (stopped["epoch"], stopped["world"], len(stopped["rng"])) == (1, 2, 2)
    torchrun("--resume", str(two), "--quiet")
    main([*args, "--out", str(one)])  # one process, batch 16: BatchNorm over the 16

    b = ckpt.load(two / ckpt.LAST)
    assert b["epoch"] == 2 and b["global_step"] == 4
    _assert_same_weights(one, two)
    summary = (two / report.SUMMARY_JSON).read_text()
    assert '"ranks_parameters_identical": true' in summary and '"world_size": 2' in summary
    one_log, two_log = (report.read_log(d / report.LOG) for d in (one, two))
    assert [r["type"] for r in two_log] == ["config", "epoch", "resume", "epoch", "test"]
    for x, y in zip([r for r in one_log if r["type"] == "epoch"],
                    [r for r in two_log if r["type"] == "epoch"]):
        assert x["train"]["images"] == y["train"]["images"] == 32
        assert x["batch_losses"] == pytest.approx(y["batch_losses"], rel=1e-9)


def _assert_same_weights(one: Path, two: Path) -> None:
    a, b = ckpt.load(one / ckpt.LAST), ckpt.load(two / ckpt.LAST)
    assert a["model"].keys() == b["model"].keys()
    for key, expected in a["model"].items():
        got = b["model"][key]
        if expected.is_floating_point():
            scale = max(expected.abs().max().item(), 1.0)
            err = (got - expected).abs().max().item()
            assert err <= 1e-9 * scale, f"{key}: 2 ranks differ from 1 process by {err:.3g}"
        else:
            assert torch.equal(got, expected), key


def test_two_ranks_with_fused_sync_bn_match_one_process(tmp_path):
    args = ["--model", "resfuse19", "--fused", *TINY, "--dtype", "float64", "--epochs", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(*args, "--sync-bn", "--out", str(two))
    main([*args, "--out", str(one)])  # one process, batch 16
    _assert_same_weights(one, two)
    losses = [[loss for r in report.read_log(d / report.LOG) if r["type"] == "epoch"
               for loss in r["batch_losses"]] for d in (one, two)]
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    assert '"ranks_parameters_identical": true' in (two / report.SUMMARY_JSON).read_text()


def test_two_ranks_train_the_fused_model_and_agree(tmp_path):
    run = tmp_path / "fused"
    torchrun("--model", "resfuse19", "--fused", *TINY, "--epochs", "1", "--out", str(run))
    (epoch,) = [r for r in report.read_log(run / report.LOG) if r["type"] == "epoch"]
    assert len(epoch["batch_losses"]) == 2 and epoch["train"]["images"] == 32
    assert all(torch.isfinite(torch.tensor(epoch["batch_losses"])))
    config = report.read_log(run / report.LOG)[0]
    assert config["environment"]["world_size"] == 2
    assert config["environment"]["dist_backend"] == "gloo"
    summary = (run / report.SUMMARY_JSON).read_text()
    assert '"ranks_parameters_identical": true' in summary
