"""Compile every Triton kernel of the backend for sm_90 (H100/H200) without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python on numpy: it
proves the arithmetic, but Triton's compiler never sees the kernel, so one
can pass every CPU test and still fail to compile, or compile to code that
spills registers. This script runs each op's wrapper, forward and backward,
on CPU tensors with every kernel launch captured instead of run, then
compiles each captured launch with the real compiler (TTIR -> PTX -> ptxas
cubin) for sm_90 through a stand-in driver, once per autotuning
configuration of the call's layout, and reports per compiled kernel:

- registers per thread and bytes spilled (ptxas's own report);
- shared memory, and the theoretical occupancy these give on sm_90;
- barriers and warp shuffles inside loop bodies of the PTX: what a loop
  over tiles pays per iteration beyond its loads and arithmetic.

    python bench/triton_sm90.py [--quick [--dispatch]] [--ops OPS] [--json FILE] [--ptx DIR]

``--quick``: the first configuration of each layout only
(``RESFUSE_TRITON_AUTOTUNE=0``), float32 and bfloat16, one shape; about a
minute on two CPU cores (tests/test_triton_sm90.py runs it). The full run
adds float16 and float64, shapes with an odd channel count and with
H = W = 1 (each changes what Triton specialises on), and every
configuration the autotuner would try.

``--dispatch`` also times the host side of each launch of a compiled kernel
(Triton's Python up to the CUDA driver call), per op: the part of a
launch's host cost that a CPU can measure.

Exits 1 when a kernel fails to compile; spills are listed. Nothing here
runs a kernel: what it shows is what the compiler decided, not a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sm_90 limits per multiprocessor (CUDA occupancy calculator's table).
SM90 = dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=233472, smem_per_block=1024)


def occupancy(regs: int, shared: int, num_warps: int) -> float:
    """Resident warps / the maximum on an sm_90 multiprocessor for blocks of
    ``num_warps`` warps using ``regs`` registers per thread and ``shared``
    bytes of shared memory."""
    per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    blocks = min(SM90["blocks"], SM90["warps"] // num_warps,
                 (SM90["regs"] // max(per_warp, 1)) // num_warps)
    if shared:
        blocks = min(blocks, SM90["smem"] // (shared + SM90["smem_per_block"]))
    return blocks * num_warps / SM90["warps"]


def _stand_in_driver():
    """A Triton driver that answers "sm_90, device 0" without a GPU: enough
    for ``JITFunction.warmup`` to compile (it never loads or launches) and
    for the autotuner to pick its one configuration."""
    import torch
    from triton.backends.compiler import GPUTarget

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            # Triton 3.6's autotuner benchmarks even a single configuration
            # left by pruning (--dispatch): time nothing, call nothing
            return lambda fn, quantiles=None, **kwargs: [0.0] * len(quantiles or (0,))

    return Driver()


def ptxas_report(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ptxas's ``-v`` log of one kernel."""
    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    if "Used" not in log:
        raise RuntimeError(f"no ptxas report in:\n{log}")
    return dict(regs=number(r"Used (\d+) registers"),
                stack=number(r"(\d+) bytes stack frame"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def in_loops(ptx: str) -> dict[str, int]:
    """Barriers (``bar.sync``) and warp shuffles (``shfl``) inside loop
    bodies of ``ptx``: a loop body runs from a label to a later branch back
    to it. What a loop over tiles pays every iteration, where the static
    count of the whole kernel would mix in the once-per-program work."""
    lines = ptx.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines)
                if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    inside = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and label_at.get(m.group(1), i + 1) < i:
            inside.update(range(label_at[m.group(1)], i))
    body = [lines[i] for i in sorted(inside)]
    return dict(loop_barriers=sum("bar.sync" in x for x in body),
                loop_shuffles=sum("shfl" in x for x in body))


# Constexpr flags that select a kernel's variant, as shown in the report.
FLAGS = {"HAS_CARRY": "carry", "TWO": "two", "TRAINING": "train"}


def _describe(args, named) -> str:
    """What a launch specialises on, briefly: storage dtypes, layout, flags."""
    import torch
    dtypes = sorted({str(a.dtype).replace("torch.", "").replace("float", "f") for a in args
                     if isinstance(a, torch.Tensor) and a.numel() > 1})
    parts = ["/".join(dtypes)]
    if "LAYOUT" in named:
        parts.append("cl" if named["LAYOUT"] else "nchw")
    parts += [label for flag, label in FLAGS.items() if named.get(flag)]
    return " ".join(parts)


class Compiler:
    """Compiles each captured launch for every configuration it could run with."""

    def __init__(self, ptx_dir: Path | None = None):
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.ptx_dir = ptx_dir
        self._seen: set = set()

    def __call__(self, kernel, grid, args, kwargs):
        from launches import kernel_name

        name = kernel_name(kernel)
        jit = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps one
        named = dict(zip(jit.arg_names, args), **kwargs)
        variants = [{}]
        if hasattr(kernel, "configs"):  # an Autotuner: the configs of this call's layout
            configs = kernel.configs
            if kernel.early_config_prune is not None:
                configs = kernel.early_config_prune(configs, named, **kwargs)
            variants = [dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                             **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
                        for cfg in configs]
        for extra in variants:
            t0 = time.perf_counter()
            log = io.StringIO()  # Triton prints ptxas's log (TRITON_DUMP_PTXAS_LOG)
            try:
                with contextlib.redirect_stdout(log):
                    compiled = jit.warmup(*args, grid=(1,), **kwargs, **extra)
            except Exception as exc:  # report every failure, not only the first
                message = str(exc).strip().splitlines()
                self.errors.append(f"{name} {_describe(args, named)} {extra}: "
                                   f"{type(exc).__name__}: {message[-1] if message else ''}")
                continue
            if compiled.hash in self._seen:
                continue
            self._seen.add(compiled.hash)
            ptx = compiled.asm["ptx"]
            meta = compiled.metadata
            row = dict(kernel=name, what=_describe(args, named),
                       config={k: v for k, v in extra.items() if k.isupper()},
                       num_warps=meta.num_warps, num_stages=meta.num_stages,
                       **ptxas_report(log.getvalue()), shared=meta.shared, **in_loops(ptx),
                       compile_s=round(time.perf_counter() - t0, 2))
            row["occupancy"] = round(occupancy(row["regs"], meta.shared, meta.num_warps), 3)
            self.rows.append(row)
            if self.ptx_dir is not None:
                self.ptx_dir.mkdir(parents=True, exist_ok=True)
                stem = self.ptx_dir / f"{name}-{compiled.hash[:10]}"
                stem.with_suffix(".ptx").write_text(
                    f"// {row['what']} {extra}\n" + ptx)


OPS = ("highway_gate", "resfuse_tail", "resfuse_tail_carry")


def dispatch_times(ops, reps: int = 200) -> dict[str, list[tuple[str, float]]]:
    """Per op (bf16, channels_last, training, forward + backward): the host
    time of each Triton launch, in seconds, up to the CUDA driver call:
    ``kernel.run(..., warmup=True)`` on a compiled kernel does everything a
    launch does on the host (the autotuner's key and cache, argument
    binding and specialisation, the kernel cache lookup) but the launch.
    Median of 5 batches of ``reps``. Needs the kernels compiled (by a
    :class:`Compiler` pass over the same cases) and one configuration per
    layout (no benchmarking)."""
    import torch

    from launches import kernel_name, launches_replaced
    from resfuse_kernels import backends
    from resfuse_kernels.bench.ops import Case

    out = {}
    for op in ops:
        launches = []
        with launches_replaced(lambda *launch: launches.append(launch)), backends.use("triton"):
            case = Case(op, (2, 64, 8, 8), "cpu", torch.bfloat16, True, seed=0)
            case.backward(case.fused(True))
        out[op] = []
        for kernel, grid, args, kwargs in launches:
            batches = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    kernel.run(*args, grid=grid, warmup=True, **kwargs)
                batches.append((time.perf_counter() - t0) / reps)
            out[op].append((kernel_name(kernel), sorted(batches)[2]))
    return out


def cases(quick: bool, ops=OPS):
    """(op, shape, dtype, channels_last, training) of every wrapper call."""
    import torch
    dtypes = [torch.float32, torch.bfloat16]
    shapes = [(2, 64, 8, 8)]
    if not quick:
        dtypes += [torch.float16, torch.float64]
        shapes += [(3, 33, 5, 3), (2, 64, 1, 1)]
    for op in ops:
        for shape in shapes:
            for dtype in dtypes:
                for channels_last in (False, True):
                    for training in (True, False):
                        yield op, shape, dtype, channels_last, training


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="first configuration per layout, fp32 and bf16, one shape")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument("--ptx", type=Path, default=None, help="write each kernel's PTX here")
    p.add_argument("--dispatch", action="store_true",
                   help="with --quick: also time the host side of each launch (no GPU call)")
    args = p.parse_args()
    if args.dispatch and not args.quick:
        p.error("--dispatch needs --quick (one configuration per layout: nothing to tune)")

    # Before Triton is imported: real JIT functions (not the interpreter's),
    # the configurations to compile, ptxas's report printed, and an empty
    # cache, so that every kernel is compiled (a cached one has no report).
    os.environ.pop("TRITON_INTERPRET", None)
    if args.quick:
        os.environ["RESFUSE_TRITON_AUTOTUNE"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    cache = tempfile.TemporaryDirectory(prefix="triton-sm90-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

    import torch
    import triton
    from triton.runtime import driver

    from launches import launches_replaced
    from resfuse_kernels import backends
    from resfuse_kernels.bench.ops import Case

    driver.set_active(_stand_in_driver())
    # The registry lets the compiled Triton backend take CUDA tensors only;
    # here it gets CPU ones, whose launches are captured, never run.
    backends._devices = lambda name: ("cpu", "cuda")
    compiler = Compiler(args.ptx)
    t0 = time.perf_counter()
    with launches_replaced(compiler), backends.use("triton"):
        for op, shape, dtype, channels_last, training in cases(args.quick, args.ops.split(",")):
            case = Case(op, shape, "cpu", dtype, channels_last, seed=0)
            for m in case.bns:
                m.train(training)
            case.backward(case.fused(training))
    elapsed = time.perf_counter() - t0

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90: "
          f"{len(compiler.rows)} kernels compiled in {elapsed:.0f} s")
    print(f"{'kernel':24s} {'specialised on':24s} {'config':16s} {'warps':>5s} "
          f"{'regs':>4s} {'spill':>5s} {'smem':>6s} {'loop bar/shfl':>13s} {'occup.':>6s}")
    for r in sorted(compiler.rows, key=lambda r: (r["kernel"], r["what"], str(r["config"]))):
        config = "x".join(str(v) for v in r["config"].values())
        loop = f"{r['loop_barriers']}/{r['loop_shuffles']}"
        print(f"{r['kernel']:24s} {r['what']:24s} {config:16s} {r['num_warps']:5d} "
              f"{r['regs']:4d} {r['spill_stores']:5d} {r['shared']:6d} {loop:>13s} "
              f"{r['occupancy']:6.0%}")
    spills = [r for r in compiler.rows if r["spill_stores"]]
    for r in spills:
        print(f"SPILL {r['kernel']} {r['what']} {r['config']} {r['num_warps']} warps: "
              f"{r['spill_stores']} bytes stored, {r['spill_loads']} loaded")
    for e in compiler.errors:
        print(f"ERROR {e}")
    dispatch = {}
    if args.dispatch:
        dispatch = dispatch_times(args.ops.split(","))
        print("host time of a Triton launch up to the driver call (bf16, channels_last, "
              "2x64x8x8, fwd+bwd), us:")
        for op, times in dispatch.items():
            print(f"  {op:18s} {1e6 * sum(t for _, t in times):6.0f} in {len(times)} launches: "
                  + ", ".join(f"{name} {1e6 * t:.0f}" for name, t in times))
    if args.json is not None:
        import json
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            what="Triton kernels compiled for sm_90 on a CPU host (nothing run)",
            triton=triton.__version__, torch=torch.__version__, quick=args.quick,
            rows=compiler.rows, errors=compiler.errors, dispatch_s=dispatch), indent=1) + "\n")
    cache.cleanup()
    return 1 if compiler.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
