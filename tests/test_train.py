"""The trainer (issue 16): data, metrics, a short run, exact resume, Table 2, bad input.

Runs are in-process (``resfuse_kernels.train.main``) on tiny synthetic
images (4x4, 10 classes) so that the whole file takes seconds, not minutes;
tests/test_train_ddp.py launches torchrun.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from resfuse_kernels.data import SyntheticImages
from resfuse_kernels.train import main
from resfuse_kernels.train import checkpoint as ckpt
from resfuse_kernels.train import report
from resfuse_kernels.train.data import EpochSampler, augment, split_holdout
from resfuse_kernels.train.metrics import topk_correct
from resfuse_kernels.train.progress import Bar

# Tiny synthetic runs: 4x4 images (the class patterns' own grid; the last
# stage of a network sees 1x1), a 1-pixel crop padding, 10 classes.
TINY = ["--classes", "10", "--image-size", "4", "--crop-padding", "1", "--quiet"]


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in report.read_log(run / report.LOG) if r["type"] == kind]


# ---------------------------------------------------------------- data and metrics


def test_synthetic_data_is_deterministic_and_learnable():
    a = SyntheticImages(40, classes=4, image_size=8, seed=3)
    b = SyntheticImages(40, classes=4, image_size=8, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(40))
    assert a[0][0].dtype == torch.uint8 and a[0][0].shape == (3, 8, 8)
    assert not torch.equal(a[0][0], SyntheticImages(40, 4, 8, seed=4)[0][0])
    # Learnable: the training images' class means classify held-out images.
    train = SyntheticImages(200, classes=10, image_size=8, seed=0)
    held = SyntheticImages(100, classes=10, image_size=8, seed=0, split="val")
    x = torch.stack([train[i][0] for i in range(200)]).float()
    y = torch.tensor(train.labels)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    xv = torch.stack([held[i][0] for i in range(100)]).float()
    guess = ((xv[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (guess == torch.tensor(held.labels)).float().mean() > 0.9
    # ...and no single pixel gives the class away (noise as strong as the pattern).
    assert not torch.equal(train[0][0], train[10][0])


def test_split_is_disjoint_stratified_and_seeded():
    labels = [i % 7 for i in range(70)] + [0, 0, 0]
    val, test = split_holdout(labels, seed=5)
    assert not set(val) & set(test) and sorted(val + test) == list(range(len(labels)))
    for c in range(7):
        n_val = sum(labels[i] == c for i in val)
        n_test = sum(labels[i] == c for i in test)
        assert n_val - n_test in (0, 1)  # halves, the odd one to validation
    assert split_holdout(labels, seed=5) == (val, test)
    assert split_holdout(labels, seed=6) != (val, test)


def test_topk_on_a_hand_made_example():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.5],    # target 1: top-1
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],    # target 5: 5th of 7
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],    # target 6: last
                           [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])   # target 2: tie, not top-1
    target = torch.tensor([1, 5, 6, 3])
    assert topk_correct(logits, target, (1, 5)).tolist() == [2.0, 3.0]
    target[3] = 2
    assert topk_correct(logits, target, (1, 2)).tolist() == [1.0, 1.0]
    # Fewer classes than k: k is capped, every row counts.
    assert topk_correct(logits[:, :3], torch.tensor([0, 1, 2, 0]), (5,)).tolist() == [4.0]


def test_sampler_global_batches_do_not_depend_on_the_world_size():
    one = EpochSampler(50, 8, seed=1)
    two = [EpochSampler(50, 8, seed=1, rank=r, world=2) for r in range(2)]
    for epoch in (0, 3):
        one.set_epoch(epoch)
        for s in two:
            s.set_epoch(epoch)
        whole, halves = list(one), [list(s) for s in two]
        assert len(whole) == 6 * 8 and len(set(i for i, _ in whole)) == 48
        rebuilt = [t for step in range(6) for h in halves for t in h[step * 4:(step + 1) * 4]]
        assert rebuilt == whole
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # reshuffled per epoch
    one.set_epoch(0, start_step=4)
    assert list(one) == first[32:]  # a resumed epoch starts at its step
    with pytest.raises(ValueError, match="split evenly"):
        EpochSampler(50, 9, seed=0, world=2)


def test_augmentation_is_a_padded_shift_and_flip_of_its_seed():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    seen = set()
    for seed in range(40):
        out = augment(image, seed, padding=2)
        assert out.shape == image.shape and torch.equal(out, augment(image, seed, padding=2))
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                 if torch.equal(out, _shift(image, dy, dx, 2, f))]
        assert found, f"seed {seed}: not a padded crop or its mirror"
        seen.add(found[0])
    assert len(seen) > 15 and {f for _, _, f in seen} == {0, 1}


def _shift(image, dy, dx, pad, flip):
    padded = torch.nn.functional.pad(image, (pad,) * 4)[:, dy:dy + 8, dx:dx + 8]
    return padded.flip(-1) if flip else padded


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only():
    tty, pipe = _Terminal(), io.StringIO()
    for stream, enabled in ((tty, True), (pipe, True), (_Terminal(), False)):
        bar = Bar(3, "epoch 1/2", enabled=enabled, stream=stream, every=0.0)
        for _ in range(3):
            bar.update(1, info=lambda: "loss 1.2345")
        bar.close()
    assert "\repoch 1/2 3/3 [" in tty.getvalue() and "loss 1.2345" in tty.getvalue()
    assert tty.getvalue().endswith("\n") and pipe.getvalue() == ""


# ---------------------------------------------------------------- runs


def test_short_fused_run_learns_and_writes_its_reports(tmp_path, capsys):
    """ResFuse-19 (fused), one epoch of 10 steps: the loss falls; JSONL, JSON,
    Markdown and PNG are written and parse; plot and report merge runs."""
    run = tmp_path / "run"
    # No augmentation: a 1-pixel shift moves a 4x4 image's pattern by a quarter.
    main(["--model", "resfuse19", "--fused", *TINY, "--no-augment", "--synthetic-train", "640",
          "--synthetic-val", "80", "--batch", "64", "--lr", "0.02", "--epochs", "1",
          "--out", str(run)])
    log = report.read_log(run / report.LOG)
    assert log[0]["type"] == "config" and log[0]["config"]["model"] == "resfuse19"
    assert log[0]["config"]["fused"] is True and log[0]["data"]["sizes"]["steps_per_epoch"] == 10
    (epoch,) = records(run, "epoch")
    losses = epoch["batch_losses"]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"the loss did not fall: {start:.3f} -> {end:.3f}"
    assert epoch["val"]["top1_err"] < 0.5  # chance: 0.9
    assert epoch["images_per_s"] > 0 and epoch["peak_memory_bytes"] > 0
    assert epoch["peak_memory_kind"] == "cpu peak RSS of the process"
    (test,) = records(run, "test")
    assert test["test"]["images"] == 40 and epoch["val"]["images"] == 40

    split = json.loads((run / report.SPLIT).read_text())
    assert not set(split["val"]) & set(split["test"]) and len(split["val"]) == 40
    summary = json.loads((run / report.SUMMARY_JSON).read_text())
    assert summary["model"] == "resfuse19" and summary["parameters"] == 4_298_954
    assert summary["val_top1_acc"] == pytest.approx(100 * (1 - epoch["val"]["top1_err"]))
    assert summary["paper"] == list(report.PAPER_TABLE2["resfuse19"])
    table = (run / report.SUMMARY_MD).read_text()
    assert "| model | fused | parameters | epochs | val top-1 | val top-5 | test top-1" in table
    assert "| resfuse19 | yes | 4,298,954 | 1 |" in table
    assert set(ckpt.load(run / ckpt.LAST)) >= {"model", "optimizer", "scheduler", "rng"}
    assert (run / ckpt.BEST).is_file()

    from PIL import Image
    for png in (run / report.LOSS_PNG, tmp_path / "fig4.png"):
        if png.name == "fig4.png":
            main(["plot", str(run), str(run), "--out", str(png)])
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    main(["report", str(run), "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "table2.json").read_text())
    assert [r["model"] for r in merged["rows"]] == ["resfuse19"]
    assert "resfuse19" in capsys.readouterr().out


def _state(run: Path, name: str = ckpt.LAST) -> dict:
    return ckpt.load(run / name)


def assert_same_tensors(a, b, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts/lists of tensors and plain values) equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def test_exact_resume_in_float64(tmp_path):
    """2 epochs straight == stopped in the middle of epoch 1, resumed, finished:
    weights, BatchNorm statistics, optimizer, scheduler, RNG states, losses."""
    args = ["--model", "resfuse19", "--fused", *TINY, "--dtype", "float64",
            "--synthetic-train", "24", "--synthetic-val", "20", "--batch", "8", "--epochs", "2",
            "--schedule", "step"]  # step: the learning rate drops after epoch 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*args, "--out", str(straight)])
    main([*args, "--out", str(resumed), "--stop-after-steps", "2"])
    stopped = _state(resumed)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (0, 2, 2)
    assert not records(resumed, "epoch")
    main(["--resume", str(resumed), "--quiet"])
    a, b = _state(straight), _state(resumed)
    assert b["epoch"] == 2 and b["global_step"] == 6
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "global_step"):
        assert_same_tensors(a[key], b[key], key)
    assert a["model"]["layer1.0.carry_bn.running_var"].dtype == torch.float64
    ea, eb = records(straight, "epoch"), records(resumed, "epoch")
    assert [e["lr"] for e in eb] == pytest.approx([0.1, 0.01])  # the step schedule
    assert [e["batch_losses"] for e in ea] == [e["batch_losses"] for e in eb]
    assert [e["train"] for e in ea] == [e["train"] for e in eb]
    assert [e["val"] for e in ea] == [e["val"] for e in eb]
    assert [r["type"] for r in report.read_log(resumed / report.LOG)] == [
        "config", "resume", "epoch", "epoch", "test"]


def test_table2_command_trains_the_six_models(tmp_path, capsys):
    out = tmp_path / "table2"
    main(["table2", "--out", str(out), *TINY, "--synthetic-train", "16",
          "--synthetic-val", "20", "--batch", "16", "--epochs", "1", "--no-save-best"])
    rows = json.loads((out / "table2.json").read_text())["rows"]
    assert [r["model"] for r in rows] == list(report.TABLE2_MODELS)
    assert all(r["epochs"] == 1 and r["test_top1_acc"] is not None for r in rows)
    md = (out / "table2.md").read_text()
    assert md.count("\n| ") == 1 + 6 and "| highway19 | yes | 4,212,042 |" in md
    assert (out / "loss.png").is_file()
    # Rerunning resumes the finished runs: nothing is trained again.
    before = (out / "resnet19" / report.LOG).read_text()
    main(["table2", "--out", str(out), *TINY, "--synthetic-train", "16",
          "--synthetic-val", "20", "--batch", "16", "--epochs", "1", "--no-save-best",
          "--models", "resnet19"])
    assert len(records(out / "resnet19", "epoch")) == 1
    assert (out / "resnet19" / report.LOG).read_text().startswith(before.splitlines()[0])
    capsys.readouterr()


def test_a_tiny_imagenet_folder_trains_with_the_papers_split(tmp_path):
    from test_bench import _fake_tiny_imagenet  # the reader's test folder, 64x64 JPEGs

    _fake_tiny_imagenet(tmp_path / "tiny", per_class=2, val_per_class=3)
    run = tmp_path / "run"
    main(["--model", "resnet19", "--data", str(tmp_path / "tiny"), "--classes", "2",
          "--batch", "4", "--epochs", "1", "--quiet", "--no-save-best", "--out", str(run)])
    config = report.read_log(run / report.LOG)[0]
    assert config["data"]["sizes"] == {"train": 4, "val": 4, "test": 2, "steps_per_epoch": 1,
                                       "train_images_per_epoch": 4}
    split = json.loads((run / report.SPLIT).read_text())
    # n02 and n01 (the first 2 of 3 classes) have 3 val images each: 2 + 1 per class.
    assert len(split["val_files"]) == 4 and len(split["test_files"]) == 2
    assert not set(split["val_files"]) & set(split["test_files"])
    assert all(f.startswith("val_") and f.endswith(".JPEG") for f in split["val_files"])
    (test,) = records(run, "test")
    assert test["test"]["images"] == 2


def test_channels_last_bf16_autocast_run(tmp_path):
    """--channels-last --amp bf16: the fused model trains under autocast and
    its weights and checkpoint stay float32."""
    run = tmp_path / "bf16"
    main(["--model", "resfuse19", *TINY, "--synthetic-train", "8", "--synthetic-val", "4",
          "--batch", "8", "--epochs", "1", "--channels-last", "--amp", "bf16",
          "--no-save-best", "--out", str(run)])
    (epoch,) = records(run, "epoch")
    assert math.isfinite(epoch["train"]["loss"]) and math.isfinite(epoch["val"]["loss"])
    weights = ckpt.load(run / ckpt.LAST)["model"]
    assert weights["conv1.weight"].dtype == torch.float32


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet18"], "invalid choice: 'resnet18'"),
    (["--data", "/nonexistent/tiny-imagenet"], "no wnids.txt there"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--amp", "bf16", "--dtype", "float64"], "cannot be combined with --dtype float64"),
    (["--resume", "/nonexistent/run"], "no checkpoint there"),
    (["table2", "--models", "resnet19,vgg16"], "unknown models ['vgg16']"),
    (["report", "/nonexistent/run"], "no log.jsonl"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_rules(tmp_path, capsys):
    """An existing run is not overwritten; a resumed run keeps its recipe; a
    checkpoint resumed into a new folder with more epochs starts a full log there."""
    run, more = tmp_path / "run", tmp_path / "more"
    args = ["--model", "resnet19", *TINY, "--synthetic-train", "16", "--synthetic-val", "10",
            "--batch", "16", "--epochs", "1", "--out", str(run)]
    main(args)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(args)
    with pytest.raises(SystemExit):
        main(["--resume", str(run), "--lr", "0.5"])
    assert "--lr 0.5 differs from the resumed run's 0.1" in capsys.readouterr().err
    main(["--resume", str(run / ckpt.BEST), "--out", str(more), "--epochs", "2", "--quiet"])
    assert [r["type"] for r in report.read_log(more / report.LOG)] == [
        "config", "resume", "epoch", "test"]
    assert records(more, "epoch")[0]["epoch"] == 2 and (more / report.SPLIT).is_file()
    assert ckpt.load(more / ckpt.LAST)["config"]["epochs"] == 2
