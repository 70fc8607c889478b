"""rk.convert on other people's ResNets: training step time, original vs converted.

    python -m resfuse_kernels.bench convert [--batch 16] [--size 64] [--rounds 5]

Models: ResNet-18 and ResNet-50 written as torchvision writes them
(resfuse_kernels/bench/tv_resnet.py, always), and torchvision's and timm's
own ResNet-18/50 when those packages import. Each is timed as one NAG SGD
step (forward, backward, update) on a random batch of 3 x size x size, the
original and its converted copy (same weights) in interleaved rounds; the
figure is the median, and the ratio is original / converted, so above 1 is
faster fused. The report of what convert fused is kept with each row.

What to expect: convert fuses the residual tails only (BatchNorm + add +
ReLU, one per block). On a CPU they are a few per cent of a step (~4 % of a
ResNet-18's), the convolutions the rest, so ~1.0x there; the figure that
matters is a GPU's, where the tails are memory-bound and the fused op reads
and writes each tensor once.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import convert as rk_convert
from . import tv_resnet
from .common import (DEFAULT_OUT, Timer, command_line, device_description, device_slug,
                     environment, fmt_ratio, fmt_time, log, rounds, summarize, synchronize,
                     write_json, write_text)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def models(num_classes: int) -> dict[str, Callable[[], nn.Module]]:
    """Name -> builder of every model this machine can build."""
    found = {"tv-style resnet18": lambda: tv_resnet.resnet18(num_classes=num_classes),
             "tv-style resnet50": lambda: tv_resnet.resnet50(num_classes=num_classes)}
    try:
        import torchvision.models as tvm
        found["torchvision resnet18"] = lambda: tvm.resnet18(num_classes=num_classes)
        found["torchvision resnet50"] = lambda: tvm.resnet50(num_classes=num_classes)
    except Exception:  # not installed, or built for another torch
        pass
    try:
        import timm
        found["timm resnet18"] = lambda: timm.create_model("resnet18", num_classes=num_classes)
        found["timm resnet50"] = lambda: timm.create_model("resnet50", num_classes=num_classes)
    except Exception:
        pass
    return found


def measure(build: Callable[[], nn.Module], device: torch.device, dtype: str, batch: int,
            size: int, rounds_: int, warmup: int = 2) -> dict:
    original = build().to(device).train()
    classes = next(m for m in reversed(list(original.modules())) if isinstance(m, nn.Linear))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = rk_convert(copy.deepcopy(original), return_report=True)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    original, converted = (m.to(memory_format=fmt) for m in (original, converted))
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    target = torch.randint(0, classes.out_features, (batch,), device=device)
    steps = {}
    for name, model in (("original", original), ("converted", converted)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
                loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
        steps[name] = step
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in rounds(list(steps), 2 * rounds_):
        with Timer(device) as t:
            steps[name]()
        times[name].append(t.seconds)
    row = {name: summarize(ts) for name, ts in times.items()}
    row["ratio"] = row["original"]["median_s"] / row["converted"]["median_s"]
    row["fused"] = len(report.fused)
    row["skipped"] = len(report.skipped)
    row["report"] = report.summary()
    return row


def markdown(env: dict, settings: dict, rows: dict) -> str:
    lines = [f"# rk.convert: training step, original vs converted ({env['device']})", "",
             f"{settings['dtype']}, batch {settings['batch']}, input 3x{settings['size']}x"
             f"{settings['size']}, NAG SGD step (forward + backward + update), median of "
             f"{settings['rounds']} interleaved runs each; torch {env['versions']['torch']}, "
             f"commit {env['git_commit'] or '-'}, {env['utc']}.", "",
             "| model | tails fused | original | converted | original / converted |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['fused']} | {fmt_time(r['original']['median_s'])} | "
                     f"{fmt_time(r['converted']['median_s'])} | {fmt_ratio(r['ratio'])} |")
    lines += ["", "Above 1.00x the converted model is faster. convert fuses each block's "
              "BatchNorm + add + ReLU; on a CPU those are a few per cent of a step (the "
              "convolutions are the rest), so ~1.0x is the expected result there.",
              "", f"Command: `{settings['command']}`"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model and provider")
    p.add_argument("--models", default="", help="comma-separated names (default: all found)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 on a shared, loaded machine")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = models(100)
    wanted = [n.strip() for n in args.models.split(",") if n.strip()] or list(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"unknown or unavailable models {missing}; here: {', '.join(found)}")
    env = environment(device)
    settings = dict(dtype=args.dtype, batch=args.batch, size=args.size, rounds=args.rounds,
                    command=command_line())
    rows = {}
    for name in wanted:
        log(f"{name}: {device_description(device)}, {args.dtype}, batch {args.batch}")
        torch.manual_seed(0)
        rows[name] = measure(found[name], device, args.dtype, args.batch, args.size, args.rounds)
        log(f"  original {fmt_time(rows[name]['original']['median_s'])}, converted "
            f"{fmt_time(rows[name]['converted']['median_s'])}: {fmt_ratio(rows[name]['ratio'])}"
            f" ({rows[name]['report']})")
    stem = args.out / f"convert-{device_slug(device)}"
    write_json(stem.with_suffix(".json"), {"environment": env, "settings": settings,
                                           "rows": rows})
    text = markdown(env, settings, rows)
    write_text(stem.with_suffix(".md"), text)
    print(text)
    return 0
