"""The training loop: set-up, epochs, evaluation, checkpoints, resume.

Exact resume. Everything a step depends on is either in the checkpoint
(weights, BatchNorm statistics, optimizer and scheduler state, loss scaler,
epoch, step within the epoch, the partial epoch's metric sums, every rank's
RNG states) or a pure function of the seed (the epoch's order and each
sample's augmentation: :mod:`.data`). So a run stopped anywhere and resumed
from its checkpoint computes what the uninterrupted run computes, bit for
bit on the same machine and settings.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__, backends, graphs, models
from . import checkpoint as ckpt
from . import config as cfg
from . import data as data_mod
from . import recipe, report, sync_bn
from .distributed import (Ranks, all_sum, broadcast_buffers, broadcast_object, gather_objects,
                          parameters_identical)
from .metrics import Meter, peak_memory, reset_peak_memory
from .progress import Bar

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAPH_WARMUP = 3   # eager steps before --cuda-graphs captures


def say(ranks: Ranks, config: cfg.TrainConfig, message: str) -> None:
    """A progress line from rank 0, unless ``--quiet``."""
    if ranks.main and not config.quiet:
        print(message, flush=True)


def default_run_dir(config: cfg.TrainConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{'fused' if config.fused else 'ref'}-{stamp}"


@dataclass
class State:
    """Where the run is: what a checkpoint stores besides the tensors' states."""

    epoch: int = 0                 # completed epochs
    step_in_epoch: int = 0         # steps done in the current epoch
    global_step: int = 0
    best_val_top1_err: Optional[float] = None
    partial_sums: Optional[list] = None        # the current epoch's global metric sums
    partial_losses: list = field(default_factory=list)
    partial_time_s: float = 0.0


class Trainer:
    """One run: ``Trainer(config, ranks, resumed).fit()``."""

    def __init__(self, config: cfg.TrainConfig, ranks: Ranks,
                 resumed: Optional[dict] = None) -> None:
        cfg.check(config, ranks.device.type)
        self.config, self.ranks, self.device = config, ranks, ranks.device
        self.dtype = DTYPES[config.dtype]
        self.state = State()
        self.run_dir = Path(broadcast_object(str(config.out or default_run_dir(config)), ranks))
        config.out = str(self.run_dir)
        if resumed is None and (self.run_dir / ckpt.LAST).exists():
            raise SystemExit(f"{self.run_dir} already holds a run ({ckpt.LAST}); pass "
                             f"--resume {self.run_dir} to continue it, or another --out")

        torch.manual_seed(config.seed)  # the initial weights
        model = models.build(config.model, num_classes=config.classes, fused=config.fused)
        model = model.to(self.device, self.dtype)
        if config.sync_bn:
            model = sync_bn.convert(model, self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.parameters = sum(p.numel() for p in model.parameters())
        self.optimizer = recipe.nag_sgd(model.parameters(), lr=config.lr,
                                        momentum=config.momentum,
                                        weight_decay=config.weight_decay,
                                        nesterov=config.nesterov)
        self.scheduler = recipe.make_scheduler(self.optimizer, config.schedule, config.epochs,
                                               config.patience)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        wrapped: nn.Module = model
        if ranks.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(wrapped) if config.compile else wrapped
        # a captured step must not keep autocast's weight casts across replays
        self.autocast = (torch.autocast(self.device.type, dtype=AMP_DTYPES[config.amp],
                                        cache_enabled=not config.cuda_graphs)
                         if config.amp else nullcontext())
        self.graphed = self._graphed_step() if config.cuda_graphs else None

        workers = config.workers if config.workers is not None else (
            4 if self.device.type == "cuda" else 0)
        self.data = data_mod.build(config, ranks.rank, ranks.world, workers,
                                   pin_memory=self.device.type == "cuda")
        self.log = report.JsonlLog(self.run_dir / report.LOG)
        if resumed is not None:
            self._restore(resumed)
        self._start_log(resumed is not None)

    def _graphed_step(self) -> graphs.GraphedStep:
        """The training step as a CUDA graph (``--cuda-graphs``)."""
        cfg.check_cuda_graphs(self.config, self.device.type, self.ranks.world)

        def train_step(x: torch.Tensor, y: torch.Tensor):
            with self.autocast:
                logits = self.forward(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            self.optimizer.step()
            return loss, logits

        return graphs.GraphedStep(train_step, self.optimizer, warmup=GRAPH_WARMUP)

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor):
        with self.autocast:
            logits = self.forward(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss, logits

    # ------------------------------------------------------------ checkpoints

    def _payload(self) -> dict:
        s = self.state
        return {"config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step, "best_val_top1_err": s.best_val_top1_err,
                "partial": None if s.partial_sums is None else {
                    "sums": s.partial_sums, "losses": s.partial_losses,
                    "time_s": s.partial_time_s},
                "world": self.ranks.world}

    def save(self, best: bool = False) -> None:
        """Write ``last.pt`` (every rank's RNG states gathered into it) on rank 0."""
        rng = gather_objects(ckpt.rng_state(), self.ranks)
        if self.ranks.main:
            payload = self._payload()
            payload["rng"] = rng
            ckpt.save(payload, self.run_dir / ckpt.LAST)
            if best:
                ckpt.copy(self.run_dir / ckpt.LAST, self.run_dir / ckpt.BEST)

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        partial = payload["partial"]
        self.state = State(payload["epoch"], payload["step_in_epoch"], payload["global_step"],
                           payload["best_val_top1_err"])
        if partial is not None:
            # Rank 0 carries the partial epoch's global sums; the others start from zero.
            main = self.ranks.main
            self.state.partial_sums = partial["sums"] if main else [0.0] * len(partial["sums"])
            self.state.partial_losses = list(partial["losses"])
            self.state.partial_time_s = partial["time_s"]
        rng = payload["rng"]
        if payload["world"] == self.ranks.world:
            ckpt.set_rng_state(rng[self.ranks.rank])
        else:
            say(self.ranks, self.config, f"note: the checkpoint was written by {payload['world']} "
                f"processes, this run has {self.ranks.world}: the data order continues "
                f"unchanged, the global RNG states are not restored")

    def _start_log(self, resumed: bool) -> None:
        if not self.ranks.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed and self.log.path.is_file():
            self.log.truncate_after(self.state.epoch)
        else:  # a new run, or a checkpoint resumed into a new folder
            self.log.path.unlink(missing_ok=True)
            report.write_json(self.run_dir / report.SPLIT, self.data.split)
            self.log.write({"type": "config", "config": self.config.to_dict(),
                            "parameters": self.parameters, "environment": self._environment(),
                            "data": {"source": self.data.source, "sizes": self.data.sizes,
                                     "image_size": self.data.image_size,
                                     "split_file": report.SPLIT}})
        if resumed:
            self.log.write({"type": "resume", "epoch": self.state.epoch,
                            "step_in_epoch": self.state.step_in_epoch,
                            "checkpoint": self.config.resume,
                            "world_size": self.ranks.world, "utc": _utc()})

    def _environment(self) -> dict:
        try:
            backend = backends.resolve(self.device) if self.config.fused else None
        except backends.BackendUnavailable as exc:
            backend = f"none: {exc}"
        return {"device": str(self.device), "world_size": self.ranks.world,
                "dist_backend": self.ranks.backend, "torch": torch.__version__,
                "resfuse_kernels": __version__, "python": platform.python_version(),
                "fused_backend": backend, "torch_threads": torch.get_num_threads(),
                "utc": _utc()}

    # ------------------------------------------------------------ epochs

    def _train_epoch(self, epoch: int) -> Optional[dict]:
        """Train one epoch (from ``state.step_in_epoch``). Returns its metrics,
        or None when ``--stop-after-steps`` stopped it (a checkpoint is written)."""
        c, s, sampler = self.config, self.state, self.data.sampler
        sampler.set_epoch(epoch, s.step_in_epoch)
        meter = Meter(self.device)
        if s.partial_sums is not None:
            meter.load(s.partial_sums)
        losses: list[torch.Tensor] = []
        self.model.train()
        reset_peak_memory(self.device)
        bar = Bar(sampler.steps_per_epoch, f"epoch {epoch + 1}/{c.epochs}",
                  enabled=self.ranks.main and not c.quiet)
        bar.update(s.step_in_epoch)
        start = time.perf_counter()
        for images, labels in self.data.train:
            x, y = data_mod.to_device(images, labels, self.device, self.dtype, c.channels_last)
            if self.graphed is not None:
                loss, logits = self.graphed(x, y)   # the graph's tensors, read at once
            else:
                loss, logits = self._eager_step(x, y)
            meter.update(loss, logits, y)
            losses.append(loss.detach().double())
            s.step_in_epoch += 1
            s.global_step += 1
            bar.update(1, info=lambda: f"loss {losses[-1].item():.4f}")
            last_step = s.step_in_epoch == sampler.steps_per_epoch
            stop = c.stop_after_steps is not None and s.global_step >= c.stop_after_steps
            periodic = c.checkpoint_every and s.step_in_epoch % c.checkpoint_every == 0
            if not last_step and (stop or periodic):
                self._keep_partial(meter, losses, time.perf_counter() - start)
                self.save()
                if stop:
                    bar.close()
                    return None
        self._synchronize()
        seconds = s.partial_time_s + time.perf_counter() - start
        bar.close()
        result = meter.reduce(self.ranks)
        batch_losses = s.partial_losses + self._global_losses(losses)
        peak, kind = peak_memory(self.device)
        s.partial_sums, s.partial_losses, s.partial_time_s = None, [], 0.0
        return {**result, "time_s": seconds, "images_per_s": result["images"] / seconds,
                "batch_losses": batch_losses, "peak_memory_bytes": peak,
                "peak_memory_kind": kind}

    def _global_losses(self, losses: list) -> list:
        """Each step's loss averaged over the ranks (every rank has equal batches)."""
        if not losses:
            return []
        stacked = all_sum(torch.stack(losses), self.ranks) / self.ranks.world
        return stacked.tolist()

    def _keep_partial(self, meter: Meter, losses: list, seconds: float) -> None:
        """The partial epoch's global sums into the state, for a mid-epoch checkpoint."""
        s = self.state
        sums = all_sum(meter.sums.clone(), self.ranks).tolist()
        s.partial_losses = s.partial_losses + self._global_losses(losses)
        s.partial_sums, s.partial_time_s = sums, s.partial_time_s + seconds
        meter.load([0.0] * len(sums) if not self.ranks.main else sums)
        losses.clear()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Loss and top-k error of the model over ``loader`` (every rank's share),
        with rank 0's BatchNorm statistics; eager and without DDP's forward,
        whose buffer broadcast would need equal shares on every rank."""
        broadcast_buffers(self.model, self.ranks)
        self.model.eval()
        meter = Meter(self.device)
        start = time.perf_counter()
        for images, labels in loader:
            x, y = data_mod.to_device(images, labels, self.device, self.dtype,
                                      self.config.channels_last)
            with self.autocast:
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y)
            meter.update(loss, logits, y)
        self.model.train()
        result = meter.reduce(self.ranks)
        result["time_s"] = time.perf_counter() - start
        return result

    def _step_scheduler(self, val_top1_err: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_top1_err)
        else:
            self.scheduler.step()

    def fit(self) -> dict:
        """Train to ``config.epochs`` (or ``--stop-after-steps``), then test.

        Returns the run's summary (Table 2 row and more) on every rank, with
        ``stopped`` true when it stopped early (resume it to finish).
        """
        c, s = self.config, self.state
        say(self.ranks, c, f"training {c.model} ({'fused' if c.fused else 'reference'}, "
            f"{self.parameters:,} parameters) on {self.device} x {self.ranks.world}; data: "
            f"{self.data.source}; {self.data.sizes['steps_per_epoch']} steps of {c.batch} per "
            f"epoch; run folder {self.run_dir}")
        empty = [k for k in ("val", "test") if not self.data.sizes[k]]
        if empty:
            say(self.ranks, c, f"WARNING: the {' and '.join(empty)} split is empty (no class "
                f"has two held-out images): its metrics will be NaN")
        while s.epoch < c.epochs:
            train = self._train_epoch(s.epoch)
            if train is None:
                return self._stopped(f"epoch {s.epoch + 1}, step {s.step_in_epoch}")
            val = self.evaluate(self.data.val)
            lr = self.optimizer.param_groups[0]["lr"]
            self._step_scheduler(val["top1_err"])
            s.epoch += 1
            s.step_in_epoch = 0
            improved = s.best_val_top1_err is None or val["top1_err"] < s.best_val_top1_err
            if improved:
                s.best_val_top1_err = val["top1_err"]
            record = {"type": "epoch", "epoch": s.epoch, "lr": lr, "global_step": s.global_step,
                      "train": {k: train[k] for k in ("loss", "top1_err", "top5_err", "images")},
                      "val": {k: val[k] for k in ("loss", "top1_err", "top5_err", "images")},
                      "epoch_time_s": train["time_s"], "eval_time_s": val["time_s"],
                      "images_per_s": train["images_per_s"],
                      "peak_memory_bytes": train["peak_memory_bytes"],
                      "peak_memory_kind": train["peak_memory_kind"],
                      "batch_losses": train["batch_losses"]}
            if self.ranks.main:
                self.log.write(record)
            self.save(best=improved and c.save_best)
            say(self.ranks, c, f"epoch {s.epoch}/{c.epochs}: train loss {train['loss']:.4f} "
                f"top-1 err {train['top1_err']:.2%}; val loss {val['loss']:.4f} top-1 err "
                f"{val['top1_err']:.2%} top-5 err {val['top5_err']:.2%}; lr {lr:g}; "
                f"{train['time_s']:.1f} s, {train['images_per_s']:.1f} images/s")
            if c.stop_after_steps is not None and s.global_step >= c.stop_after_steps \
                    and s.epoch < c.epochs:
                return self._stopped(f"end of epoch {s.epoch}")
        return self._finish()

    def _stopped(self, where: str) -> dict:
        """``--stop-after-steps`` was reached (at ``where``; the checkpoint is written)."""
        say(self.ranks, self.config, f"stopped after {self.state.global_step} steps ({where}); "
            f"resume with --resume {self.run_dir}")
        return {"stopped": True, "global_step": self.state.global_step,
                "run_dir": str(self.run_dir)}

    def _finish(self) -> dict:
        c = self.config
        test = self.evaluate(self.data.test)
        identical = parameters_identical(self.model, self.ranks)
        if not identical:
            say(self.ranks, c, "WARNING: the ranks' parameters differ at the end of training")
        summary = {"stopped": False, "run_dir": str(self.run_dir)}
        if self.ranks.main:
            self.log.write({"type": "test", "epoch": self.state.epoch,
                            "test": {k: test[k] for k in ("loss", "top1_err", "top5_err",
                                                          "images")},
                            "ranks_parameters_identical": identical, "utc": _utc()})
            summary.update(report.write_run_summary(self.run_dir, {
                "ranks_parameters_identical": identical, "world_size": self.ranks.world,
                "device": str(self.device), "global_step": self.state.global_step,
                "best_val_top1_err": self.state.best_val_top1_err}))
            say(self.ranks, c, f"test top-1 err {test['top1_err']:.2%}, top-5 err "
                f"{test['top5_err']:.2%} ({test['images']} images); wrote "
                f"{self.run_dir / report.SUMMARY_MD}")
        return broadcast_object(summary, self.ranks)


def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

