"""``python -m resfuse_kernels.train`` (also ``resfuse-train``): the commands.

    python -m resfuse_kernels.train [options]            train one network
    python -m resfuse_kernels.train table2 --out DIR     train the six networks of
                                                         Table 2, then report
    python -m resfuse_kernels.train report RUN... --out DIR   Table 2 + Figure 4 of runs
    python -m resfuse_kernels.train plot RUN... [--out PNG]   Figure 4 of runs

Under ``torchrun --nproc_per_node=N -m resfuse_kernels.train ...`` the same
commands run DistributedDataParallel. ``--help`` on each lists its options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import config as cfg
from . import report
from .distributed import Ranks, setup, teardown

COMMANDS = ("train", "table2", "report", "plot")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resfuse_kernels.train",
        description="Train one of the paper's networks (defaults: the paper's recipe, "
                    "learnable synthetic data). Subcommands: table2, report, plot "
                    "(each with --help).")
    cfg.add_arguments(p)
    return p


def table2_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resfuse_kernels.train table2",
        description="Train the six networks of the paper's Table 2 one after the other, each "
                    "in OUT/<model>, then write OUT/table2.md, table2.json and loss.png. A run "
                    "folder that already has a checkpoint is resumed (a finished one is "
                    "only re-reported), so the command can be rerun after an interruption.")
    p.add_argument("--out", default="runs/table2", help="folder of the runs and the report")
    p.add_argument("--models", default=",".join(report.TABLE2_MODELS),
                   help="comma-separated (default: the six of Table 2)")
    cfg.add_arguments(p, table2=True)
    return p


def _device_type(config: cfg.TrainConfig) -> str:
    if config.device:
        return torch.device(config.device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare(config: cfg.TrainConfig, explicit: set[str],
             parser: argparse.ArgumentParser) -> tuple[cfg.TrainConfig, Optional[dict]]:
    """The config to run (the recorded one when resuming) and the checkpoint."""
    resumed = None
    try:
        if config.resume:
            path = ckpt.resolve(config.resume)
            resumed = ckpt.load(path)
            recorded = cfg.TrainConfig.from_dict(resumed["config"])
            config = cfg.merge_for_resume(recorded, config, explicit)
            config.resume = str(path)
        cfg.check(config, _device_type(config))
    except (cfg.ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return config, resumed


def _fit(config: cfg.TrainConfig, resumed: Optional[dict], ranks: Ranks) -> dict:
    from .loop import Trainer
    return Trainer(config, ranks, resumed).fit()


def train_main(argv: Sequence[str]) -> int:
    parser = train_parser()
    config = cfg.config_from_args(parser.parse_args(list(argv)))
    config, resumed = _prepare(config, cfg.explicit_options(train_parser, argv), parser)
    ranks = setup(config.device, config.dist_backend)
    try:
        _fit(config, resumed, ranks)
    finally:
        teardown(ranks)
    return 0


def table2_main(argv: Sequence[str]) -> int:
    parser = table2_parser()
    args = parser.parse_args(list(argv))
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in cfg.CONFIGS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(cfg.CONFIGS)}")
    explicit = cfg.explicit_options(table2_parser, argv) - {"models"}
    out = Path(args.out)
    runs, plans = [], []
    for name in names:
        config = cfg.config_from_args(args, {"model": name})
        config.out = str(out / name)
        if (out / name / ckpt.LAST).is_file():
            config.resume = config.out
        plans.append(_prepare(config, explicit | {"out"}, parser))
        runs.append(out / name)
    ranks = setup(plans[0][0].device, plans[0][0].dist_backend)
    try:
        for config, resumed in plans:
            _fit(config, resumed, ranks)
        if ranks.main:
            result = report.merge(runs, out)
            print((out / "table2.md").read_text(), flush=True)
            print("wrote " + ", ".join(result["files"]), flush=True)
    finally:
        teardown(ranks)
    return 0


def report_main(argv: Sequence[str], plot_only: bool) -> int:
    p = argparse.ArgumentParser(
        prog=f"python -m resfuse_kernels.train {'plot' if plot_only else 'report'}",
        description=("Figure 4: the training loss per epoch of several runs in one PNG."
                     if plot_only else "Table 2 (table2.md, table2.json) and Figure 4 "
                     "(loss.png) of several run folders."))
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None,
                   help="the PNG (plot; default loss.png)" if plot_only else
                   "the report folder (default: the current folder)")
    args = p.parse_args(list(argv))
    try:
        if plot_only:
            path = report.plot_losses(args.runs, args.out or Path(report.LOSS_PNG),
                                      "Figure 4: training loss per epoch")
            print(f"wrote {path}")
        else:
            result = report.merge(args.runs, args.out or Path("."))
            print(Path(result["files"][1]).read_text())
            print("wrote " + ", ".join(result["files"]))
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; training by default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    if command == "table2":
        return table2_main(rest)
    if command in ("report", "plot"):
        return report_main(rest, plot_only=command == "plot")
    return train_main(rest)
