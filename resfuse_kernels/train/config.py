"""The trainer's settings: one dataclass, its command line, and its checks.

A run's :class:`TrainConfig` is written as the first line of its JSONL log
and into every checkpoint; ``--resume`` takes it from there (see
:func:`merge_for_resume`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..models import CONFIGS
from . import recipe

AMP = ("bf16", "fp16")
DTYPES = ("float32", "float64")
# On resume, how the run is executed always comes from the command line (a
# recorded --stop-after-steps would stop the resumed run at once) ...
RUNTIME_FIELDS = frozenset({"device", "workers", "quiet", "stop_after_steps", "resume",
                            "checkpoint_every", "dist_backend", "cuda_graphs"})
# ... and these only when given: the run folder, and more epochs to extend a run.
MOVABLE_FIELDS = frozenset({"out", "epochs"})


class ConfigError(ValueError):
    """A setting that cannot work, with what to do instead."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (defaults: the paper's recipe)."""

    model: str = "resfuse19"
    fused: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    amp: Optional[str] = None
    dtype: str = "float32"
    device: Optional[str] = None
    # data
    data: Optional[str] = None
    classes: int = 100
    synthetic_train: int = 5000
    synthetic_val: int = 1000
    image_size: int = 64
    augment: bool = True
    crop_padding: int = 4
    split_seed: int = 0
    workers: Optional[int] = None
    # recipe
    batch: int = 128
    eval_batch: Optional[int] = None
    epochs: int = recipe.EPOCHS
    lr: float = recipe.LR
    momentum: float = recipe.MOMENTUM
    nesterov: bool = recipe.NESTEROV
    weight_decay: float = recipe.WEIGHT_DECAY
    schedule: str = "plateau"
    patience: int = recipe.PLATEAU_PATIENCE
    seed: int = 0
    # many processes
    sync_bn: bool = False
    dist_backend: Optional[str] = None
    # outputs
    out: Optional[str] = None
    resume: Optional[str] = None
    checkpoint_every: int = 0
    save_best: bool = True
    stop_after_steps: Optional[int] = None
    quiet: bool = False

    def to_dict(self) -> dict:
        """Plain types only (JSON and ``torch.load(weights_only=True)`` safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of ``values``; unknown keys (a newer trainer's) are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown settings {unknown} in a recorded config")
        return cls(**values)


def check(config: TrainConfig, device_type: str) -> None:
    """Raise :class:`ConfigError` for settings that cannot work together."""
    if config.model not in CONFIGS:
        raise ConfigError(f"unknown model {config.model!r}; choose one of {', '.join(CONFIGS)}")
    check_cuda_graphs(config, device_type)
    if config.amp is not None and config.amp not in AMP:
        raise ConfigError(f"--amp must be one of {', '.join(AMP)}, got {config.amp!r}")
    if config.amp is not None and config.dtype != "float32":
        raise ConfigError(f"--amp {config.amp} autocasts a float32 model; it cannot be "
                          f"combined with --dtype {config.dtype}")
    if config.amp == "fp16" and device_type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (its loss scaling is CUDA's "
                          "GradScaler); on a CPU use --amp bf16")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.schedule not in recipe.SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(recipe.SCHEDULES)}")
    for name in ("batch", "epochs", "classes", "synthetic_train", "synthetic_val",
                 "image_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.crop_padding < 0 or config.checkpoint_every < 0:
        raise ConfigError("--crop-padding and --checkpoint-every cannot be negative")
    if config.data is not None:
        if not (Path(config.data) / "wnids.txt").is_file():
            raise ConfigError(f"--data {config.data}: no wnids.txt there; expected a "
                              f"Tiny-ImageNet folder (wnids.txt, train/<wnid>/images/, "
                              f"val/val_annotations.txt)")


def check_cuda_graphs(config: TrainConfig, device_type: str, world: int = 1) -> None:
    """``--cuda-graphs`` only where a captured step can run: a CUDA device,
    one process, no loss scaling (GradScaler reads found-inf on the host),
    not under --compile (mode="reduce-overhead" is torch.compile's own)."""
    if not config.cuda_graphs:
        return
    if device_type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device (each training step is replayed "
                          f"from a captured CUDA graph); this run is on {device_type}. "
                          f"Drop --cuda-graphs")
    if config.amp == "fp16":
        raise ConfigError("--cuda-graphs with --amp fp16 is not supported: the loss scaler "
                          "reads its found-inf flag on the host every step; use --amp bf16")
    if config.compile:
        raise ConfigError("--cuda-graphs with --compile: pick one (torch.compile's CUDA graphs "
                          "are its mode='reduce-overhead')")
    if world > 1:
        raise ConfigError("--cuda-graphs with several processes is not supported yet "
                          "(DistributedDataParallel needs its own capture set-up); run one "
                          "process, or drop --cuda-graphs")


def merge_for_resume(recorded: TrainConfig, given: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The config of a resumed run: the recorded one, with the command line's
    :data:`RUNTIME_FIELDS` and the :data:`MOVABLE_FIELDS` it sets. A recipe
    setting given explicitly with another value than the recorded one is an
    error: a resumed run computes what it started computing."""
    merged = dataclasses.replace(recorded)
    for name in RUNTIME_FIELDS:
        setattr(merged, name, getattr(given, name))
    for name in explicit - RUNTIME_FIELDS:
        value = getattr(given, name)
        if name in MOVABLE_FIELDS:
            setattr(merged, name, value)
        elif value != getattr(recorded, name):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} differs from the resumed "
                              f"run's {getattr(recorded, name)!r}; a resumed run keeps its "
                              f"recipe (start a new run to change it)")
    return merged


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser, table2: bool = False) -> None:
    """The training options (``table2``: without ``--model``, which it loops over)."""
    d = TrainConfig()
    g = p.add_argument_group("model")
    if not table2:
        g.add_argument("--model", default=d.model, choices=list(CONFIGS),
                       help=f"network (default {d.model})")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=d.fused,
                   help="fused blocks (the device's best backend) or the reference "
                        "PyTorch blocks; the same function and checkpoint keys (default fused)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step (forward, loss, backward, optimizer "
                        "step) in a CUDA graph after warm-up and replay it (CUDA, one "
                        "process; resfuse_kernels.graphs)")
    g.add_argument("--channels-last", action="store_true",
                   help="channels_last memory format for the model and its inputs")
    g.add_argument("--amp", choices=AMP, default=None,
                   help="autocast precision (fp16 on CUDA only, with loss scaling)")
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="parameter and input dtype (float64: exact-resume tests)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                   "available; under torchrun each rank takes cuda:LOCAL_RANK)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="a Tiny-ImageNet / ImageNet-100 folder (default: synthetic data)")
    g.add_argument("--classes", type=int, default=d.classes,
                   help="classes: the first N of wnids.txt (100: ImageNet-100, 200: "
                        "Tiny-ImageNet), or of the synthetic data (default 100)")
    g.add_argument("--synthetic-train", type=int, default=d.synthetic_train,
                   help=f"synthetic training images (default {d.synthetic_train})")
    g.add_argument("--synthetic-val", type=int, default=d.synthetic_val,
                   help="synthetic held-out images, split into validation and test halves "
                        f"(default {d.synthetic_val})")
    g.add_argument("--image-size", type=int, default=d.image_size,
                   help="synthetic image side (default 64; a folder's images are 64)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="random crop with padding and horizontal flip (default on)")
    g.add_argument("--crop-padding", type=int, default=d.crop_padding,
                   help=f"zero padding of the random crop, pixels (default {d.crop_padding})")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="seed of the validation/test split of the held-out set (default 0)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default 4 on CUDA, 0 on CPU)")
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--batch", type=int, default=d.batch,
                   help=f"global batch size, split evenly over the ranks (default {d.batch})")
    g.add_argument("--eval-batch", type=int, default=None, help="evaluation batch (default "
                   "--batch)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=d.momentum, help="default 0.9")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov,
                   help="Nesterov momentum, NAG (default on)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default 1e-4")
    g.add_argument("--schedule", choices=recipe.SCHEDULES, default=d.schedule,
                   help="plateau: x0.1 when the validation top-1 error stalls for --patience "
                        "epochs; step: x0.1 every third of the run; cosine (default plateau)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help=f"plateau patience, epochs (default {d.patience})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the shuffling and the augmentation (default 0)")
    g = p.add_argument_group("many processes (torchrun)")
    g.add_argument("--sync-bn", action="store_true",
                   help="synchronised BatchNorm across the ranks (fused and reference blocks)")
    g.add_argument("--dist-backend", default=None,
                   help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    g = p.add_argument_group("outputs")
    if not table2:
        g.add_argument("--out", default=None,
                       help="the run folder (default runs/<model>-<fused|ref>-<time>)")
        g.add_argument("--resume", default=None, metavar="RUN_DIR_OR_FILE",
                       help="continue a run exactly from its last.pt (or the file given)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps inside an epoch (default: at "
                        "epoch ends only)")
    g.add_argument("--save-best", action=argparse.BooleanOptionalAction, default=d.save_best,
                   help="keep best.pt, the weights of the best validation top-1 (default on)")
    g.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in all, with a checkpoint; "
                        "--resume finishes the run")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed training options."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(defaults or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig(**values)


def explicit_options(make_parser: Callable[[], argparse.ArgumentParser],
                     argv: Sequence[str]) -> set[str]:
    """The destinations that the command line ``argv`` sets explicitly: it is
    parsed again by a fresh parser whose every default is suppressed."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))
