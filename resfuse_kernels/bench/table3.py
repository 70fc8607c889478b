"""The paper's Table 3, reproduced and extended: parameters and time per epoch.

``python -m resfuse_kernels.bench table3`` (or ``resfuse-bench table3``)
trains each network for a number of steps with NAG SGD (momentum 0.9,
``nesterov=True``, as the paper) and reports, per network, provider and
precision, the training time per epoch. An epoch is 50,000 images of 3x64x64
(ImageNet-100: 100 Tiny-ImageNet classes x 500 images), run as
``ceil(50,000 / batch)`` steps of ``batch`` images.

Providers:

* ``ref-eager``      the reference blocks (``fused=False``), eager PyTorch
* ``fused-eager``    the fused blocks (``fused=True``: the device's best backend)
* ``ref-compile``    ``torch.compile`` of the reference model
* ``fused-compile``  ``torch.compile`` of the fused model (fused ops stay opaque)
* ``ref-graph``, ``fused-graph``  the whole step (forward, loss, backward,
  optimizer step) captured in a CUDA graph after warm-up and replayed
  (:mod:`resfuse_kernels.graphs`): host time out of the way. Default on a
  GPU; on a CPU only when named, and then *emulated* (eager steps through
  the graph driver's static buffers: a dry run, not a measurement)

Precisions: ``fp32`` and ``bf16`` (``torch.autocast`` to bfloat16; weights and
optimiser stay fp32). Models and inputs are channels_last by default.

Data: learnable synthetic images of the epoch's shape (each class its own
pattern, :class:`resfuse_kernels.data.SyntheticImages`), normalised and
resident on the device (data loading is not timed); or ``--data DIR``, a
Tiny-ImageNet folder read with Pillow (:mod:`resfuse_kernels.data`), decoded
once and kept on the device. The learning rate is the recipe's 0.1 at batch
128, scaled linearly with the batch (so small CPU batches do not diverge);
every step's loss is kept and the report says whether it fell. Without
``--full`` the images are a pool of two batches taken in turn (see
:data:`POOL_BATCHES`).

Defaults (the main job, ``make bench``): on a CPU the paper's three networks
(ResNet-19, Highway-19, ResFuse-19), fp32, batch 16, 1 warm-up and 5 timed
steps, the compiled providers for ResFuse-19 only, and the timed steps cut
(to no fewer than 3) if the run would pass ``--budget`` seconds (150); on a GPU
every model, precision and provider. ``--full-table`` asks a CPU for the
whole table. Results go to a new folder ``bench/runs/<device>-<time>/``
(git-ignored); ``--out bench/results`` writes the curated, committed ones.

Timing: the first step is timed alone (for compiled providers that is the
compile time, reported separately); ``--warmup`` more steps are untimed; then
``--steps`` steps are timed one by one (CUDA events on a GPU,
``perf_counter`` on a CPU) and the median step time x steps per epoch is the
*extrapolated* epoch time. ``--full`` instead runs ``--epochs`` whole epochs
after the warm-up and reports the measured epoch time (meant for a GPU).
The providers of one model and precision are timed in interleaved rounds (a
step, or an epoch, of each per round), so that a change in the machine's
load during the run skews all of them alike.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import graphs, models
from ..train import recipe
from . import common

MODELS = ("resnet19", "highway19", "resfuse19", "resnet25", "resfuse25")
CPU_MODELS = ("resnet19", "highway19", "resfuse19")   # the main job's default on a CPU
CPU_BUDGET_S = 150.0   # the main job's measuring on a CPU, compiles included (about 12 s
COMPILE_S = 30.0       # each on a quiet 2-core CPU; this much is set aside for each)
REFERENCE_BATCH = 128  # the batch the recipe's learning rate is for
# Without --full the data is a pool of this many batches, taken in turn: in a
# few steps every image comes back and the loss falls visibly (the time of a
# step does not depend on which images it sees).
POOL_BATCHES = 2
OPTIONAL_MODELS = ("resnet34",)
PROVIDERS = ("ref-eager", "fused-eager", "ref-compile", "fused-compile")
GRAPH_PROVIDERS = ("ref-graph", "fused-graph")
# Eager steps of a graph provider before its capture (the capture step and
# the first replay are never timed: see measure).
GRAPH_WARMUP = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPOCH_IMAGES = 50_000
IMAGE_SHAPE = (3, 64, 64)
BASELINE = ("resnet19", "ref-eager")

# The paper's Table 3 times per epoch are not reproduced here: we are not
# sure of them, so the report shows '-' (only its parameter counts, which
# resfuse_kernels.models pins, are printed beside ours).
PAPER_TIME_PER_EPOCH: dict[str, float] = {}

# On a CPU torch.compile costs ~30 s per model and precision (2 cores), so by
# default only these models get the compiled providers there.
CPU_COMPILE_MODELS = ("resfuse19",)


@dataclass
class Settings:
    models: tuple[str, ...] = MODELS
    providers: tuple[str, ...] = PROVIDERS
    dtypes: tuple[str, ...] = tuple(DTYPES)
    compile_models: Optional[tuple[str, ...]] = None   # None: every model
    batch: int = 128
    warmup: int = 5
    steps: int = 20
    full: bool = False
    epochs: int = 1
    epoch_images: int = EPOCH_IMAGES
    image_size: int = IMAGE_SHAPE[-1]   # smaller only for dry runs (hidden option)
    classes: int = 100
    data: Optional[str] = None
    channels_last: bool = True
    lr: float = recipe.LR
    momentum: float = recipe.MOMENTUM
    nesterov: bool = recipe.NESTEROV
    weight_decay: float = recipe.WEIGHT_DECAY
    device: str = "cpu"
    seed: int = 0
    budget_s: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_images / self.batch)


def parameter_rows(num_classes: int = 100, names: tuple[str, ...] = MODELS) -> list[dict]:
    """One row per model: our count, the paper's where it gives one."""
    rows = []
    for name in names:
        model = models.build(name, num_classes=num_classes)
        count = sum(p.numel() for p in model.parameters())
        paper = models.PAPER_PARAMETERS.get(name) if num_classes == 100 else None
        rows.append({"model": name, "parameters": count, "paper": paper})
    return rows


def parameters_markdown(rows: list[dict]) -> str:
    lines = ["| model | parameters | paper (Table 3) | match |", "|---|---:|---:|---|"]
    for row in rows:
        paper = row["paper"]
        match = "-" if paper is None else ("yes" if paper == row["parameters"] else "NO")
        lines.append(f"| {row['model']} | {row['parameters']:,} | "
                     f"{'-' if paper is None else f'{paper:,}'} | {match} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- data


class Batches:
    """Training batches resident on the device.

    Synthetic: ``pool`` learnable images (:func:`synthetic_pool`).
    ``--data``: the folder's images, normalised once. Batch ``i`` is a slice
    (channels_last slices stay channels_last); the pool wraps around, so every
    batch is full-size (no recompilation for a short last batch). Every
    provider of a model reads the same sequence of batches.
    """

    def __init__(self, s: Settings, device: torch.device, pool: int) -> None:
        g = torch.Generator().manual_seed(s.seed)
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        if s.data is None:
            self.source = "synthetic, learnable (class patterns + noise)"
            x, y = synthetic_pool(pool, s.classes, s.seed, s.image_size)
        else:
            from ..data import load_tensors, normalize
            images, labels, _ = load_tensors(s.data, "train", classes=s.classes, limit=pool)
            self.source = f"{s.data} ({len(labels)} train images, {s.classes} classes)"
            perm = torch.randperm(len(labels), generator=g)
            x, y = normalize(images[perm]), labels[perm]
        self.x = x.to(device).contiguous(memory_format=fmt)
        self.y = y.to(device)
        self.batch = s.batch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.x.shape[0]
        start = (i * self.batch) % n
        if start + self.batch <= n:
            return self.x[start:start + self.batch], self.y[start:start + self.batch]
        idx = torch.arange(start, start + self.batch, device=self.x.device) % n
        return self.x[idx], self.y[idx]


def synthetic_pool(pool: int, classes: int, seed: int,
                   size: int = IMAGE_SHAPE[-1]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool`` normalised images of :class:`~resfuse_kernels.data.SyntheticImages`
    (each class a fixed colour pattern plus noise), shuffled, and their labels."""
    from ..data import SyntheticImages, normalize
    images = SyntheticImages(pool, classes, size, seed, "train")
    x = torch.stack([images[i][0] for i in range(pool)])
    y = torch.tensor(images.labels)
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
    return normalize(x[perm]), y[perm]


def scaled_lr(batch: int) -> float:
    """The recipe's learning rate (0.1 at batch 128) scaled linearly to ``batch``."""
    return recipe.LR * batch / REFERENCE_BATCH


def loss_summary(losses: list[float], classes: int) -> dict:
    """First and last steps' losses (mean of up to 2 each) and whether it fell."""
    k = min(2, max(len(losses) // 2, 1))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"loss_first": first, "loss_last": last, "loss_fell": last < first,
            "loss_chance": math.log(classes)}


# ---------------------------------------------------------------- measurement


class Trainer:
    """One network trained by one provider in one precision, a step at a time."""

    def __init__(self, s: Settings, name: str, provider: str, dtype: str,
                 data: Batches) -> None:
        self.device = torch.device(s.device)
        self.provider, self.dtype, self.data = provider, dtype, data
        torch.manual_seed(s.seed)  # every provider starts from the same weights
        model = models.build(name, num_classes=s.classes, fused=provider.startswith("fused"))
        model = model.to(self.device)
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.parameters = sum(p.numel() for p in model.parameters())
        self.opt = recipe.nag_sgd(model.parameters(), lr=s.lr, momentum=s.momentum,
                                  weight_decay=s.weight_decay, nesterov=s.nesterov)
        self.forward = torch.compile(model) if provider.endswith("compile") else model
        self.steps = 0
        self.loss: Optional[torch.Tensor] = None
        self.losses: list[torch.Tensor] = []   # read after the timing (no sync per step)
        self.graphed = None
        if provider.endswith("graph"):
            self.graphed = graphs.GraphedStep(self._train_step, self.opt, warmup=GRAPH_WARMUP,
                                              emulate=self.device.type != "cuda")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # autocast's weight cache off: a captured step must not keep casts across replays
        with torch.autocast(self.device.type, dtype=DTYPES[self.dtype],
                            enabled=self.dtype != "fp32", cache_enabled=self.graphed is None):
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def step(self) -> None:
        x, y = self.data[self.steps]
        self.steps += 1
        if self.graphed is not None:
            self.loss = self.graphed(x, y)
            # the graph's loss is one static tensor, overwritten by the next
            # replay: keep a copy (one scalar copy per step, no sync)
            self.losses.append(self.loss.detach().clone())
            return
        self.opt.zero_grad(set_to_none=True)
        self.loss = self._train_step(x, y)
        self.losses.append(self.loss.detach())

    def timed(self, steps: int) -> tuple[float, Optional[int]]:
        """Seconds of ``steps`` steps (one timed region) and the region's peak
        memory above what was allocated before it (None on a CPU)."""
        baseline = common.reset_peak(self.device)
        with common.Timer(self.device) as t:
            for _ in range(steps):
                self.step()
        return t.seconds, common.read_peak(self.device, baseline)


def measure(s: Settings, name: str, providers: tuple[str, ...], dtype: str,
            data: Batches) -> list[dict]:
    """Train ``name`` with each of ``providers`` in ``dtype``; time their steps.

    The providers' timed steps (epochs with ``--full``) are interleaved:
    round ``i`` times one of each, in an order that rotates from round to
    round, so a change in the machine's load during the measurement (other
    jobs on a shared CPU, GPU clocks) falls on every provider alike and the
    ratios between them stay fair.
    """
    if any(p.endswith("compile") for p in providers):
        # Every Net shares one forward code object: start dynamo afresh so the
        # recompile limit never silently sends a later model to eager.
        torch._dynamo.reset()
    trainers = [Trainer(s, name, p, dtype, data) for p in providers]
    results = []
    # every provider runs as many untimed steps: a graph provider's include
    # its eager warm-up, the capture and the first replay
    warmup = max(s.warmup, GRAPH_WARMUP + 1 if any(t.graphed for t in trainers) else 1)
    for t in trainers:
        first = common.wall(t.step, t.device)      # compiles, for compiled providers
        done, capture = 1, None
        if t.graphed is not None:
            for _ in range(GRAPH_WARMUP - 1):
                t.step()
            capture = common.wall(t.step, t.device)
            done = GRAPH_WARMUP + 1
        for _ in range(warmup - done):
            t.step()
        results.append({"model": name, "provider": t.provider, "dtype": dtype,
                        "parameters": t.parameters, "first_step_s": first,
                        "compile_s": first if t.provider.endswith("compile") else None,
                        "capture_s": capture,
                        "graph": t.graphed.mode if t.graphed is not None else None})
    times: dict[str, list[float]] = {t.provider: [] for t in trainers}
    peaks: dict[str, list] = {t.provider: [] for t in trainers}
    per_round = s.steps_per_epoch if s.full else 1
    for t in common.rounds(trainers, s.epochs if s.full else s.steps):
        seconds, peak = t.timed(per_round)
        times[t.provider].append(seconds)
        peaks[t.provider].append(peak)
    for t, result in zip(trainers, results):
        measured = times[t.provider]
        if s.full:
            result.update(common.summarize(x / per_round for x in measured))
            result["epoch_s"] = sorted(measured)[len(measured) // 2]
            result["epoch_times_s"] = measured
        else:
            result.update(common.summarize(measured))
            result["epoch_s"] = result["median_s"] * s.steps_per_epoch
        result["extrapolated"] = not s.full
        result["images_per_s"] = s.batch / result["median_s"]
        known = [p for p in peaks[t.provider] if p is not None]
        result["peak_memory_bytes"] = max(known) if known else None
        result["final_loss"] = float(t.loss.detach().float())
        result["losses"] = [float(x.float()) for x in t.losses]
        result.update(loss_summary(result["losses"], s.classes))
    return results


# ---------------------------------------------------------------- report


def add_ratios(rows: list[dict]) -> None:
    """Ratio columns, from times measured in this run (same dtype):

    * ``vs_resnet19``: epoch time / reference-eager ResNet-19's;
    * ``fused_speedup``: the matching reference provider's time / this fused
      provider's (fused-eager vs ref-eager, fused-compile vs ref-compile);
      above 1 the fused model is faster;
    * ``fused_vs_compile``: ref-compile's time / fused-eager's (above 1:
      the fused eager model beats torch.compile of the reference).
    """
    index = {(r["model"], r["provider"], r["dtype"]): r for r in rows}
    for r in rows:
        base = index.get((BASELINE[0], BASELINE[1], r["dtype"]))
        r["vs_resnet19"] = r["epoch_s"] / base["epoch_s"] if base else None
        r["fused_speedup"] = r["fused_vs_compile"] = None
        if r["provider"].startswith("fused"):
            ref = index.get((r["model"], r["provider"].replace("fused", "ref"), r["dtype"]))
            if ref:
                r["fused_speedup"] = ref["epoch_s"] / r["epoch_s"]
        if r["provider"] == "fused-eager":
            comp = index.get((r["model"], "ref-compile", r["dtype"]))
            if comp:
                r["fused_vs_compile"] = comp["epoch_s"] / r["epoch_s"]


def markdown(s: Settings, env: dict, rows: list[dict]) -> str:
    """Table 3 laid out as the paper's (model, parameters, time per epoch),
    one table per precision, plus our providers, ratios and peak memory."""
    v = env["versions"]
    kind = "measured over full epochs" if s.full else (
        f"**extrapolated** from the median of {s.steps} timed steps "
        f"x {s.steps_per_epoch} steps per epoch")
    out = [
        f"# Table 3: parameters and time per epoch ({env['device']})",
        "",
        f"- device: {env['device']}; torch {v['torch']}, triton {v['triton'] or 'none'}, "
        f"python {v['python']}; commit {env['git_commit'] or 'unknown'}",
        f"- batch {s.batch}, {'channels_last' if s.channels_last else 'NCHW'}, "
        f"NAG SGD (lr {s.lr}, momentum {s.momentum}, nesterov={s.nesterov}, "
        f"weight decay {s.weight_decay}); data: {rows[0].get('data', '-') if rows else '-'}",
        f"- epoch = {s.epoch_images:,} images of 3x64x64, {s.classes} classes; "
        f"time per epoch {kind}; warm-up {s.warmup} step(s) untimed; "
        f"compile = wall time of the first step of a compiled provider",
        f"- fused backend on {s.device}: {env.get('fused_backend', '-')}",
        "- ratios: *vs ResNet-19* = time / reference-eager ResNet-19's; "
        "*fused vs ref* = reference time / fused time (same compile mode; >1: fused faster); "
        "*fused vs compile* = ref-compile time / fused-eager time (>1: fused eager faster)",
        "- paper: the paper's parameter counts; its times per epoch are not "
        "reproduced ('-') because we are not sure of them",
    ]
    graph_modes = {r["graph"] for r in rows if r.get("graph")}
    if graph_modes:
        out.append("- graph = the whole step (forward, loss, backward, optimizer step) "
                   "captured in a CUDA graph after warm-up and replayed "
                   "(resfuse_kernels.graphs); capture and first replay untimed"
                   + ("; **emulated here (no CUDA): eager steps through the graph driver, "
                      "not a CUDA graph**" if "emulated" in graph_modes else ""))
    if s.device == "cpu":
        out.append("- peak memory is not measured on a CPU ('-')")
    if common.load_note(env):
        out.append(f"- {common.load_note(env)}")
    out += [f"- {n}" for n in s.notes]
    for dtype in s.dtypes:
        sub = [r for r in rows if r["dtype"] == dtype]
        if not sub:
            continue
        out += ["", f"## {dtype}{' (bf16 autocast)' if dtype == 'bf16' else ''}", "",
                "| model | parameters | paper params | paper time/epoch | provider "
                "| time/epoch | step (median) | images/s | compile | vs ResNet-19 "
                "| fused vs ref | fused vs compile | peak memory |",
                "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        last = None
        for r in sub:
            first = r["model"] != last
            last = r["model"]
            paper = models.PAPER_PARAMETERS.get(r["model"]) if s.classes == 100 else None
            paper_t = PAPER_TIME_PER_EPOCH.get(r["model"])
            cells = [r["model"] if first else "", f"{r['parameters']:,}" if first else "",
                     (f"{paper:,}" if paper else "-") if first else "",
                     (common.fmt_time(paper_t) if paper_t else "-") if first else "",
                     r["provider"],
                     common.fmt_time(r["epoch_s"]) + (" (extrap.)" if r["extrapolated"] else ""),
                     common.fmt_time(r["median_s"]), f"{r['images_per_s']:,.1f}",
                     common.fmt_time(r["compile_s"]), common.fmt_ratio(r["vs_resnet19"]),
                     common.fmt_ratio(r["fused_speedup"]), common.fmt_ratio(r["fused_vs_compile"]),
                     common.fmt_bytes(r["peak_memory_bytes"])]
            out.append("| " + " | ".join(cells) + " |")
    out += loss_markdown(rows, s.classes)
    return "\n".join(out)


def loss_markdown(rows: list[dict], classes: int) -> list[str]:
    """The training loss of each row, first steps against last, with a verdict."""
    known = [r for r in rows if "loss_first" in r]
    if not known:
        return []
    fell = sum(r["loss_fell"] for r in known)
    out = ["", "## Training loss", "",
           f"The networks train while they are timed: the loss of the first steps against "
           f"the last (mean of 2 each; chance is ln {classes} = {math.log(classes):.2f}). "
           f"It fell in {fell} of {len(known)} runs"
           + (" (the synthetic images are learnable: each class is a colour pattern)."
              if fell == len(known) else
              ": a run where it did not fall is too short, or diverged."), "",
           "| model | dtype | provider | steps | loss, first | loss, last | fell |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in known:
        out.append(f"| {r['model']} | {r['dtype']} | {r['provider']} | {len(r['losses'])} "
                   f"| {r['loss_first']:.3f} | {r['loss_last']:.3f} "
                   f"| {'yes' if r['loss_fell'] else 'NO'} |")
    return out


def _time_unit(seconds: float) -> tuple[float, str]:
    """A divisor and unit that keep an axis of times near 1-100."""
    for div, unit in ((3600.0, "h"), (60.0, "min"), (1.0, "s"), (1e-3, "ms")):
        if seconds >= 2 * div:
            return div, unit
    return 1e-3, "ms"


def epoch_spread(r: dict, s: Settings) -> tuple[float, float]:
    """The row's fastest and slowest timed step (or epoch), as times per epoch."""
    scale = 1 if s.full else s.steps_per_epoch
    times = r.get("epoch_times_s") or [t * scale for t in r.get("times_s", [])]
    return (min(times), max(times)) if times else (r["epoch_s"], r["epoch_s"])


def fused_ratios(rows: list[dict]) -> list[dict]:
    """Per model, dtype and compile mode: fused time / reference time, from the
    steps (or epochs) timed in the same rounds (round i of one against round i
    of the other), as median, min and max. Below 1 the fused model is faster."""
    index = {(r["model"], r["provider"], r["dtype"]): r for r in rows}
    out = []
    for r in rows:
        if not r["provider"].startswith("fused"):
            continue
        ref = index.get((r["model"], r["provider"].replace("fused", "ref"), r["dtype"]))
        if ref is None:
            continue
        a = r.get("epoch_times_s") or r.get("times_s") or [r["epoch_s"]]
        b = ref.get("epoch_times_s") or ref.get("times_s") or [ref["epoch_s"]]
        paired = sorted(x / y for x, y in zip(a, b))
        out.append({"model": r["model"], "dtype": r["dtype"],
                    "mode": r["provider"].split("-", 1)[1],
                    "median": r["epoch_s"] / ref["epoch_s"],
                    "min": paired[0], "max": paired[-1], "rounds": len(paired)})
    return out


def plot(s: Settings, env: dict, rows: list[dict], path: Path) -> bool:
    """Per dtype, two panels: each provider's time per epoch (bar: median;
    whisker: fastest to slowest timed step), and the fused / reference time
    ratio per model and compile mode (whisker: its range over the rounds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.log("matplotlib is not installed (pip install 'resfuse-kernels[bench]'): no plot")
        return False
    dtypes = [d for d in s.dtypes if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(13, 4.6 * len(dtypes)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    colours = {"ref-eager": "#9e9e9e", "fused-eager": "#1f77b4",
               "ref-compile": "#c7a76c", "fused-compile": "#ff7f0e"}
    for (ax, rax), dtype in zip(axes, dtypes):
        sub = [r for r in rows if r["dtype"] == dtype]
        names = [m for m in s.models if any(r["model"] == m for r in sub)]
        providers = [p for p in s.providers if any(r["provider"] == p for r in sub)]
        div, unit = _time_unit(max(epoch_spread(r, s)[1] for r in sub))
        width = 0.8 / max(len(providers), 1)
        for j, p in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, m in enumerate(names):
                r = next((r for r in sub if (r["model"], r["provider"]) == (m, p)), None)
                if r:
                    fast, slow = epoch_spread(r, s)
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(r["epoch_s"] / div)
                    lo.append((r["epoch_s"] - fast) / div)
                    hi.append((slow - r["epoch_s"]) / div)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=p,
                   color=colours.get(p), edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel(f"time per epoch ({unit})" + ("" if s.full else ", extrapolated"))
        ax.set_title(f"{dtype}, batch {s.batch}: time per epoch "
                     f"(bar: median, whisker: fastest to slowest "
                     f"{'epoch' if s.full else 'step'})", fontsize=9)
        ax.legend(fontsize=8, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        ratios = [q for q in fused_ratios(rows) if q["dtype"] == dtype]
        labels = [f"{q['model']}\n{q['mode']}" for q in ratios]
        ys = range(len(ratios))
        # Bars grow from 1 (no difference): left is faster (green), right slower (red).
        rax.barh(list(ys), [q["median"] - 1 for q in ratios], left=1.0, height=0.5,
                 xerr=[[max(q["median"] - q["min"], 0) for q in ratios],
                       [max(q["max"] - q["median"], 0) for q in ratios]], capsize=3,
                 color=["#2ca02c" if q["median"] < 1 else "#d62728" for q in ratios])
        for y, q in zip(ys, ratios):
            rax.text(max(q["max"], 1.0), y - 0.3, f" {q['median']:.2f}x", va="center",
                     fontsize=10, fontweight="bold")
        rax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        rax.set_yticks(list(ys))
        rax.set_yticklabels(labels, fontsize=8)
        rax.invert_yaxis()
        top = max([q["max"] for q in ratios] + [1.0])
        rax.set_xlim(min([q["min"] for q in ratios] + [1.0]) * 0.9, top * 1.15)
        rax.set_xlabel("fused time / reference time (below 1: fused faster)")
        rax.set_title("fused / reference, same run (whisker: range over rounds)", fontsize=9)
    v = env["versions"]
    fig.suptitle(f"Table 3, training time per epoch: {env['device']}\n"
                 f"torch {v['torch']}, {'channels_last' if s.channels_last else 'NCHW'}, "
                 f"NAG SGD, {env.get('utc', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None,
                   help=f"comma-separated, of {', '.join(MODELS + OPTIONAL_MODELS)} "
                        f"(default: the first five on a GPU or with --full-table, "
                        f"{','.join(CPU_MODELS)} on a CPU)")
    p.add_argument("--full-table", action="store_true",
                   help="on a CPU, the whole table: every model, bf16 too where the CPU has "
                        "it natively, the compiled providers for every model, no time budget "
                        "(tens of minutes); a GPU runs it by default")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of timed work the run aims at, cutting timed steps (to no "
                        f"fewer than 3) to fit (default: {CPU_BUDGET_S:.0f} on a CPU, none on a "
                        f"GPU or with --full-table; 0 for none)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {recipe.LR} x batch / {REFERENCE_BATCH})")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated, of {', '.join(PROVIDERS + GRAPH_PROVIDERS)} "
                        "(default: all on a GPU; on a CPU all but the graph providers)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: fp32, bf16 (default both; fp32 only on a CPU "
                        "without native bf16)")
    p.add_argument("--compile-models", default=None,
                   help="models that get the compiled providers (default: all on a GPU, "
                        f"{','.join(CPU_COMPILE_MODELS)} on a CPU); 'all' for every model")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 16 on CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: 20 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps, the first included (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--full", action="store_true", help="run whole epochs (meant for a GPU)")
    p.add_argument("--epochs", type=int, default=1, help="epochs with --full (default 1)")
    p.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=IMAGE_SHAPE[-1], help=argparse.SUPPRESS)
    p.add_argument("--data", default=None,
                   help="a Tiny-ImageNet folder (wnids.txt, train/<wnid>/images/*.JPEG); "
                        "default synthetic data")
    p.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    p.add_argument("--nchw", action="store_true", help="contiguous NCHW instead of channels_last")
    p.add_argument("--out", default=None,
                   help="results folder (default: a new bench/runs/<device>-<time>/, which git "
                        "ignores; --out bench/results for the curated, committed results)")
    p.add_argument("--name", default=None, help="file stem (default table3-<device>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--params-only", action="store_true",
                   help="print the parameter counts and exit (no timing)")


def _split(text: str, allowed) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def default_providers(gpu: bool) -> tuple[str, ...]:
    """Every provider on a GPU; on a CPU those that measure something there."""
    return PROVIDERS + GRAPH_PROVIDERS if gpu else PROVIDERS


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    whole = gpu or args.full_table
    batch = args.batch or (128 if gpu else 16)
    s = Settings(
        models=_split(args.models or ",".join(MODELS if whole else CPU_MODELS),
                      MODELS + OPTIONAL_MODELS),
        providers=_split(args.providers or ",".join(default_providers(gpu)),
                         PROVIDERS + GRAPH_PROVIDERS),
        dtypes=_split(args.dtypes or ",".join(DTYPES), tuple(DTYPES)),
        batch=batch, lr=args.lr if args.lr is not None else scaled_lr(batch),
        steps=args.steps or (20 if gpu else 5),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        full=args.full, epochs=args.epochs, epoch_images=args.epoch_images,
        image_size=args.image_size,
        classes=args.classes, data=args.data, channels_last=not args.nchw, device=device)
    if args.dtypes is None and not whole:
        s.dtypes = ("fp32",)
        s.notes.append("fp32 only (the CPU default; --dtypes fp32,bf16 or --full-table for bf16)")
    elif args.dtypes is None and not gpu and not common.cpu_has_native_bf16():
        s.dtypes = tuple(d for d in s.dtypes if d != "bf16")
        s.notes.append("bf16 skipped: this CPU has no native bf16 (AVX512-BF16, AMX or Arm "
                       "BF16), so PyTorch emulates it and a bf16 step measures the emulation "
                       "(~9x an fp32 convolution on an AVX2 CPU); --dtypes fp32,bf16 runs it")
    if args.budget is not None:
        s.budget_s = args.budget or None
    elif not whole and not s.full:
        s.budget_s = CPU_BUDGET_S
    if args.compile_models is None:
        s.compile_models = None if whole else CPU_COMPILE_MODELS
    elif args.compile_models != "all":
        s.compile_models = _split(args.compile_models, MODELS + OPTIONAL_MODELS)
    compiled = [p for p in s.providers if p.endswith("compile")]
    if compiled and s.compile_models is not None:
        s.notes.append(f"compiled providers ({', '.join(compiled)}) run only for "
                       f"{', '.join(s.compile_models)}"
                       + (" (CPU default: torch.compile costs ~30 s per model and precision "
                          "there; --compile-models all or --full-table for every model)"
                          if args.compile_models is None else ""))
    if s.image_size != IMAGE_SHAPE[-1]:
        s.notes.append(f"images of 3x{s.image_size}x{s.image_size}, not the paper's 3x64x64 "
                       "(a dry run: the times say nothing about Table 3)")
    if not gpu and any(p in GRAPH_PROVIDERS for p in s.providers):
        s.notes.append("graph providers on a CPU are emulated (no CUDA graphs there): "
                       "their times are eager steps, a dry run of the graph code")
    if s.full and not gpu:
        s.notes.append("--full on a CPU: whole epochs, this takes hours")
    return s


def plan(s: Settings) -> list[tuple[str, str, tuple[str, ...]]]:
    """(dtype, model, providers) of each measurement, in order."""
    jobs = []
    for dtype in s.dtypes:
        for model in s.models:
            providers = tuple(p for p in s.providers if not (
                p.endswith("compile") and s.compile_models is not None
                and model not in s.compile_models))
            if providers:
                jobs.append((dtype, model, providers))
    return jobs


def budget_steps(s: Settings, done: list[dict], jobs_left: list, elapsed: float) -> int:
    """Timed steps for the next measurement: ``s.steps``, or fewer (not under 3)
    when the steps measured so far, and :data:`COMPILE_S` for each compiled
    provider to come, say the rest would pass ``s.budget_s``."""
    if s.budget_s is None or s.full or not done:
        return s.steps
    per_step = sum(r["median_s"] for r in done) / len(done)
    units = sum(len(providers) for _, _, providers in jobs_left)
    compiles = sum(p.endswith("compile") for _, _, providers in jobs_left for p in providers)
    fits = int((s.budget_s - elapsed - COMPILE_S * compiles) / (per_step * units)) - s.warmup
    return max(min(s.steps, fits), min(3, s.steps))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def default_out(device: torch.device) -> Path:
    """A new folder for one run, named by device and local time, under the
    git-ignored bench/runs/."""
    return Path("bench") / "runs" / (f"{common.device_slug(device)}-"
                                     f"{time.strftime('%Y%m%d-%H%M%S')}")


def run(s: Settings, out: Optional[Path] = None, name: Optional[str] = None,
        make_plot: bool = True) -> dict:
    """Measure everything ``s`` asks for; write JSON, Markdown and PNG to ``out``
    (default: :func:`default_out`)."""
    from .. import backends
    device = torch.device(s.device)
    env = common.environment(device)
    try:
        env["fused_backend"] = backends.resolve(device)
    except backends.BackendUnavailable as exc:
        env["fused_backend"] = f"none: {exc}"
    out = out if out is not None else default_out(device)
    stem = name or f"table3-{common.device_slug(device)}"
    pool = s.epoch_images if s.full else s.batch * POOL_BATCHES
    data = Batches(s, device, pool)
    common.log(f"table3 on {env['device']}: torch {env['versions']['torch']}, batch {s.batch}, "
               f"{'full epochs' if s.full else f'{s.steps} timed steps (epoch extrapolated)'}, "
               f"fused backend {env['fused_backend']}, data {data.source}")
    for n in s.notes:
        common.log(f"note: {n}")
    rows: list[dict] = []
    jobs = plan(s)
    start = time.perf_counter()
    for i, (dtype, model, providers) in enumerate(jobs):
        steps = budget_steps(s, rows, jobs[i:], time.perf_counter() - start)
        if steps != s.steps:
            s.notes.append(f"{model} {dtype}: {steps} timed steps instead of {s.steps}, to fit "
                           f"the {s.budget_s:.0f} s budget (--budget 0 for none)")
        common.log(f"[{i + 1}/{len(jobs)}] {model} {dtype}: {', '.join(providers)}; "
                   f"{s.warmup} warm-up + {s.steps_per_epoch if s.full else steps} "
                   f"{'steps' if not s.full else 'steps x ' + str(s.epochs) + ' epochs'} each "
                   f"({_clock(time.perf_counter() - start)} elapsed)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for r in measure(replace(s, steps=steps), model, providers, dtype, data):
                r["data"] = data.source
                rows.append(r)
                common.log(f"  {model:10s} {r['provider']:13s} {dtype}: step "
                           f"{common.fmt_time(r['median_s'])} (median of {r['runs']}), "
                           f"epoch {common.fmt_time(r['epoch_s'])}"
                           f"{' extrapolated' if r['extrapolated'] else ''}"
                           + (f", compile {common.fmt_time(r['compile_s'])}"
                              if r["compile_s"] is not None else "")
                           + (f", capture {common.fmt_time(r['capture_s'])} ({r['graph']})"
                              if r["capture_s"] is not None else "")
                           + (f", peak {common.fmt_bytes(r['peak_memory_bytes'])}"
                              if r["peak_memory_bytes"] is not None else "")
                           + f"; loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}")
    common.log(f"measured in {_clock(time.perf_counter() - start)}")
    add_ratios(rows)
    env["load_average_at_end"] = common.load_average()
    settings = asdict(s)
    settings["steps_per_epoch"] = s.steps_per_epoch
    result = {"benchmark": "table3", "command": common.command_line(), "environment": env,
              "settings": settings, "paper_parameters": dict(models.PAPER_PARAMETERS),
              "results": rows}
    md = markdown(s, env, rows)
    common.write_json(out / f"{stem}.json", result)
    common.write_text(out / f"{stem}.md", md)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    if make_plot and rows and plot(s, env, rows, out / f"{stem}.png"):
        written.append(out / f"{stem}.png")
    print()
    print(md, flush=True)
    print()
    common.log("wrote " + ", ".join(str(p) for p in written))
    return result


def main(args: argparse.Namespace) -> int:
    if args.params_only:
        rows = parameter_rows(args.classes, _split(args.models or ",".join(MODELS),
                                                   MODELS + OPTIONAL_MODELS))
        print(f"Table 3 parameters, {args.classes} classes, 3x64x64 input")
        print(parameters_markdown(rows))
        return int(any(r["paper"] is not None and r["paper"] != r["parameters"] for r in rows))
    s = settings_from_args(args)
    rows = parameter_rows(s.classes, s.models)
    print(f"Table 3 parameters, {s.classes} classes, 3x64x64 input")
    print(parameters_markdown(rows), flush=True)
    mismatch = any(r["paper"] is not None and r["paper"] != r["parameters"] for r in rows)
    run(s, Path(args.out) if args.out else None, args.name, make_plot=not args.no_plot)
    return int(mismatch)
