"""The benchmark code paths at tiny sizes (eager providers only: no
torch.compile here, it is slow) and the Tiny-ImageNet reader on a generated
folder of JPEGs."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from resfuse_kernels.bench import ops as bench_ops
from resfuse_kernels.bench.__main__ import main as bench_main


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_environment(env: dict) -> None:
    assert env["device_type"] == "cpu"
    for key in ("torch", "triton", "python"):
        assert key in env["versions"]
    assert env["versions"]["torch"] == torch.__version__
    assert "git_commit" in env and env["device"]


def test_table3_tiny_run_writes_json_and_markdown(tmp_path):
    rc = bench_main(["table3", "--device", "cpu", "--models", "resnet19,highway19",
                     "--providers", "ref-eager,fused-eager", "--dtypes", "fp32",
                     "--batch", "2", "--steps", "2", "--warmup", "1", "--epoch-images", "10",
                     "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    data = json.loads((tmp_path / "table3-cpu.json").read_text())
    assert data["benchmark"] == "table3"
    _check_environment(data["environment"])
    s = data["settings"]
    assert (s["batch"], s["steps"], s["steps_per_epoch"], s["momentum"], s["nesterov"]) == \
        (2, 2, 5, 0.9, True)
    rows = data["results"]
    assert [(r["model"], r["provider"]) for r in rows] == [
        ("resnet19", "ref-eager"), ("resnet19", "fused-eager"),
        ("highway19", "ref-eager"), ("highway19", "fused-eager")]
    for r in rows:
        assert r["dtype"] == "fp32" and r["extrapolated"] is True and r["runs"] == 2
        for key in ("median_s", "min_s", "epoch_s", "images_per_s", "first_step_s"):
            assert _positive(r[key]), (key, r[key])
        assert r["epoch_s"] == pytest.approx(r["median_s"] * 5)
        assert r["compile_s"] is None and r["peak_memory_bytes"] is None
        assert math.isfinite(r["final_loss"])
        assert _positive(r["vs_resnet19"])
    assert rows[0]["parameters"] == 4_235_172 and rows[0]["vs_resnet19"] == 1.0
    assert _positive(rows[1]["fused_speedup"]) and rows[0]["fused_speedup"] is None
    md = (tmp_path / "table3-cpu.md").read_text()
    assert "| resnet19 | 4,235,172 | 4,235,172 | - | ref-eager |" in md
    assert "extrapolated" in md and "## fp32" in md and "| fused-eager |" in md


def test_table3_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from resfuse_kernels.bench import table3
    s = table3.Settings(models=("resnet19",), providers=("ref-eager", "fused-eager"),
                        dtypes=("fp32",), batch=2, epoch_images=10)
    rows = [{"model": "resnet19", "provider": p, "dtype": "fp32", "epoch_s": 5 * sorted(t)[1],
             "times_s": t} for p, t in (("ref-eager", [2.0, 2.2, 1.9]),
                                        ("fused-eager", [1.5, 1.4, 1.6]))]
    env = {"device": "test cpu", "versions": {"torch": torch.__version__}}
    assert table3.plot(s, env, rows, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The whisker of a bar: fastest and slowest step, as epochs (5 steps each).
    assert table3.epoch_spread(rows[0], s) == (9.5, 11.0)
    # The ratio panel: median ratio, and the range of the rounds' paired ratios.
    (ratio,) = table3.fused_ratios(rows)
    assert ratio["median"] == pytest.approx(7.5 / 10.0)
    assert (ratio["min"], ratio["max"]) == (pytest.approx(1.4 / 2.2), pytest.approx(1.6 / 1.9))
    assert (ratio["mode"], ratio["rounds"]) == ("eager", 3)


@pytest.mark.parametrize("native", [True, False])
def test_table3_default_dtypes(monkeypatch, native):
    """The CPU main job is fp32 whatever the CPU (bf16 doubled it on a CPU with
    native bf16); --full-table measures bf16 where it runs in hardware; asking
    for it explicitly always wins."""
    from resfuse_kernels.bench import common, table3
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    parser = argparse.ArgumentParser()
    table3.add_arguments(parser)
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu"]))
    assert s.dtypes == ("fp32",)
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu", "--full-table"]))
    assert s.dtypes == (("fp32", "bf16") if native else ("fp32",))
    assert any("bf16 skipped" in n for n in s.notes) != native
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu", "--dtypes", "fp32,bf16"]))
    assert s.dtypes == ("fp32", "bf16")


def test_table3_cpu_defaults_are_the_quick_main_job():
    from resfuse_kernels.bench import table3
    parser = argparse.ArgumentParser()
    table3.add_arguments(parser)
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu"]))
    assert s.models == ("resnet19", "highway19", "resfuse19")
    assert (s.batch, s.warmup, s.steps, s.budget_s) == (16, 1, 5, table3.CPU_BUDGET_S)
    assert s.compile_models == ("resfuse19",)
    assert s.lr == pytest.approx(0.1 * 16 / 128)     # the recipe's lr, scaled to the batch
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu", "--full-table"]))
    assert s.models == table3.MODELS and s.compile_models is None and s.budget_s is None
    s = table3.settings_from_args(parser.parse_args(["--device", "cpu", "--budget", "0",
                                                     "--lr", "0.3"]))
    assert s.budget_s is None and s.lr == 0.3


def test_table3_budget_cuts_timed_steps():
    from resfuse_kernels.bench import table3
    s = table3.Settings(steps=5, warmup=1, budget_s=100.0)
    jobs = [("fp32", "a", ("p", "q")), ("fp32", "b", ("p", "q"))]
    done = [{"median_s": 2.0}, {"median_s": 4.0}]            # 3 s a step
    assert table3.budget_steps(s, [], jobs, 0.0) == 5            # nothing measured yet
    assert table3.budget_steps(s, done, jobs, 10.0) == 5         # 90 s / (3 s x 4) - 1 = 6
    assert table3.budget_steps(s, done, jobs, 40.0) == 4         # 60 s / 12 s - 1 = 4
    assert table3.budget_steps(s, done, jobs, 99.0) == 3         # never fewer than 3
    assert table3.budget_steps(table3.Settings(steps=5, budget_s=None), done, jobs, 99.0) == 5
    # Each compiled provider to come sets COMPILE_S aside: (100 - 10 - 2 x 30) / 12 - 1 = 1 -> 3
    compiled = [("fp32", "a", ("p-compile", "q-compile")), ("fp32", "b", ("p", "q"))]
    assert table3.COMPILE_S == 30.0
    assert table3.budget_steps(s, done, compiled, 10.0) == 3
    assert table3.budget_steps(table3.Settings(steps=9, warmup=1, budget_s=160.0), done,
                               compiled, 4.0) == 7          # (160 - 4 - 60) / 12 - 1 = 7


def test_table3_synthetic_data_is_learnable():
    """The bench's images depend on their class: a nearest-class-mean rule
    fitted on half of them labels the other half (a chance-level rule, as with
    random images, would get ~10 %)."""
    from resfuse_kernels.bench import table3
    from resfuse_kernels.data import SyntheticImages, normalize
    x, y = table3.synthetic_pool(200, 10, seed=3)
    assert x.shape == (200, 3, 64, 64) and torch.bincount(y).tolist() == [20] * 10
    images = SyntheticImages(200, 10, 64, 3, "train")            # the same images, shuffled
    i = 7
    j = next(k for k in range(200) if torch.equal(normalize(images[k][0][None])[0], x[i]))
    assert images.labels[j] == y[i]
    fit, test = slice(0, 100), slice(100, 200)
    means = torch.stack([x[fit][y[fit] == c].mean(0) for c in range(10)]).flatten(1)
    guess = torch.cdist(x[test].flatten(1), means).argmin(1)
    assert (guess == y[test]).float().mean() >= 0.9
    shuffled = y[fit][torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    means = torch.stack([x[fit][shuffled == c].mean(0) for c in range(10)]).flatten(1)
    assert (torch.cdist(x[test].flatten(1), means).argmin(1) == y[test]).float().mean() < 0.4


def test_table3_loss_summary():
    from resfuse_kernels.bench import table3
    summary = table3.loss_summary([4.8, 5.0, 4.0, 3.0, 3.4], classes=100)
    assert summary == {"loss_first": pytest.approx(4.9), "loss_last": pytest.approx(3.2),
                       "loss_fell": True, "loss_chance": pytest.approx(math.log(100))}
    assert table3.loss_summary([4.0, 5.0], 10)["loss_fell"] is False


def test_table3_default_output_is_ignored_by_git(tmp_path, monkeypatch):
    """A default run writes into a new bench/runs/<device>-<time>/ folder that the
    repository's .gitignore covers: the clone stays clean and the committed
    bench/results/ are untouched."""
    import shutil
    import subprocess
    from pathlib import Path
    if shutil.which("git") is None:
        pytest.skip("no git")
    root = Path(__file__).resolve().parent.parent
    repo = tmp_path / "clone"
    (repo / "bench" / "results").mkdir(parents=True)
    shutil.copy(root / ".gitignore", repo / ".gitignore")
    (repo / "bench" / "results" / "table3-cpu.md").write_text("curated\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    monkeypatch.chdir(repo)
    rc = bench_main(["table3", "--device", "cpu", "--models", "resnet19",
                     "--providers", "ref-eager", "--batch", "2", "--steps", "1",
                     "--warmup", "1", "--epoch-images", "10", "--no-plot"])
    assert rc == 0
    (run_dir,) = (repo / "bench" / "runs").iterdir()
    assert run_dir.name.startswith("cpu-")
    assert sorted(p.name for p in run_dir.iterdir()) == ["table3-cpu.json", "table3-cpu.md"]
    assert (repo / "bench" / "results" / "table3-cpu.md").read_text() == "curated\n"
    status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status == ""


def test_ops_tiny_run_writes_json_and_markdown(tmp_path):
    rc = bench_main(["ops", "--device", "cpu", "--ops", "highway_gate,resfuse_tail,"
                     "resfuse_tail_carry", "--shapes", "2x8x4x4", "--providers",
                     "eager,fused:torch", "--repeats", "2", "--warmup", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "ops-cpu.json").read_text())
    assert data["benchmark"] == "ops"
    _check_environment(data["environment"])
    (copy,) = data["copies"]
    assert copy["shape"] == [2, 8, 4, 4] and _positive(copy["gb_per_s"])
    rows = data["results"]
    assert len(rows) == 3 * 2 * 3
    numel = 2 * 8 * 4 * 4
    for r in rows:
        assert _positive(r["median_s"]) and _positive(r["gb_per_s"])
        assert _positive(r["copy_fraction"]) and _positive(r["vs_eager"])
        assert r["min_bytes"] == bench_ops.min_tensors(r["op"], r["mode"]) * numel * 4
    first = rows[0]
    assert (first["op"], first["mode"], first["provider"]) == ("highway_gate", "forward", "eager")
    assert first["min_bytes"] == 4 * numel * 4 and first["vs_eager"] == 1.0
    md = (tmp_path / "ops-cpu.md").read_text()
    assert "| highway_gate | 2x8x4x4 | both | fused:torch |" in md
    assert "copy GB/s" in md


def test_min_bytes_rule():
    assert [bench_ops.min_tensors("highway_gate", m) for m in bench_ops.MODES] == [4, 7, 11]
    assert [bench_ops.min_tensors("resfuse_tail", m) for m in bench_ops.MODES] == [3, 5, 8]
    assert [bench_ops.min_tensors("resfuse_tail_carry", m) for m in bench_ops.MODES] == [4, 7, 11]
    assert bench_ops.min_bytes("highway_gate", "both", (2, 3, 4, 5), torch.bfloat16) == \
        11 * 120 * 2
    assert bench_ops.scale_shape((128, 64, 64, 64), 1 / 16) == (8, 64, 64, 64)
    assert bench_ops.scale_shape((128, 64, 64, 64), 1e-6) == (1, 64, 64, 64)


@pytest.mark.parametrize("op", bench_ops.OPS)
def test_ops_case_fused_matches_reference(op):
    """The benchmark times the same function on every provider."""
    case = bench_ops.Case(op, (2, 5, 3, 3), dtype=torch.float64)
    expected = case.reference()
    torch.testing.assert_close(case.fused(), expected)


# ---------------------------------------------------------------- the data reader


def _fake_tiny_imagenet(root, wnids=("n01", "n02", "n03"), per_class=3, val_per_class=1):
    Image = pytest.importorskip("PIL.Image")
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    g = torch.Generator().manual_seed(0)
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = 64 if i else 40  # one image per class is resized
            pixels = torch.full((size, size, 3), 40 * k + 10 * i, dtype=torch.uint8)
            pixels += torch.randint(0, 5, pixels.shape, generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for wnid in reversed(wnids):
        for _ in range(val_per_class):
            name = f"val_{len(lines)}.JPEG"
            Image.new("L", (64, 64), 128).save(root / "val" / "images" / name)  # greyscale
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_reader(tmp_path):
    from resfuse_kernels import data
    _fake_tiny_imagenet(tmp_path)
    assert data.read_wnids(tmp_path) == ["n01", "n02", "n03"]
    images, labels, wnids = data.load_tensors(tmp_path, "train", classes=2)
    assert wnids == ["n01", "n02"]
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # The class-k images are ~40k + 10i (JPEG is lossy): they were read in order.
    means = images.float().mean(dim=(1, 2, 3))
    for m, expected in zip(means.tolist(), [0, 10, 20, 40, 50, 60]):
        assert abs(m - expected - 2) < 6
    few, few_labels, _ = data.load_tensors(tmp_path, "train", classes=3, limit=4)
    assert few_labels.tolist() == [0, 1, 2, 0]          # round-robin over the classes
    val, val_labels, _ = data.load_tensors(tmp_path, "val", classes=3)
    assert val.shape == (3, 3, 64, 64) and val_labels.tolist() == [2, 1, 0]
    assert (val == val[0, 0, 0, 0]).all()                # greyscale -> RGB
    ds = data.TinyImageNet(tmp_path, "val", classes=2)
    assert len(ds) == 2 and ds[0][1] == 1 and ds[0][0].shape == (3, 64, 64)
    x = data.normalize(images)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="lists 3 classes"):
        data.read_wnids(tmp_path, classes=4)
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        data.read_wnids(tmp_path / "train")


def test_table3_reads_a_data_folder(tmp_path):
    _fake_tiny_imagenet(tmp_path / "tiny")
    rc = bench_main(["table3", "--device", "cpu", "--models", "resnet19", "--providers",
                     "ref-eager", "--dtypes", "fp32", "--batch", "2", "--steps", "1",
                     "--warmup", "1", "--epoch-images", "4", "--classes", "3",
                     "--data", str(tmp_path / "tiny"), "--out", str(tmp_path / "out"),
                     "--no-plot"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "table3-cpu.json").read_text())
    (row,) = data["results"]
    assert "3 classes" in row["data"] and _positive(row["epoch_s"])
    assert data["settings"]["classes"] == 3


def test_table3_interleaves_providers(monkeypatch):
    """The providers of a model are timed in rounds whose order rotates, and
    every provider trains from the same weights on the same batches."""
    from resfuse_kernels.bench import table3
    order = []
    timed = table3.Trainer.timed

    def recording(self, steps):
        order.append(self.provider)
        return timed(self, steps)

    monkeypatch.setattr(table3.Trainer, "timed", recording)
    s = table3.Settings(models=("resnet19",), providers=("ref-eager", "fused-eager"),
                        dtypes=("fp32",), batch=2, steps=3, warmup=2, epoch_images=10,
                        lr=1e-3)
    data = table3.Batches(s, torch.device("cpu"), pool=6)
    rows = table3.measure(s, "resnet19", s.providers, "fp32", data)
    assert order == ["ref-eager", "fused-eager", "fused-eager", "ref-eager",
                     "ref-eager", "fused-eager"]
    assert [r["runs"] for r in rows] == [3, 3]
    ref, fused = (r["final_loss"] for r in rows)
    assert fused == pytest.approx(ref, rel=1e-3)


def test_ops_interleaves_providers(monkeypatch):
    """The providers of an op, shape and mode are timed in rotating rounds."""
    order = []
    once = bench_ops._time_once

    def recording(case, forward, mode, device):
        order.append(case)
        return once(case, forward, mode, device)

    monkeypatch.setattr(bench_ops, "_time_once", recording)
    providers = ["eager", "fused:torch"]
    cases = {p: bench_ops.Case("resfuse_tail", (2, 8, 4, 4)) for p in providers}
    rows = bench_ops.measure("resfuse_tail", (2, 8, 4, 4), "both", providers,
                             torch.device("cpu"), torch.float32, warmup=1, repeats=3,
                             cases=cases)
    names = {id(c): p for p, c in cases.items()}
    assert [names[id(c)] for c in order] == ["eager", "fused:torch", "fused:torch", "eager",
                                             "eager", "fused:torch"]
    assert [(r["provider"], r["runs"]) for r in rows] == [("eager", 3), ("fused:torch", 3)]


def test_git_commit_ignores_results_but_not_code(tmp_path):
    """The commit stamp says -dirty for a changed source file, not for
    results an earlier benchmark run wrote into bench/results."""
    import shutil
    import subprocess
    from resfuse_kernels.bench import common
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "bench" / "results" / "r.json").write_text("{}\n")
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = common.git_commit(tmp_path / "pkg")
    assert clean and len(clean) == 40
    (tmp_path / "bench" / "results" / "r.json").write_text('{"new": 1}\n')
    assert common.git_commit(tmp_path / "pkg") == clean
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path / "pkg") == clean + "-dirty"
