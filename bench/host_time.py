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


def measure(op: str, shape, device: str, routes: list[str], reps: int, count: int) -> dict:
    case = Case(op, shape, device, torch.float32, False, seed=0)
    providers = {}
    if "eager" in routes:
        providers["reference eager"] = lambda: case.backward(case.reference())
        providers["fused eager"] = lambda: case.backward(case.fused())
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
                f"{k} {v:6.0f} us" for k, v in row["median_us"].items()), flush=True)
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
