"""The CUDA-graph providers of the benchmarks and the trainer's --cuda-graphs,
wired as far as a CPU shows: there the graph driver runs emulated (eager
steps through its static buffers), so a graph provider must compute exactly
what its eager twin computes; a CPU run with --cuda-graphs is refused."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from resfuse_kernels import graphs
from resfuse_kernels.bench import ops as bench_ops
from resfuse_kernels.bench import table3
from resfuse_kernels.train import checkpoint as ckpt
from resfuse_kernels.train import config as cfg
from resfuse_kernels.train import loop, main

TINY = ["--classes", "10", "--image-size", "4", "--crop-padding", "1", "--quiet"]


def test_table3_graph_providers_train_as_their_eager_twins():
    """ref-graph and fused-graph (emulated) take the same untimed and timed
    steps on the same batches as ref-eager and fused-eager: the same loss
    to the bit; their rows say they were emulated and how long capture took."""
    s = table3.Settings(models=("resnet19",), dtypes=("fp32",), batch=2, steps=2, warmup=1,
                        epoch_images=10, image_size=8, lr=1e-3,
                        providers=("ref-eager", "ref-graph", "fused-eager", "fused-graph"))
    data = table3.Batches(s, torch.device("cpu"), pool=6)
    rows = {r["provider"]: r for r in table3.measure(s, "resnet19", s.providers, "fp32", data)}
    assert rows["ref-graph"]["final_loss"] == rows["ref-eager"]["final_loss"]
    assert rows["fused-graph"]["final_loss"] == rows["fused-eager"]["final_loss"]
    assert rows["fused-graph"]["graph"] == "emulated" and rows["fused-graph"]["capture_s"] > 0
    assert rows["fused-eager"]["graph"] is None and rows["fused-eager"]["capture_s"] is None
    table3.add_ratios(list(rows.values()))
    assert rows["fused-graph"]["fused_speedup"] > 0  # fused-graph is compared with ref-graph


def test_table3_graph_providers_by_device(tmp_path):
    assert not set(table3.GRAPH_PROVIDERS) & set(table3.default_providers(gpu=False))
    assert set(table3.GRAPH_PROVIDERS) <= set(table3.default_providers(gpu=True))
    parser = __import__("argparse").ArgumentParser()
    table3.add_arguments(parser)
    s = table3.settings_from_args(parser.parse_args(
        ["--device", "cpu", "--providers", "fused-graph", "--image-size", "8"]))
    assert s.providers == ("fused-graph",) and s.image_size == 8
    assert any("emulated" in n for n in s.notes) and any("3x8x8" in n for n in s.notes)
    with pytest.raises(SystemExit, match="unknown fused-grahp"):
        table3.settings_from_args(parser.parse_args(["--device", "cpu",
                                                     "--providers", "fused-grahp"]))


def test_ops_graph_variants():
    """`<provider>+graph`: not by default on a CPU, accepted when named,
    rejected for an unusable backend; forward and both only; the replayed
    forward + backward moves the running statistics as the eager one does."""
    cpu = torch.device("cpu")
    assert not any(p.endswith("+graph") for p in bench_ops.providers_for(cpu))
    assert bench_ops.providers_for(cpu, ["eager+graph", "fused:torch+graph"]) == \
        ["eager+graph", "fused:torch+graph"]
    with pytest.raises(SystemExit, match="fused:cuda\\+graph"):
        bench_ops.providers_for(cpu, ["fused:cuda+graph"])
    with pytest.raises(SystemExit, match="unknown provider"):
        bench_ops.providers_for(cpu, ["eagre+graph"])
    providers = ["fused:torch", "fused:torch+graph"]
    for mode, want in (("both", providers), ("backward", providers[:1])):
        cases = {p: bench_ops.Case("resfuse_tail_carry", (2, 8, 4, 4)) for p in providers}
        rows = bench_ops.measure("resfuse_tail_carry", (2, 8, 4, 4), mode, providers, cpu,
                                 torch.float32, warmup=3, repeats=2, cases=cases)
        assert [r["provider"] for r in rows] == want
        if mode == "both":  # 3 + 2 calls each, on the same inputs
            plain, graph = (cases[p].bns[0].running_mean for p in providers)  # of u alone
            assert torch.equal(plain, graph) and plain.abs().sum() > 0


def test_trainer_refuses_cuda_graphs_on_a_cpu(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--cuda-graphs", "--device", "cpu", *TINY])
    assert exc.value.code == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"amp": "fp16"}, "--amp fp16 is not supported"),
    ({"compile": True}, "pick one"),
    ({}, "several processes"),
])
def test_cuda_graphs_settings_that_cannot_work(change, message):
    config = cfg.TrainConfig(cuda_graphs=True, **change)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.check_cuda_graphs(config, "cuda", world=1 if change else 2)
    cfg.check_cuda_graphs(cfg.TrainConfig(cuda_graphs=True, amp="bf16"), "cuda")


def test_trainer_graphed_step_trains_as_the_eager_one(tmp_path, monkeypatch):
    """The trainer's --cuda-graphs path with the graph driver emulated (and
    the device check lifted): the same weights, bit for bit, as without."""
    args = ["--model", "resfuse19", *TINY, "--synthetic-train", "24", "--synthetic-val", "4",
            "--batch", "8", "--epochs", "1", "--dtype", "float64", "--device", "cpu"]
    main([*args, "--out", str(tmp_path / "eager")])
    monkeypatch.setattr(cfg, "check_cuda_graphs", lambda *a, **k: None)
    monkeypatch.setattr(loop.graphs, "GraphedStep",
                        functools.partial(graphs.GraphedStep, emulate=True))
    main([*args, "--cuda-graphs", "--out", str(tmp_path / "graphed")])
    eager, graphed = (ckpt.load(Path(tmp_path / d / ckpt.LAST)) for d in ("eager", "graphed"))
    assert graphed["config"]["cuda_graphs"] and not eager["config"]["cuda_graphs"]
    for name, want in eager["model"].items():
        assert torch.equal(graphed["model"][name], want), name
