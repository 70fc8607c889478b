"""Host time of a fused op against eager PyTorch's unfused reference.

``python bench/host_time.py [--device cpu] [--routes eager,traced]``

Per op (highway gate, ResFuse tail without and with the carry) and shape
(1x8x2x2 and 2x64x8x8 by default, float32, NCHW, training), the time of
one forward + backward (``torch.autograd.grad``) through each remaining
route of the fused op beside the reference formula (BatchNorm + add + ReLU,
the carry's 1x1 convolution + BatchNorm where it applies:
:mod:`resfuse_kernels.reference`), in interleaved rounds on one thread:

* ``eager``: the public entry point on plain tensors (the autograd.Function
  route) against the eager reference;
* ``traced``: both under ``torch.compile`` (the registered op's route).

Where the eager route's time goes (``breakdown``, measured in the same
rounds): the backend's forward and backward kernels called directly on
the op's arguments; the argument checks; the running-statistics update;
the floor of any Python ``autograd.Function`` of the op's arity (``apply``
and the engine's call of a Python backward, through the same
``autograd.grad``, with no work inside); the rest (the package's own
Python: entry point, routing, the autograd formula's bookkeeping) is the
total less those four.

On a CPU the kernels run on the calling thread, so "host time" is the
whole call; on a GPU it is the time to enqueue (no synchronisation inside
the timed loop). Writes JSON and Markdown beside each other (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resfuse_kernels import backends  # noqa: E402
from resfuse_kernels.ops import _define  # noqa: E402
from resfuse_kernels.ops.highway_gate import OP as HIGHWAY_OP  # noqa: E402
from resfuse_kernels.ops.resfuse_tail import OP as TAIL_OP  # noqa: E402
from resfuse_kernels.bench.common import environment, rounds  # noqa: E402
from resfuse_kernels.bench.ops import Case  # noqa: E402

OPS = ("highway_gate", "resfuse_tail", "resfuse_tail_carry")
SHAPES = ((1, 8, 2, 2), (2, 64, 8, 8))


def _timed(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` over ``reps`` calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


class _Ctx:
    """Stands in for autograd's ctx: what the autograd formula saves."""

    def mark_non_differentiable(self, *_):
        pass

    def set_materialize_grads(self, _):
        pass

    def save_for_backward(self, *saved):
        self.saved_tensors = saved


class _Floor(torch.autograd.Function):
    """An autograd.Function with a fused op's inputs and outputs and no
    work: ``apply(outputs, grads, *args)`` returns aliases of the op's
    ``outputs`` (the statistics non-differentiable, as the op's), saves the
    tensor arguments as the op does, and its backward hands back ``grads``
    (one per argument)."""

    @staticmethod
    def forward(ctx, outputs, grads, *args):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(a for a in args if isinstance(a, torch.Tensor)))
        ctx.grads = grads
        out = tuple(t.detach() for t in outputs)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, *_):
        ctx.saved_tensors  # unpacked, as the op's backward unpacks them
        return (None, None, *ctx.grads)


def parts(case: Case) -> dict:
    """The pieces of one eager fused forward + backward, each callable
    alone: the kernels, the checks, the running update and the
    autograd.Function floor (the op's call recorded once, then replayed
    piece by piece)."""
    op = HIGHWAY_OP if case.op == "highway_gate" else TAIL_OP
    seen = {}
    real = _define.FusedOp._call

    def record(self, args, momenta, process_group):
        seen["args"], seen["momenta"] = args, momenta
        return real(self, args, momenta, process_group)

    _define.FusedOp._call = record
    try:
        case.fused()
    finally:
        _define.FusedOp._call = real
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in seen["args"])
    kernels = backends.kernels(args[0].device)
    forward = getattr(kernels, f"{op.name}_forward")
    backward = getattr(kernels, f"{op.name}_backward")
    grad_y = case.grad_out

    def run_kernels():
        out = forward(*args)
        ctx = _Ctx()
        op._setup_context(ctx, args, out)
        backward(grad_y, *ctx.saved_tensors, *ctx.scalars)

    outputs = forward(*args)
    stats = outputs[1:]
    first = args[0]
    count = first.numel() // first.shape[1]

    def update():
        _define.update_running_stats(count, *(
            (args[m], args[v], stats[2 * k], stats[2 * k + 1], seen["momenta"][k])
            for k, (w, m, v) in enumerate(op.bn_at) if args[w] is not None))

    # the floor: the recorded (differentiable) arguments, the kernels' outputs
    # and gradients, one per argument as the op's backward returns them
    ctx = _Ctx()
    op._setup_context(ctx, args, outputs)
    grads = [None] * len(args)
    for g, i in zip(backward(grad_y, *ctx.saved_tensors, *ctx.scalars), op.grad_at):
        if args[i] is not None:
            grads[i] = g
    recorded = seen["args"]

    def floor():
        return case.backward(_Floor.apply(outputs, grads, *recorded)[0])

    return {"kernels": run_kernels, "checks": lambda: op.check(*args), "running update": update,
            "autograd.Function floor": floor}


def measure(op: str, shape, device: str, routes: list[str], reps: int, count: int) -> dict:
    case = Case(op, shape, device, torch.float32, False, seed=0)
    providers = {}
    if "eager" in routes:
        providers["reference eager"] = lambda: case.backward(case.reference())
        providers["fused eager"] = lambda: case.backward(case.fused())
        providers.update({f"fused eager: {k}": fn for k, fn in parts(case).items()})
    if "traced" in routes:
        torch._dynamo.reset()
        ref, fused = torch.compile(case.reference), torch.compile(case.fused)
        providers["reference traced"] = lambda: case.backward(ref())
        providers["fused traced"] = lambda: case.backward(fused())
    for fn in providers.values():  # warm-up (and compilation)
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for name in rounds(list(providers), count):
        times[name].append(_timed(providers[name], reps))
    row = {"op": op, "shape": list(shape), "times_us": times,
           "median_us": {k: statistics.median(v) for k, v in times.items()}}
    for route in routes:
        ref, fused = row["median_us"][f"reference {route}"], row["median_us"][f"fused {route}"]
        row[f"ratio_{route}"] = fused / ref
    if "eager" in routes:
        med = row["median_us"]
        pieces = {k[len("fused eager: "):]: v for k, v in med.items()
                  if k.startswith("fused eager: ")}
        pieces["the rest"] = med["fused eager"] - sum(pieces.values())
        row["breakdown_us"] = pieces
        row["median_us"] = {k: v for k, v in med.items() if not k.startswith("fused eager: ")}
    return row


def markdown(result: dict) -> str:
    routes = result["routes"]
    head = "| op | shape | " + " | ".join(
        f"reference {r} (us) | fused {r} (us) | fused / reference" for r in routes) + " |"
    env = result.get("environment") or {}
    lines = [f"Host time of a forward + backward, float32, {result['device']}, "
             f"torch {result['torch']}, {result['threads']} thread, backend "
             f"{result['backend']}; medians of {result['rounds']} interleaved rounds "
             f"of {result['reps']} calls; triton {env.get('versions', {}).get('triton')}, "
             f"driver {env.get('driver')}, commit {env.get('git_commit')}", "", head,
             "|---|---|" + "---:|---:|---:|" * len(routes)]
    for row in result["rows"]:
        cells = []
        for r in routes:
            med = row["median_us"]
            cells += [f"{med[f'reference {r}']:.0f}", f"{med[f'fused {r}']:.0f}",
                      f"{row[f'ratio_{r}']:.2f}x"]
        lines.append(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | "
                     + " | ".join(cells) + " |")
    broken = [row for row in result["rows"] if "breakdown_us" in row]
    if broken:
        names = list(broken[0]["breakdown_us"])
        lines += ["", "Where the fused eager call's time goes (us; each piece timed alone "
                  "in the same rounds, the last is the total less the others):", "",
                  "| op | shape | " + " | ".join(names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for row in broken:
            lines.append(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | "
                         + " | ".join(f"{row['breakdown_us'][n]:.0f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--routes", default="eager", help="comma-separated: eager, traced")
    p.add_argument("--reps", type=int, default=200, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="rounds per provider")
    p.add_argument("--out", default=None, help="JSON path (and .md beside it); "
                   "default: print only")
    args = p.parse_args()
    torch.set_num_threads(1)
    routes = args.routes.split(",")
    device = torch.device(args.device)
    result = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else f"CPU {platform.processor() or platform.machine()}"),
              "torch": torch.__version__, "python": platform.python_version(),
              "threads": 1, "backend": backends.resolve(device), "routes": routes,
              "reps": args.reps, "rounds": args.rounds, "rows": [],
              "environment": environment(device)}
    for shape in SHAPES:
        for op in OPS:
            row = measure(op, shape, args.device, routes, args.reps, args.rounds)
            result["rows"].append(row)
            print(f"{op:20s} {'x'.join(map(str, shape)):9s} " + "  ".join(
                f"{k} {v:6.0f} us" for k, v in {**row["median_us"],
                                                **row.get("breakdown_us", {})}.items()),
                flush=True)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
