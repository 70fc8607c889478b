"""GPU-only checks of the compiled backends, run by ``bench/gpu_session.sh``.

``python bench/gpu_checks.py small``  every fused op, forward + backward, on
    each GPU backend (``triton``, ``cuda``), train and eval, NCHW and
    channels_last, fp32 and bf16, at a small odd shape. Meant to run under
    ``compute-sanitizer`` (memcheck, racecheck): small, and it touches every
    kernel. Each result is compared as in ``stages`` below.

``python bench/gpu_checks.py profile``  per op, stage shape and backend:
    the wall time of a forward + backward call beside the GPU time of its
    kernels (torch.profiler), and the costliest kernels.

``python bench/gpu_checks.py host``  where a Triton call's host time goes, at
    the first stage shape (bf16, channels_last, forward + backward): the
    host time of each kernel launch, the wrapper's time with every launch
    replaced by a no-op (Python and the torch ops around the kernels), and
    the functions that take the most (cProfile). ``--device cpu`` (with
    TRITON_INTERPRET=1) measures the wrapper alone on a CPU.

``python bench/gpu_checks.py stages``  the same comparison at the three
    ResFuse-19 stage shapes (batch 128), with the autotuned configurations
    the benchmarks time: relative error ||fused - oracle|| / ||oracle|| of the
    output and every gradient, with the oracle the reference formula in
    float64 on the GPU, beside PyTorch's own error at the same precision
    (the reference formula run in that dtype). Fails when a fused result is
    NaN or its error exceeds max(2 x PyTorch's, the dtype's floor).

``small`` and ``stages`` exit non-zero on any failure and print one line per
case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resfuse_kernels import backends  # noqa: E402
from resfuse_kernels.bench.ops import Case  # noqa: E402

from launches import kernel_name, launches_replaced  # noqa: E402  (bench/)

# Error floors (relative, normwise) below which a result always passes.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
OPS = ("highway_gate", "resfuse_tail", "resfuse_tail_carry")


DEVICE = "cuda"


def gpu_backends() -> list[str]:
    """The compiled backends that run on DEVICE (``cpu`` stands in for
    ``cuda`` when the checks are tried out on a CPU)."""
    wanted = ("triton", "cuda" if DEVICE == "cuda" else "cpu")
    names = [n for n in wanted if backends.unavailable_reason(n, DEVICE) is None]
    for n in wanted:
        if n not in names:
            print(f"backend {n}: {backends.unavailable_reason(n, DEVICE)}")
    return names


def run_case(case: Case, backend: str | None, training: bool = True) -> list[torch.Tensor]:
    """Output and every gradient of ``case``: fused on ``backend``, or the
    reference formula (``nn.BatchNorm2d`` modules) when ``backend`` is None;
    batch statistics when ``training``, else the running statistics."""
    for m in case.bns:
        m.train(training)
    if backend is None:
        y = case.reference()
    else:
        with backends.use(backend):
            y = case.fused(training)
    grads = torch.autograd.grad(y, case.inputs, case.grad_out)
    return [y.detach(), *grads]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def oracle_of(case: Case, seed: int) -> Case:
    """``case`` in float64, holding exactly ``case``'s values (inputs, BN
    parameters and buffers, carry weight, output gradient)."""
    o = Case(case.op, case.shape, DEVICE, torch.float64, False, seed=seed)
    with torch.no_grad():
        for mine, theirs in zip(o.acts + [o.grad_out], case.acts + [case.grad_out]):
            mine.copy_(theirs)
        for mine, theirs in zip(o.bns, case.bns):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(mine, name).copy_(getattr(theirs, name))
        if o.carry is not None:
            o.carry.weight.copy_(case.carry.weight)
    return o


NAMES = {"highway_gate": ["y", "da", "db", "dx", "dw_h", "db_h", "dw_t", "db_t"],
         "resfuse_tail": ["y", "du", "dh", "dw_d", "db_d"],
         "resfuse_tail_carry": ["y", "du", "dh", "dx", "dw_d", "db_d", "dw_k", "db_k", "dW"]}


def compare(op: str, shape, dtype, channels_last: bool, names: list[str], seed: int,
            training: bool = True) -> bool:
    """Each backend in ``names`` against the float64 oracle, beside PyTorch's
    own error at ``dtype``; prints one line per backend, True when all pass."""
    case = Case(op, shape, DEVICE, dtype, channels_last, seed=seed)
    oracle = run_case(oracle_of(case, seed), None, training)
    torch_err = [rel_err(t, o) for t, o in zip(run_case(case, None, training), oracle)]
    ok = True
    for backend in names:
        errs = [rel_err(t, o) for t, o in zip(run_case(case, backend, training), oracle)]
        bound = [max(2 * p, FLOOR[dtype]) for p in torch_err]
        bad = [NAMES[op][i] for i, (e, b) in enumerate(zip(errs, bound)) if not e <= b]
        ok &= not bad
        worst = max(range(len(errs)), key=lambda i: errs[i] / bound[i])
        print(f"{'FAIL' if bad else 'ok  '} {op:18s} {'x'.join(map(str, shape)):14s} "
              f"{'train' if training else 'eval '} {str(dtype)[6:]:8s} "
              f"{'cl  ' if channels_last else 'nchw'} {backend:6s} max err {max(errs):.2e}; "
              f"worst vs torch: {NAMES[op][worst]} {errs[worst]:.2e} vs {torch_err[worst]:.2e}"
              + (f" FAILED: {', '.join(bad)}" if bad else ""), flush=True)
    return ok


def small(only: str | None = None, quick: bool = False) -> int:
    names = [n for n in gpu_backends() if only in (None, n)]
    ok = True
    for training in (True, False) if not quick else (True,):
        for op in OPS:
            for dtype in (torch.float32, torch.bfloat16) if not quick else (torch.float32,):
                for cl in (False, True):
                    ok &= compare(op, (3, 33, 5, 7), dtype, cl, names, 1, training)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return 0 if ok else 1


def stages(quick: bool = False) -> int:
    names = gpu_backends()
    ok = True
    shapes = ((128, 64, 64, 64), (128, 128, 32, 32), (128, 256, 16, 16))
    variants = ((torch.bfloat16, True),) if quick else (
        (torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, False))
    for seed, shape in enumerate(shapes):
        for op in OPS:
            for dtype, cl in variants:
                ok &= compare(op, shape, dtype, cl, names, seed)
    return 0 if ok else 1


def profile() -> int:
    """Per op, stage shape and backend (bf16, channels_last, forward +
    backward): the wall time of a call against the GPU time of its kernels
    (torch.profiler), and the kernels that take the most. Wall time far above
    kernel time means the call is bound by its host-side (Python) work."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    names = gpu_backends()
    for shape in ((128, 64, 64, 64), (128, 128, 32, 32), (128, 256, 16, 16)):
        for op in OPS:
            case = Case(op, shape, DEVICE, torch.bfloat16, True, seed=0)
            for backend in [None] + names:
                def step():
                    return run_case(case, backend)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                reps = 10
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(reps):
                        step()
                    torch.cuda.synchronize()
                kernels = {}
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        us = e.time_range.elapsed_us() / reps
                        kernels[e.name] = kernels.get(e.name, 0.0) + us
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    step()
                end.record()
                torch.cuda.synchronize()
                wall = start.elapsed_time(end) * 1000 / reps
                top = sorted(kernels.items(), key=lambda kv: -kv[1])[:4]
                print(f"{op:18s} {'x'.join(map(str, shape)):14s} {backend or 'eager':6s} "
                      f"call {wall:7.0f} us, kernels {sum(kernels.values()):7.0f} us in "
                      f"{len(kernels)} kinds: "
                      + "; ".join(f"{k[:40]} {v:.0f}" for k, v in top), flush=True)
    return 0


class _TimedLaunches:
    """Records the host time of every Triton launch per kernel, or skips the
    launches (``noop``) so that what remains is the wrapper's own time."""

    def __init__(self, noop: bool):
        self.noop, self.times = noop, {}

    def __call__(self, kernel, grid, args, kwargs):
        t0 = time.perf_counter()
        if not self.noop:
            kernel[grid](*args, **kwargs)  # launched directly, as direct_launches() does
        self.times.setdefault(kernel_name(kernel), []).append(time.perf_counter() - t0)


def host(reps: int = 30) -> int:
    import cProfile
    import io
    import pstats

    shape = (128, 64, 64, 64) if DEVICE == "cuda" else (2, 64, 8, 8)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    for op in OPS:
        case = Case(op, shape, DEVICE, torch.bfloat16, True, seed=0)

        def step():
            return run_case(case, "triton")

        for noop in ((False, True) if DEVICE == "cuda" else (True,)):
            timed = _TimedLaunches(noop)
            with launches_replaced(timed):
                for _ in range(3):
                    step()
                sync()
                timed.times.clear()
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                host_s = time.perf_counter() - t0  # no sync inside: enqueue time
                sync()
                per = {k: 1e6 * sum(v) / reps for k, v in timed.times.items()}
                launches = sum(len(v) for v in timed.times.values()) / reps
                print(f"{op:18s} {'x'.join(map(str, shape))} triton "
                      f"{'wrapper (no-op launches)' if noop else 'call'}: "
                      f"{1e6 * host_s / reps:7.0f} us host per fwd+bwd, "
                      f"{launches:.0f} launches taking {sum(per.values()):.0f} us"
                      + ("" if noop else ": " + "; ".join(f"{k} {v:.0f}" for k, v in per.items())),
                      flush=True)
                if not noop or DEVICE != "cuda":  # the real calls; on a CPU the wrapper
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(reps):
                        step()
                    sync()
                    prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
                    print("\n".join(buf.getvalue().splitlines()[6:]), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("small", "stages", "profile", "host"))
    p.add_argument("--quick", action="store_true",
                   help="stages: bf16 channels_last only; small: fp32 training only")
    p.add_argument("--backend", default=None, help="small: this backend only")
    p.add_argument("--device", default="cuda",
                   help="cuda; cpu (with TRITON_INTERPRET=1) tries the script out")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cudnn.allow_tf32 = False   # the oracle comparisons are float32
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.what == "stages":
        return stages(args.quick)
    if args.what == "host":
        return host()
    return small(args.backend, args.quick) if args.what == "small" else profile()


if __name__ == "__main__":
    raise SystemExit(main())
