"""Op benchmarks: ``python -m resfuse_kernels.bench ops``.

Per op, shape, mode and provider: the median time, the achieved bandwidth
computed from the *minimum* bytes the op must move, that bandwidth as a
fraction of a device-to-device copy's (``tensor.clone()`` of one activation
of the same shape, measured in the same run), and the peak memory.

Ops (all in training mode: batch statistics, running statistics updated):

* ``highway_gate``        ``relu(BN_h(a)) * T + x * (1 - T)``, ``T = sigmoid(BN_t(b))``
* ``resfuse_tail``        ``relu(BN_d(u) + h)`` (a basic block's tail, no carry)
* ``resfuse_tail_carry``  ``relu(BN_d(u) + h + BN_k(W x))`` (the ResFuse tail)

Modes: ``forward`` (inputs require grad, as in training), ``backward`` (the
gradients of every input and affine parameter, ``torch.autograd.grad``; the
forward before each timed backward is run untimed), ``both``.

Providers: ``eager`` (the reference formulas of :mod:`resfuse_kernels.reference`
with ``nn.BatchNorm2d`` modules), ``compile`` (``torch.compile`` of the same
reference function), and ``fused:<backend>`` for every backend usable on the
device (:func:`resfuse_kernels.backends.status`; the Triton interpreter on a
CPU only when asked for by name: it is far too slow to time). Each has a
CUDA-graph variant ``<provider>+graph`` (``eager+graph``, ``fused:triton+graph``,
...): the timed call (forward, or forward + backward) captured once after
warm-up and replayed (:class:`resfuse_kernels.graphs.GraphedStep`), so host
time is out of the way; modes ``forward`` and ``both`` only (a backward alone
has no forward to replay with). On by default on a GPU; on a CPU only when
named, and then emulated (the graph driver run eagerly: a dry run).

Minimum bytes (:data:`MIN_TENSORS`). Counted in whole activation tensors
(N x C x H x W elements of the benchmark dtype); per-channel vectors (BN
parameters, statistics, the C x C carry weight) are ignored as O(C). The rule:
every tensor the math needs is read once and every result written once, even
though training-mode BatchNorm needs its batch statistics before it can
normalise (an implementation that reads ``a``/``b`` twice moves more than
the minimum, and its fraction of the copy bandwidth shows that):

* ``highway_gate``   forward reads a, b, x, writes y: 3 + 1 = 4;
  backward reads dy, a, b, x, writes da, db, dx: 4 + 3 = 7
  (H, T, the normalised values are recomputed from a, b: no extra tensor).
* ``resfuse_tail``   forward reads u, h, writes y: 2 + 1 = 3;
  backward reads dy, u, h (h, or y, is needed for the ReLU mask), writes
  du, dh: 3 + 2 = 5.
* ``resfuse_tail_carry`` forward reads u, h, x, writes y: 3 + 1 = 4 (W x is
  never stored); backward reads dy, u, h, x, writes du, dh, dx: 4 + 3 = 7.
* ``both`` is forward + backward (4 + 7 = 11, 3 + 5 = 8, 4 + 7 = 11).

A copy moves 2 tensors (read + write): ``copy GB/s = 2 * bytes(tensor) /
time(clone)``; ``fraction = op GB/s / copy GB/s``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import backends, graphs, ops as rk_ops, reference
from . import common

OPS = ("highway_gate", "resfuse_tail", "resfuse_tail_carry")
MODES = ("forward", "backward", "both")
STAGE_SHAPES = ((128, 64, 64, 64), (128, 128, 32, 32), (128, 256, 16, 16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (tensors read, tensors written) per op and mode: see the module docstring.
MIN_TENSORS = {
    "highway_gate": {"forward": (3, 1), "backward": (4, 3)},
    "resfuse_tail": {"forward": (2, 1), "backward": (3, 2)},
    "resfuse_tail_carry": {"forward": (3, 1), "backward": (4, 3)},
}

GRAPH = "+graph"       # suffix of a provider's CUDA-graph variant
GRAPH_WARMUP = 2       # eager calls before a graph variant's capture
SHAPE_SCALE_ENV = "RESFUSE_BENCH_SHAPE_SCALE"
CPU_SHAPE_SCALE = 1 / 16   # batch 128 -> 8 on a CPU by default


def min_tensors(op: str, mode: str) -> int:
    """Activation-sized tensors ``op`` must at least move in ``mode``."""
    if mode == "both":
        return sum(sum(MIN_TENSORS[op][m]) for m in ("forward", "backward"))
    return sum(MIN_TENSORS[op][mode])


def min_bytes(op: str, mode: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return min_tensors(op, mode) * numel * torch.empty((), dtype=dtype).element_size()


def scale_shape(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """Shrink the batch dimension only (C, H, W stay the stage's)."""
    n, *rest = shape
    return (max(1, round(n * scale)), *rest)


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"a shape is NxCxHxW, got {text!r}")
    return dims


# ---------------------------------------------------------------- the cases


class Case:
    """One op's inputs at one shape, with its reference and fused callables.

    ``inputs`` are the tensors gradients are taken for (activations, then the
    affine parameters and the carry weight). Every call is in training mode.
    """

    def __init__(self, op: str, shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 seed: int = 0) -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
        self.op, self.shape, self.dtype = op, tuple(shape), dtype
        device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        channels = shape[1]
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def act() -> Tensor:
            t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            return t.contiguous(memory_format=fmt).requires_grad_()

        def bn(bias: float = 0.0) -> nn.BatchNorm2d:
            # BN parameters in fp32 for bf16/fp16 activations (as under autocast)
            m = nn.BatchNorm2d(channels).to(device=device, dtype=param_dtype).train()
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(channels, generator=g))
                m.bias.copy_(bias + 0.1 * torch.randn(channels, generator=g))
            return m

        if op == "highway_gate":
            self.acts = [act(), act(), act()]           # a, b, x
            self.bns = [bn(), bn(-2.0)]                 # bn_h, bn_t
            self.carry = None
        else:
            self.acts = [act(), act()]                  # u, h
            self.bns = [bn()]                           # bn_d
            self.carry = None
            if op == "resfuse_tail_carry":
                self.acts.append(act())                 # x
                self.bns.append(bn())                   # bn_k
                self.carry = nn.Conv2d(channels, channels, 1, bias=False).to(device, dtype)
                self.carry = self.carry.to(memory_format=fmt)
        self.params = [p for m in self.bns for p in (m.weight, m.bias)]
        if self.carry is not None:
            self.params.append(self.carry.weight)
        self.inputs = self.acts + self.params
        self.grad_out = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        self.grad_out = self.grad_out.contiguous(memory_format=fmt)

    def reference(self) -> Tensor:
        """The reference formula (the eager and compile baselines)."""
        if self.op == "highway_gate":
            a, b, x = self.acts
            return reference.highway_gate(a, b, x, *self.bns)
        u, h = self.acts[:2]
        if self.carry is None:
            return reference.resfuse_tail(u, h, self.bns[0])
        return reference.resfuse_tail(u, h, self.bns[0], self.acts[2], self.carry, self.bns[1])

    def fused(self, training: bool = True) -> Tensor:
        """The fused op (``torch.ops.resfuse.*``) on the current backend; batch
        statistics when ``training``, else the running statistics."""
        if self.op == "highway_gate":
            a, b, x = self.acts
            bh, bt = self.bns
            return rk_ops.highway_gate(a, b, x, bh.weight, bh.bias, bh.running_mean,
                                       bh.running_var, bt.weight, bt.bias, bt.running_mean,
                                       bt.running_var, training=training)
        u, h = self.acts[:2]
        bd = self.bns[0]
        if self.carry is None:
            return rk_ops.resfuse_tail(u, h, bd.weight, bd.bias, bd.running_mean,
                                       bd.running_var, training=training)
        bk = self.bns[1]
        return rk_ops.resfuse_tail(u, h, bd.weight, bd.bias, bd.running_mean, bd.running_var,
                                   self.acts[2], self.carry.weight, bk.weight, bk.bias,
                                   bk.running_mean, bk.running_var, training=training)

    def backward(self, y: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(y, self.inputs, self.grad_out)

    def step(self, forward: Callable[[], Tensor], mode: str) -> Callable[[], object]:
        """The callable timed for ``mode`` (for ``backward`` see :func:`_time_once`)."""
        if mode == "forward":
            return forward
        if mode == "both":
            return lambda: self.backward(forward())
        raise ValueError(mode)


def providers_for(device: torch.device, requested: Optional[Sequence[str]] = None) -> list[str]:
    """``eager``, ``compile`` and ``fused:<backend>`` for each backend usable on ``device``."""
    available = ["eager", "compile"]
    for name in backends.NAMES:
        if backends.unavailable_reason(name, device.type) is not None:
            continue
        if name == "triton" and device.type == "cpu" and (
                requested is None or f"fused:{name}" not in requested):
            continue  # the interpreter: correct but far too slow to time by default
        available.append(f"fused:{name}")
    if requested is None:
        if device.type == "cuda":
            available += [p + GRAPH for p in available]
        return available
    missing = [p for p in requested if base_provider(p) not in available and not (
        p.startswith("fused:")
        and backends.unavailable_reason(base_provider(p)[6:], device.type) is None)]
    if missing:
        reasons = {p: backends.unavailable_reason(base_provider(p)[6:], device.type)
                   if p.startswith("fused:") else "unknown provider" for p in missing}
        raise SystemExit("cannot run " + "; ".join(f"{p}: {r}" for p, r in reasons.items()))
    return list(requested)


def base_provider(provider: str) -> str:
    """``provider`` without its ``+graph`` suffix."""
    return provider[:-len(GRAPH)] if provider.endswith(GRAPH) else provider


class GraphRunner:
    """A graph variant's timed call: ``case``'s ``mode`` call of ``forward``
    captured by a :class:`~resfuse_kernels.graphs.GraphedStep` (emulated
    off CUDA) and replayed by ``run()``."""

    def __init__(self, case: Case, forward: Callable[[], Tensor], mode: str,
                 device: torch.device) -> None:
        self.step = graphs.GraphedStep(case.step(forward, mode), None, warmup=GRAPH_WARMUP,
                                       emulate=device.type != "cuda", device=device)

    def run(self) -> object:
        return self.step()


def forward_fn(case: Case, provider: str, compiled: dict) -> Callable[[], Tensor]:
    if provider == "eager":
        return case.reference
    if provider == "compile":
        key = id(case)
        if key not in compiled:
            # A fresh start per op and shape (``compiled`` is one's): Case.reference is
            # one code object for every op and shape, and dynamo's recompile limit
            # would fall back to eager.
            if not compiled:
                torch._dynamo.reset()
            compiled[key] = torch.compile(case.reference)
        return compiled[key]
    return case.fused


def _time_once(case: Case, forward: Callable[[], Tensor], mode: str,
               device: torch.device) -> tuple[float, Optional[int]]:
    """One timed run of ``mode`` (a ``backward`` after an untimed forward)
    and its peak memory above what was allocated before it."""
    base = common.reset_peak(device)
    if isinstance(forward, GraphRunner):
        with common.Timer(device) as t:
            forward.run()
    elif mode == "backward":
        y = forward()
        common.synchronize(device)
        with common.Timer(device) as t:
            case.backward(y)
        del y
    else:
        fn = case.step(forward, mode)
        with common.Timer(device) as t:
            fn()
    return t.seconds, common.read_peak(device, base)


def time_providers(cases: dict[str, Case], forwards: dict[str, Callable[[], Tensor]],
                   mode: str, device: torch.device, warmup: int,
                   repeats: int) -> dict[str, dict]:
    """Warm up each provider, then time ``repeats`` rounds of ``mode``, a run
    of every provider per round in an order that rotates from round to round
    (a change in the machine's load falls on every provider alike); per
    provider the median, the first call's time and the peak memory."""
    names = list(forwards)
    firsts = {}
    for name in names:
        case, forward = cases[name], forwards[name]
        if isinstance(forward, GraphRunner):        # warm-up, capture and first replay
            for i in range(max(warmup, GRAPH_WARMUP + 1)):
                firsts.setdefault(name, common.wall(forward.run, device))
            continue
        for i in range(max(warmup, 1)):             # forward + backward: compiles both
            t = common.wall(lambda: case.backward(forward()), device)
            firsts.setdefault(name, t)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list] = {name: [] for name in names}
    for name in common.rounds(names, repeats):
        seconds, peak = _time_once(cases[name], forwards[name], mode, device)
        times[name].append(seconds)
        peaks[name].append(peak)
    out = {}
    for name in names:
        r = common.summarize(times[name])
        known = [p for p in peaks[name] if p is not None]
        r["peak_memory_bytes"] = max(known) if known else None
        r["first_call_s"] = firsts[name]
        out[name] = r
    return out


def time_copy(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
              warmup: int, repeats: int, channels_last: bool = False) -> dict:
    """A device-to-device copy (``clone``) of one activation: the bandwidth yardstick."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    for _ in range(max(warmup, 1)):
        t.clone()
    timers = []
    for _ in range(repeats):
        with common.Timer(device) as tm:
            t.clone()
        timers.append(tm)
    out = common.summarize(tm.seconds for tm in timers)
    out["bytes"] = 2 * t.numel() * t.element_size()
    out["gb_per_s"] = out["bytes"] / out["median_s"] / 1e9
    return out


def _on_backend(forward: Callable[[], Tensor], backend: Optional[str]) -> Callable[[], Tensor]:
    """``forward`` run on ``backend`` (None: the device's default); its
    backward follows the forward's backend by itself."""
    def call() -> Tensor:
        with backends.use(backend):
            return forward()
    return call


def measure(op: str, shape: Sequence[int], mode: str, providers: Sequence[str],
            device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
            channels_last: bool = False, cases: Optional[dict[str, Case]] = None,
            compiled: Optional[dict] = None) -> list[dict]:
    """One row per provider, timed together (:func:`time_providers`): time,
    minimum bytes, GB/s, peak memory. ``cases`` (provider -> :class:`Case`)
    and ``compiled`` let the modes of one op and shape share their inputs and
    compiled callables."""
    if cases is None:
        cases = {p: Case(op, shape, device, dtype, channels_last) for p in providers}
    compiled = {} if compiled is None else compiled
    providers = [p for p in providers if not (p.endswith(GRAPH) and mode == "backward")]
    forwards = {}
    for p in providers:
        base = base_provider(p)
        forward = _on_backend(forward_fn(cases[p], base, compiled),
                              base[6:] if base.startswith("fused:") else None)
        forwards[p] = GraphRunner(cases[p], forward, mode, device) if p.endswith(GRAPH) \
            else forward
    timed = time_providers(cases, forwards, mode, device, warmup, repeats)
    rows = []
    for p in providers:
        r = timed[p]
        r.update(op=op, shape=list(shape), mode=mode, provider=p,
                 min_bytes=min_bytes(op, mode, shape, dtype),
                 min_tensors=min_tensors(op, mode))
        r["gb_per_s"] = r["min_bytes"] / r["median_s"] / 1e9
        if p == "compile":
            r["compile_s"] = r["first_call_s"]
        rows.append(r)
    return rows


# ---------------------------------------------------------------- report


def markdown(settings: dict, env: dict, rows: list[dict], copies: list[dict]) -> str:
    v = env["versions"]
    out = [f"# Op benchmarks ({env['device']})", "",
           f"- device: {env['device']}; torch {v['torch']}, triton {v['triton'] or 'none'}, "
           f"python {v['python']}; commit {env['git_commit'] or 'unknown'}",
           f"- dtype {settings['dtype']}, {'channels_last' if settings['channels_last'] else 'NCHW'}"
           f", training mode; median of {settings['repeats']} runs after "
           f"{settings['warmup']} warm-up run(s)"
           + (f"; shapes scaled by {settings['shape_scale']:g} (batch only)"
              if settings["shape_scale"] != 1 else ""),
           "- GB/s from the minimum bytes (activation-sized tensors read + written: "
           "highway_gate fwd 3+1, bwd 4+3; resfuse_tail fwd 2+1, bwd 3+2; "
           "resfuse_tail_carry fwd 3+1, bwd 4+3; both = fwd + bwd; O(C) vectors ignored); "
           "copy = clone of one activation (2 tensors moved), same run",
           "- vs eager = eager time / this time (>1: faster than eager); "
           "vs compile = compile time / this time"]
    if any(r["provider"].endswith(GRAPH) for r in rows):
        out.append("- `+graph`: the timed call captured in a CUDA graph after warm-up and "
                   "replayed (forward and both only); its peak memory excludes the graph's "
                   "own pool, allocated at capture"
                   + ("; **emulated here (no CUDA): eager calls, a dry run**"
                      if env["device_type"] != "cuda" else ""))
    if env["device_type"] == "cpu":
        out.append("- peak memory is not measured on a CPU ('-')")
    if common.load_note(env):
        out.append(f"- {common.load_note(env)}")
    out += ["", "| shape | copy time | copy GB/s |", "|---|---:|---:|"]
    for c in copies:
        out.append(f"| {'x'.join(map(str, c['shape']))} | {common.fmt_time(c['median_s'])} "
                   f"| {c['gb_per_s']:.1f} |")
    out += ["", "| op | shape | mode | provider | time | GB/s | of copy | vs eager | vs compile "
            "| peak memory |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | "
                   f"{r['provider']} | {common.fmt_time(r['median_s'])} | {r['gb_per_s']:.1f} | "
                   f"{r['copy_fraction']:.0%} | {common.fmt_ratio(r.get('vs_eager'))} | "
                   f"{common.fmt_ratio(r.get('vs_compile'))} | "
                   f"{common.fmt_bytes(r['peak_memory_bytes'])} |")
    seen, lines = set(), []
    for r in rows:
        key = (r["op"], tuple(r["shape"]))
        if r.get("compile_s") is not None and key not in seen:
            seen.add(key)
            lines.append(f"{r['op']} {'x'.join(map(str, r['shape']))} "
                         f"{common.fmt_time(r['compile_s'])}")
    if lines:
        out += ["", "torch.compile time (wall time of the first forward+backward call, "
                "compiling both graphs): " + "; ".join(lines)]
    return "\n".join(out)


def add_ratios(rows: list[dict]) -> None:
    index = {(r["op"], tuple(r["shape"]), r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        key = (r["op"], tuple(r["shape"]), r["mode"])
        eager, comp = index.get(key + ("eager",)), index.get(key + ("compile",))
        r["vs_eager"] = eager["median_s"] / r["median_s"] if eager else None
        r["vs_compile"] = comp["median_s"] / r["median_s"] if comp else None


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    p.add_argument("--modes", default=",".join(MODES), help="forward, backward, both")
    p.add_argument("--providers", default=None,
                   help="comma-separated: eager, compile, fused:<backend> "
                        "(default: eager, compile and every usable backend)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxCxHxW (default: the three stage shapes "
                        "128x64x64x64, 128x128x32x32, 128x256x16x16, scaled)")
    p.add_argument("--shape-scale", type=float, default=None,
                   help=f"multiply the batch of the stage shapes (default 1 on a GPU, "
                        f"{CPU_SHAPE_SCALE:g} on a CPU; env {SHAPE_SCALE_ENV})")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on GPU, 2 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 50 on GPU, 10 on CPU")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder")
    p.add_argument("--name", default=None, help="file stem (default ops-<device>)")


def _split(text: str, allowed: Sequence[str]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    op_names = _split(args.ops, OPS)
    modes = _split(args.modes, MODES)
    scale = args.shape_scale
    if scale is None:
        scale = float(os.environ.get(SHAPE_SCALE_ENV, 1.0 if gpu else CPU_SHAPE_SCALE))
    if args.shapes:
        shapes = [parse_shape(t) for t in args.shapes.split(",") if t.strip()]
        scale = 1.0
    else:
        shapes = [scale_shape(s, scale) for s in STAGE_SHAPES]
    requested = None if args.providers is None else [
        t.strip() for t in args.providers.split(",") if t.strip()]
    providers = providers_for(device, requested)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    repeats = args.repeats or (50 if gpu else 10)
    env = common.environment(device)
    settings = {"ops": op_names, "modes": modes, "providers": providers,
                "shapes": [list(s) for s in shapes], "shape_scale": scale, "dtype": args.dtype,
                "channels_last": args.channels_last, "warmup": warmup, "repeats": repeats,
                "device": str(device), "min_tensors": MIN_TENSORS}
    common.log(f"ops on {env['device']}: torch {env['versions']['torch']}, {args.dtype}, "
               f"shapes {', '.join('x'.join(map(str, s)) for s in shapes)}, "
               f"providers {', '.join(providers)}")
    rows: list[dict] = []
    copies: list[dict] = []
    for shape in shapes:
        copy = time_copy(shape, dtype, device, warmup, repeats, args.channels_last)
        copy["shape"] = list(shape)
        copies.append(copy)
        common.log(f"  copy {'x'.join(map(str, shape))}: {common.fmt_time(copy['median_s'])}, "
                   f"{copy['gb_per_s']:.1f} GB/s")
        for op in op_names:
            compiled: dict = {}
            cases = {p: Case(op, shape, device, dtype, args.channels_last) for p in providers}
            for mode in modes:
                for r in measure(op, shape, mode, providers, device, dtype, warmup, repeats,
                                 args.channels_last, cases, compiled):
                    r["copy_gb_per_s"] = copy["gb_per_s"]
                    r["copy_fraction"] = r["gb_per_s"] / copy["gb_per_s"]
                    rows.append(r)
                    common.log(f"  {op:18s} {'x'.join(map(str, shape)):14s} {mode:8s} "
                               f"{r['provider']:13s} {common.fmt_time(r['median_s']):>10s} "
                               f"{r['gb_per_s']:7.1f} GB/s ({r['copy_fraction']:.0%} of copy)"
                               + (f", peak {common.fmt_bytes(r['peak_memory_bytes'])}"
                                  if r["peak_memory_bytes"] is not None else "")
                               + (f", compile {common.fmt_time(r['compile_s'])}"
                                  if r.get("compile_s") is not None and mode == modes[0] else ""))
    add_ratios(rows)
    env["load_average_at_end"] = common.load_average()
    out = Path(args.out)
    stem = args.name or f"ops-{common.device_slug(device)}"
    md = markdown(settings, env, rows, copies)
    common.write_json(out / f"{stem}.json", {"benchmark": "ops", "command": common.command_line(),
                                             "environment": env, "settings": settings,
                                             "copies": copies, "results": rows})
    common.write_text(out / f"{stem}.md", md)
    print()
    print(md, flush=True)
    print()
    common.log(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}")
    return 0
