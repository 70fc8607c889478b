#!/usr/bin/env python3
"""A mutation check of the test suite: ``make mutants`` (issue 12, item 4).

Each mutant below is one small, plausible bug planted in one source file:
the wrong eps or momentum of one BatchNorm, a biased running variance, a
missing term of a backward formula, an off-by-one in a ragged last tile, a
wrong output memory format, a dropped gradient of one affine parameter,
statistics from the wrong tensor, a flipped gate. For every mutant this
script

1. applies it to a scratch copy of the tree (never to the tree itself):
   ``old`` must occur exactly once in the file, else the mutant is an
   error (a mutant that no longer applies is stale, not a survivor);
2. rebuilds what it must: a change under csrc/cpu (or csrc/*.h) rebuilds
   the ``cpu`` extension in the scratch copy (``setup.py build_ext
   --inplace``; ninja recompiles only what the change touches); a
   csrc/cuda change needs nothing up front, since the CUDA emulation tests
   compile the scratch copy's sources themselves; Python and Triton
   changes need nothing;
3. runs its test selection (``pytest -x``, the scratch copy's package and
   tests, checked by a plugin at collection) and records it as **killed**
   (a test failed), **survived** (the selection passed) or **error** (the
   mutant did not apply, the build failed, no test ran, the run broke
   before any test failed, or it timed out: none of them is a kill);
4. restores the file (and the pristine extension).

Every killing test is then rerun once on the unmutated scratch copy (one
pytest run for all of them): a test that fails there too killed nothing,
and its mutant is an error.

It is a check of the tests, not part of ``make test``: it takes tens of
minutes (a cpu mutant costs a ~50 s rebuild, a cuda one the emulation's
~50 s compile). Exit status 0 only when every selected mutant was killed.

    python tests/mutants.py                 # every mutant
    python tests/mutants.py --list          # what they are
    python tests/mutants.py --only cpu-eps-k,triton-ragged-pixels
    python tests/mutants.py --check         # do they all still apply? (no tests)
    make mutants MUTANTS_ARGS="--only torch-eps-k"

The scratch copy holds the working tree as it is (tracked and untracked,
not ignored files), or a commit with ``--rev``. The tests' own seeds apply
(RESFUSE_TEST_SEED and RESFUSE_TEST_SEED_OFFSET pass through); every other
RESFUSE_* variable is cleared, so that the suite runs in its default
configuration (RESFUSE_BACKEND=torch, say, would hide the compiled backends).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCRATCH = Path(os.environ.get("TMPDIR", "/tmp")) / "resfuse-mutants"

BACKENDS = ("python", "torch", "triton", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    backend: str  # one of BACKENDS ("python": the wrapper, resfuse_kernels/ops/*.py)
    category: str
    path: str  # relative to the repository root
    old: str  # exact source text, present exactly once in ``path``
    new: str  # its replacement
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    description: str


def on(backend: str, *names: str) -> str:
    """A -k expression: the tests named ``names`` (substrings) run on
    ``backend`` only (the ``backend`` fixture's ids start with its name:
    ``test_x[cpu-...]``, or ``test_x[cpu]`` where it is the only one)."""
    ids = f"([{backend}- or [{backend}])"
    return f"{ids} and ({' or '.join(names)})" if names else ids


def ops_tests(backend: str, *names: str, also: str | None = None) -> tuple[str, ...]:
    """tests/test_ops.py's tests ``names`` on ``backend`` (:func:`on`), or
    those matching the -k expression ``also``."""
    expr = on(backend, *names)
    return ("tests/test_ops.py", "-k", expr if also is None else f"({expr}) or ({also})")


def with_blocks(backend: str, kind: str, *names: str) -> tuple[str, ...]:
    """tests/test_ops.py's ``names`` on ``backend`` and tests/test_models.py's
    fused ``kind`` blocks trained against the reference (running statistics
    after every step included) on ``backend``."""
    return ("tests/test_ops.py", "tests/test_models.py", "-k",
            f"({on(backend, *names)}) or [{backend}-{kind}-")


EMULATION = ("tests/test_cuda_backend.py", "-k", "emulated")

M = Mutant
MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------- Python wrapper
    M("py-momentum-k", "python", "momentum", "resfuse_kernels/ops/resfuse_tail.py",
      '"momentum_k": momentum_k}, process_group)',
      '"momentum_k": momentum_d}, process_group)',
      ops_tests("torch", "test_resfuse_tail_matches_oracle"),
      "planted bug (b): BN_k's running statistics updated with BN_d's momentum"),
    M("py-momentum-t", "python", "momentum", "resfuse_kernels/ops/highway_gate.py",
      '"momentum_t": momentum_t}, process_group)',
      '"momentum_t": momentum_h}, process_group)',
      ops_tests("torch", "test_highway_gate_matches_oracle"),
      "planted bug (b): BN_t's running statistics updated with BN_h's momentum"),
    M("py-biased-var", "python", "running variance", "resfuse_kernels/ops/_define.py",
      "var = torch.mul(var, factor, out=",
      "var = torch.mul(var, 1.0, out=",
      with_blocks("torch", "highway", "test_highway_gate_matches_oracle"),
      "update_running_stats folds in the biased batch variance (no count / (count - 1))"),
    M("py-dweight-last", "python", "affine gradient", "resfuse_kernels/ops/_define.py",
      "for g, i in zip(grads, grad_at):",
      "for g, i in zip(grads[:-2], grad_at):",
      ops_tests("torch", "test_highway_gate_matches_oracle"),
      "the autograd formula drops the last BatchNorm's affine gradients (weight_t, bias_t)"),
    M("py-fake-format", "python", "memory format", "resfuse_kernels/ops/_common.py",
      "return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device,\n"
      "                       memory_format=memory_format(t))",
      "return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)",
      ("tests/test_ops.py", "-k", on("torch", "opcheck") + " and channels_last"),
      "the fake (meta) outputs are contiguous where the kernels' are channels_last"),

    # ------------------------------------------------------------- composite (torch)
    M("torch-eps-k", "torch", "eps", "resfuse_kernels/ops/composite.py",
      "z = z + _bn(v, mean_k, var_k, eps_k, weight_k, bias_k)\n    return",
      "z = z + _bn(v, mean_k, var_k, eps_d, weight_k, bias_k)\n    return",
      ops_tests("torch", "test_resfuse_tail_matches_oracle"),
      "planted bug (c): the forward normalises BN_k with BN_d's eps"),
    M("torch-eps-t-backward", "torch", "eps", "resfuse_kernels/ops/composite.py",
      "_bn_backward(g_t, b_, mean_t, var_t, eps_t,",
      "_bn_backward(g_t, b_, mean_t, var_t, eps_h,",
      ops_tests("torch", "test_highway_gate_matches_oracle"),
      "planted bug (c): the backward normalises BN_t with BN_h's eps"),
    M("torch-backward-term", "torch", "backward term", "resfuse_kernels/ops/composite.py",
      "k2, k3 = -wr * r * dweight / count, -wr * dbias / count",
      "k2, k3 = 0 * dweight, -wr * dbias / count",
      ops_tests("torch", "test_resfuse_tail_matches_oracle"),
      "BN input gradient without its - z_hat * dweight / M term"),
    M("torch-format", "torch", "memory format", "resfuse_kernels/ops/composite.py",
      "return t.to(like.dtype).contiguous(memory_format=memory_format(like))",
      "return t.to(like.dtype).contiguous()",
      ops_tests("torch", "test_highway_gate_matches_oracle"),
      "outputs (and gradients) contiguous even for channels_last inputs"),
    M("torch-carry-stats-from-u", "torch", "wrong tensor", "resfuse_kernels/ops/composite.py",
      "mean_k, var_k = _stats(v, training, running_mean_k, running_var_k)",
      "mean_k, var_k = _stats(u_, training, running_mean_k, running_var_k)",
      ops_tests("torch", "test_resfuse_tail_matches_oracle"),
      "the carry's BN_k statistics taken from u instead of v = W x"),
    M("torch-relu-mask", "torch", "backward term", "resfuse_kernels/ops/composite.py",
      "g_h = g * gate_t * (gate_h > 0)",
      "g_h = g * gate_t * (gate_h >= 0)",
      ops_tests("torch", "test_highway_gate_matches_oracle"),
      "the highway backward lets the gradient through the ReLU where it clipped"),

    # ------------------------------------------------------------- Triton (interpreter)
    M("triton-eps-k", "triton", "eps", "resfuse_kernels/triton/resfuse_tail.py",
      "mk, rk, wk, bk = bn_vectors(mk_ptr, vk_ptr, wk_ptr, bk_ptr, c, cmask, EPS_K, CT)",
      "mk, rk, wk, bk = bn_vectors(mk_ptr, vk_ptr, wk_ptr, bk_ptr, c, cmask, EPS_D, CT)",
      ("tests/test_triton_kernels.py", "-k", "test_resfuse_tail and carry and float32"),
      "every tail kernel normalises BN_k with BN_d's eps"),
    M("triton-ragged-pixels", "triton", "ragged tile", "resfuse_kernels/triton/_launch.py",
      "return n.to(tl.int64), s, s < S",
      "return n.to(tl.int64), s, s < S - 1",
      ("tests/test_triton_kernels.py", "-k", "test_highway_gate and float32"),
      "the pointwise tiles' pixel mask drops the last pixel of the ragged last tile"),
    M("triton-ragged-channels", "triton", "ragged tile", "resfuse_kernels/triton/_launch.py",
      "    mask = c < W\n",
      "    mask = c < W - 1\n",
      ("tests/test_triton_kernels.py", "-k", "test_highway_gate and float32 and train"),
      "the statistics' finalize drops the last channel of its ragged last block"),
    M("triton-backward-term", "triton", "backward term", "resfuse_kernels/triton/highway_gate.py",
      "C, g_t, b, TRAINING, CT)",
      "C, g_t, b, False, CT)",
      ("tests/test_triton_kernels.py", "-k", "test_highway_gate and float32 and train"),
      "db without its batch-statistics terms k2 (b - mean_t) + k3"),
    M("triton-stats-from-h", "triton", "wrong tensor", "resfuse_kernels/triton/resfuse_tail.py",
      "mean_d, var_d = batch_stats(u3, su)",
      "mean_d, var_d = batch_stats(h3, sh)",
      ("tests/test_triton_kernels.py", "-k", "test_resfuse_tail and float32 and train"),
      "BN_d's batch statistics taken from the identity h instead of u"),
    M("triton-format", "triton", "memory format", "resfuse_kernels/triton/highway_gate.py",
      "    y = empty_output(a)\n",
      "    y = torch.empty_like(a, memory_format=torch.contiguous_format)\n",
      ("tests/test_triton_kernels.py", "-k", "test_highway_gate and float32 and cl"),
      "the output allocated contiguous where the composite's is channels_last"),
    M("triton-dbias-k", "triton", "affine gradient", "resfuse_kernels/triton/resfuse_tail.py",
      "dw.reshape(w.shape).to(w.dtype), *affine[2:])",
      "dw.reshape(w.shape).to(w.dtype), affine[2], torch.empty_like(affine[3]))",
      ("tests/test_triton_kernels.py", "-k", "test_resfuse_tail and carry and float32"),
      "bias_k's gradient never written (left uninitialised)"),
    M("triton-sigmoid", "triton", "gate", "resfuse_kernels/triton/highway_gate.py",
      "return tl.where(z >= 0, r, e * r)",
      "return tl.where(z >= 0, e * r, r)",
      ("tests/test_triton_kernels.py", "-k", "test_highway_gate and float32"),
      "the gate's sigmoid computes sigmoid(-z)"),

    # ------------------------------------------------------------- cpu (C++)
    M("cpu-eps-k", "cpu", "eps", "csrc/cpu/ops.cpp",
      "running_mean_d, running_var_d);\n"
      "    const Affine<A> bn_d(weight_d, bias_d, mean_d, var_d, eps_d);\n"
      "    // v is centred: BN_k's mean is 0\n"
      "    const Affine<A> bn_k =\n"
      "        carry ? Affine<A>(*weight_k, *bias_k, at::zeros_like(var_k), var_k, eps_k)",
      "running_mean_d, running_var_d);\n"
      "    const Affine<A> bn_d(weight_d, bias_d, mean_d, var_d, eps_d);\n"
      "    // v is centred: BN_k's mean is 0\n"
      "    const Affine<A> bn_k =\n"
      "        carry ? Affine<A>(*weight_k, *bias_k, at::zeros_like(var_k), var_k, eps_d)",
      ops_tests("cpu", "test_resfuse_tail_matches_oracle"),
      "planted bug (a): the tail forward kernel uses BN_d's eps for BN_k"),
    M("cpu-eps-t", "cpu", "eps", "csrc/cpu/ops.cpp",
      "running_mean_t, running_var_t);\n"
      "    const Affine<A> bn_h(weight_h, bias_h, mean_h, var_h, eps_h);\n"
      "    const Affine<A> bn_t(weight_t, bias_t, mean_t, var_t, eps_t);",
      "running_mean_t, running_var_t);\n"
      "    const Affine<A> bn_h(weight_h, bias_h, mean_h, var_h, eps_h);\n"
      "    const Affine<A> bn_t(weight_t, bias_t, mean_t, var_t, eps_h);",
      ops_tests("cpu", "test_highway_gate_matches_oracle"),
      "planted bug (a): the highway forward kernel uses BN_h's eps for BN_t"),
    M("cpu-eps-k-backward", "cpu", "eps", "csrc/cpu/ops.cpp",
      "RESFUSE_RESFUSE_TAIL_BACKWARD(resfuse_tail_backward) {\n"
      "  const Geometry g = Geometry::of(u_in);",
      "RESFUSE_RESFUSE_TAIL_BACKWARD(resfuse_tail_backward) {\n"
      "  eps_k = eps_d;\n  const Geometry g = Geometry::of(u_in);",
      ops_tests("cpu", "test_resfuse_tail_matches_oracle"),
      "the tail backward kernel uses BN_d's eps for BN_k"),
    M("cpu-dv-term", "cpu", "backward term", "csrc/cpu/ops.cpp",
      "in_k(carry ? *weight_k : weight_d, bn_k, sums[0], sum_gv, M, training);",
      "in_k(carry ? *weight_k : weight_d, bn_k, std::vector<double>(g.C), sum_gv, M, training);",
      ops_tests("cpu", "test_resfuse_tail_matches_oracle"),
      "the carry's dv (formed in double) without its - sum(g) / M term"),
    M("cpu-backward-term", "cpu", "backward term", "csrc/cpu/ops.cpp",
      "if (batch) k2[c] = -wr * r * sum_gz[c] / count,",
      "if (batch) k2[c] = 0,",
      ops_tests("cpu", "test_highway_gate_matches_oracle"),
      "the input gradients without their - z_hat * dweight / M term"),
    M("cpu-dbias-k", "cpu", "affine gradient", "csrc/cpu/ops.cpp",
      "dbias_k = channel_tensor(sums[0], *bias_k);",
      "dbias_k = at::zeros_like(*bias_k);",
      ops_tests("cpu", "test_resfuse_tail_matches_oracle"),
      "bias_k's gradient dropped (zeros)"),
    M("cpu-ragged-vector", "cpu", "ragged tile", "csrc/cpu/kernels.h",
      "for (int64_t pos = 0; pos < len; pos += width)\n"
      "        f(r * len + pos, pos, c, std::min(width, len - pos));",
      "for (int64_t pos = 0; pos + width <= len; pos += width)\n"
      "        f(r * len + pos, pos, c, std::min(width, len - pos));",
      ops_tests("cpu", "test_highway_gate_matches_oracle"),
      "the elementwise passes skip the ragged last vector of each run"),
    M("cpu-chan-merge", "cpu", "statistics", "csrc/cpu/kernels.h",
      "a.m2 += b.m2 + d * d * a.n * w;",
      "a.m2 += b.m2;",
      ops_tests("cpu", "test_resfuse_tail_matches_oracle"),
      "the tiles' Chan merge drops the spread between tile means from M2"),
    M("cpu-grad-format", "cpu", "memory format", "csrc/cpu/ops.cpp",
      "return {da.contiguous(resfuse::format_of(a_in)), ",
      "return {da.contiguous(), ",
      ops_tests("cpu", "test_opcheck_highway_gate", "test_highway_gate_matches_oracle"),
      "the highway backward returns da contiguous for a channels_last a"),

    # ------------------------------------------------------------- cuda (CPU emulation)
    M("cuda-eps-t", "cuda", "eps", "csrc/cuda/highway_gate.cu",
      "const Tensor prm_t = bn_params<A>(mean_t, var_t, weight_t, bias_t, eps_t);",
      "const Tensor prm_t = bn_params<A>(mean_t, var_t, weight_t, bias_t, eps_h);",
      EMULATION, "the highway forward uses BN_h's eps for BN_t"),
    M("cuda-carry-stats-from-u", "cuda", "wrong tensor", "csrc/cuda/resfuse_tail.cu",
      "stats_or_running<scalar_t>(vp, g, training, running_mean_k, running_var_k);",
      "stats_or_running<scalar_t>(u.to(vp.scalar_type()), g, training, running_mean_k,\n"
      "                                    running_var_k);",
      EMULATION, "the carry's BN_k statistics taken from u instead of v = W x"),
    M("cuda-ragged-channels", "cuda", "ragged tile", "csrc/cuda/bn.cuh",
      "plan.groups = ceil_div(cv, bx);",
      "plan.groups = cv / bx;",
      EMULATION, "channels_last reductions drop the ragged last group of channel vectors"),
    M("cuda-backward-term", "cuda", "backward term", "csrc/cuda/bn.cuh",
      "b.coef64[C + c] = batch ? -wr * r * sgz / M : 0.0;",
      "b.coef64[C + c] = 0.0;",
      EMULATION, "BN input gradients without their - z_hat * dweight / M term"),
    M("cuda-dweight-k", "cuda", "affine gradient", "csrc/cuda/resfuse_tail.cu",
      "g, opts, training, carry ? 2 : 1, grad_d, grad_k, bd.bn(), bn_k,",
      "g, opts, training, 1, grad_d, grad_k, bd.bn(), bn_k,",
      EMULATION, "the backward finalizes BN_d only: BN_k's dweight/dbias stay zero"),
    M("cuda-sigmoid", "cuda", "gate", "csrc/cuda/highway_gate.cu",
      "const A t = sigmoid(lt.affine(bv[l], l));",
      "const A t = sigmoid(-lt.affine(bv[l], l));",
      EMULATION, "the highway forward's gate is sigmoid(-z)"),
    M("cuda-dx-format", "cuda", "memory format", "csrc/cuda/highway_gate.cu",
      "dx.contiguous(resfuse::format_of(x_in)),",
      "dx.contiguous(),",
      EMULATION, "the highway backward returns dx contiguous for a channels_last x"),
]


# ---------------------------------------------------------------------------
# the scratch copy


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def copy_tree(dest: Path, rev: str | None) -> None:
    """The tree's files into ``dest``: the working tree's tracked and untracked
    (not ignored) files, or commit ``rev``'s."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            try:
                tar.extractall(dest, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(dest)
        return
    listed = _run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"], check=True).stdout
    for rel in sorted(set(filter(None, listed.split("\0")))):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
        shutil.copymode(src, dest / rel)


GUARD = '''\
"""pytest plugin of tests/mutants.py: the run must import the scratch copy
(its package, its compiled extension and its tests), never the tree that
is installed in editable mode; it also logs every failure."""
import os
import sys

import pytest

ROOT = os.path.realpath(os.environ["RESFUSE_MUTANTS_ROOT"])
LOG = os.environ["RESFUSE_MUTANTS_LOG"]


def _inside(path):
    return path is not None and os.path.realpath(path).startswith(ROOT + os.sep)


def pytest_collection_finish(session):
    import resfuse_kernels
    wrong = []
    if not _inside(resfuse_kernels.__file__):
        wrong.append(resfuse_kernels.__file__)
    ext = sys.modules.get("resfuse_kernels._ext_cpu")
    if ext is not None and not _inside(ext._spec.origin):
        wrong.append(ext._spec.origin)
    conftest = sys.modules.get("conftest")
    if conftest is not None and not _inside(conftest.__file__):
        wrong.append(conftest.__file__)
    with open(LOG, "a") as log:
        log.write(f"imported\\t{resfuse_kernels.__file__}\\n")
    if wrong:
        pytest.exit(f"mutants: imported {wrong}, not the scratch copy {ROOT}", returncode=3)


def pytest_runtest_logreport(report):
    if report.failed or (report.when == "call" and report.passed):
        with open(LOG, "a") as log:
            log.write(f"{'failed' if report.failed else 'passed'}\\t{report.when}\\t"
                      f"{report.nodeid}\\n")
'''


class Scratch:
    """The scratch copy, its pristine files and the way tests run in it."""

    def __init__(self, base: Path, timeout: float):
        self.base = base
        self.tree = base / "tree"
        self.plugins = base / "plugins"
        self.logs = base / "logs"
        self.timeout = timeout
        self.pristine_ext: list[tuple[Path, Path]] = []

    def setup(self, rev: str | None) -> None:
        copy_tree(self.tree, rev)
        for d in (self.plugins, self.logs):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        (self.plugins / "_mutants_guard.py").write_text(GUARD)

    def env(self, log: Path) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RESFUSE_") or k in ("RESFUSE_TEST_SEED",
                                                         "RESFUSE_TEST_SEED_OFFSET")}
        env.update(PYTHONPATH=os.pathsep.join([str(self.tree), str(self.plugins)]),
                   PYTHONDONTWRITEBYTECODE="1", RESFUSE_MUTANTS_ROOT=str(self.tree),
                   RESFUSE_MUTANTS_LOG=str(log), COLUMNS="200", MAX_JOBS="2")
        return env

    # -- the cpu extension

    def extension_files(self) -> list[Path]:
        return sorted((self.tree / "resfuse_kernels").glob("_C_cpu*.so"))

    def build_cpu(self, log: Path) -> str | None:
        """Builds the cpu extension in the scratch copy; None, or why it failed."""
        start = time.time()
        with open(log, "w") as out:
            try:
                proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                                      cwd=self.tree, env=self.env(log.with_suffix(".unused")),
                                      stdout=out, stderr=subprocess.STDOUT,
                                      timeout=self.timeout)
            except subprocess.TimeoutExpired:
                return f"timed out after {self.timeout:.0f} s (see {log})"
        text = log.read_text(errors="replace")
        libs = self.extension_files()
        if proc.returncode != 0:
            return f"setup.py exited {proc.returncode} (see {log})"
        if "building resfuse_kernels._C_cpu failed" in text:
            return f"the cpu extension did not compile (see {log})"
        if not libs or all(p.stat().st_mtime < start - 1 for p in libs):
            return f"no fresh _C_cpu library after the build (see {log})"
        return None

    def save_pristine_ext(self) -> None:
        keep = self.base / "pristine"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir()
        self.pristine_ext = []
        for lib in self.extension_files():
            shutil.copy2(lib, keep / lib.name)
            self.pristine_ext.append((keep / lib.name, lib))

    def restore_pristine_ext(self) -> None:
        for saved, lib in self.pristine_ext:
            shutil.copy2(saved, lib)

    # -- tests

    def pytest(self, args: list[str], log_name: str, stop_first: bool = True):
        """Runs pytest in the scratch copy: (returncode, [(status, when, nodeid)], seconds)."""
        record = self.logs / f"{log_name}.results"
        record.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", "_mutants_guard", f"--basetemp={self.base / 'pytest-tmp'}",
               *(["-x"] if stop_first else []), *args]
        start = time.time()
        with open(self.logs / f"{log_name}.log", "w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            try:
                proc = subprocess.run(cmd, cwd=self.tree, env=self.env(record), stdout=out,
                                      stderr=subprocess.STDOUT, timeout=self.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        rows = []
        if record.exists():
            for line in record.read_text().splitlines():
                parts = line.split("\t")
                if parts[0] in ("passed", "failed") and len(parts) == 3:
                    rows.append(tuple(parts))
                elif parts[0] == "imported":
                    rows.append(("imported", "", parts[1]))
        return rc, rows, time.time() - start


# ---------------------------------------------------------------------------
# one mutant


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # killed | survived | error
    detail: str
    seconds: float
    killer: str | None = None


def occurrences(text: str, old: str) -> int:
    return text.count(old)


def needs_cpu_build(path: str) -> bool:
    return path.startswith("csrc/cpu/") or (path.startswith("csrc/") and path.count("/") == 1)


def run_mutant(scratch: Scratch, m: Mutant) -> Result:
    start = time.time()
    target = scratch.tree / m.path
    if not target.is_file():
        return Result(m, "error", f"{m.path} does not exist", 0.0)
    original = target.read_bytes()
    text = original.decode()
    found = occurrences(text, m.old)
    if found != 1:
        return Result(m, "error", f"STALE: `old` found {found} times in {m.path} "
                                  "(must be exactly once)", 0.0)
    digest = hashlib.sha256(original).hexdigest()
    try:
        target.write_text(text.replace(m.old, m.new, 1))
        if needs_cpu_build(m.path):
            why = scratch.build_cpu(scratch.logs / f"{m.id}.build.log")
            if why is not None:
                return Result(m, "error", f"build failed: {why}", time.time() - start)
        rc, rows, _ = scratch.pytest(list(m.tests), m.id)
    finally:
        target.write_bytes(original)
        if needs_cpu_build(m.path):
            scratch.restore_pristine_ext()
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest, m.path
    seconds = time.time() - start
    failed = [r for r in rows if r[0] == "failed"]
    passed = [r for r in rows if r[0] == "passed"]
    log = scratch.logs / f"{m.id}.log"
    if rc is None:
        return Result(m, "error", f"timed out after {scratch.timeout:.0f} s (see {log})", seconds)
    calls = [r for r in failed if r[1] == "call"]
    if calls:
        return Result(m, "killed", calls[0][2], seconds, killer=calls[0][2])
    if rc < 0:
        return Result(m, "killed", f"pytest crashed (signal {-rc}; see {log})", seconds)
    if failed:  # setup or teardown only: a fixture (the emulation's build, say) broke
        return Result(m, "error", f"{failed[0][1]} of {failed[0][2]} failed, no test did "
                                  f"(see {log})", seconds)
    if rc == 0 and passed:
        return Result(m, "survived", f"{len(passed)} tests passed", seconds)
    if rc == 0:
        return Result(m, "error", f"no test ran (all skipped? see {log})", seconds)
    if rc == 5:
        return Result(m, "error", f"the selection collected no test (see {log})", seconds)
    return Result(m, "error", f"pytest exited {rc} before any test failed (see {log})", seconds)


def confirm_kills(scratch: Scratch, results: list[Result]) -> None:
    """Reruns every killing test on the unmutated copy: one that fails there
    too killed nothing, and its mutant becomes an error."""
    killers = sorted({r.killer for r in results if r.killer})
    if not killers:
        return
    print(f"\nconfirming {len(killers)} killing tests on the unmutated copy ...", flush=True)
    rc, rows, seconds = scratch.pytest(killers, "confirm-unmutated", stop_first=False)
    failing = {r[2] for r in rows if r[0] == "failed"}
    ran = {r[2] for r in rows if r[0] == "passed"} | failing
    for r in results:
        if not r.killer:
            continue
        if r.killer in failing:
            r.status, r.detail = "error", f"{r.killer} fails without the mutation too"
        elif r.killer not in ran:
            r.status, r.detail = "error", (f"{r.killer} did not run on the unmutated copy "
                                           f"(rc {rc}; see {scratch.logs}/confirm-unmutated.log)")
    print(f"  done in {seconds:.0f} s: {len(failing)} of them fail unmutated", flush=True)


# ---------------------------------------------------------------------------
# reporting


def table(results: list[Result]) -> str:
    lines = ["| id | backend | mutation | result |", "|---|---|---|---|"]
    for r in results:
        m = r.mutant
        what = f"{m.description} (`{m.path}`)".replace("|", "\\|")
        result = (f"killed by `{r.detail}`" if r.status == "killed"
                  else f"**{r.status}**: {r.detail}")
        lines.append(f"| {m.id} | {m.backend} | {what} | {result.replace('|', '/')} |")
    return "\n".join(lines)


def list_mutants(mutants: list[Mutant]) -> None:
    for m in mutants:
        print(f"{m.id}  [{m.backend}, {m.category}]  {m.path}\n    {m.description}\n"
              f"    - {m.old!r}\n    + {m.new!r}\n    tests: {' '.join(m.tests)}")
    by_backend = {b: sum(m.backend == b for m in mutants) for b in BACKENDS}
    print(f"\n{len(mutants)} mutants: " + ", ".join(f"{b} {n}" for b, n in by_backend.items()))


def check_unique_ids() -> None:
    ids = [m.id for m in MUTANTS]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate mutant ids: {dupes}"
    for m in MUTANTS:
        assert m.backend in BACKENDS, m
        assert m.old != m.new, m.id


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", metavar="ID[,ID]",
                        help="run these mutants only (comma-separated ids)")
    parser.add_argument("--backend", metavar="NAME[,NAME]", help=f"only these: {BACKENDS}")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant applies to the scratch copy")
    parser.add_argument("--rev", help="mutate this commit (git archive) instead of the "
                                      "working tree")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH,
                        help=f"scratch directory (default {DEFAULT_SCRATCH}; replaced)")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds per build or test run before the mutant is an error")
    parser.add_argument("--no-confirm", action="store_true",
                        help="skip rerunning the killing tests on the unmutated copy")
    parser.add_argument("--report", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    check_unique_ids()

    mutants = MUTANTS
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = sorted(set(wanted) - {m.id for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant ids {unknown}; --list shows them")
        mutants = [m for m in MUTANTS if m.id in wanted]
    if args.backend:
        names = set(args.backend.split(","))
        mutants = [m for m in mutants if m.backend in names]
    if args.list:
        list_mutants(mutants)
        return 0

    wall = time.time()
    scratch = Scratch(args.scratch.resolve(), args.timeout)
    print(f"scratch copy of {ROOT if args.rev is None else args.rev}: {scratch.tree}", flush=True)
    scratch.setup(args.rev)
    stale = []
    for m in mutants:
        path = scratch.tree / m.path
        found = occurrences(path.read_text(), m.old) if path.is_file() else 0
        if found != 1:
            stale.append(m)
            print(f"ERROR: mutant {m.id}: `old` occurs {found} times in {m.path}, not once: "
                  "the mutant no longer applies (fix its snippet)", file=sys.stderr, flush=True)
    if args.check:
        print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
        return 1 if stale else 0

    print("building the cpu extension in the scratch copy ...", flush=True)
    t = time.time()
    why = scratch.build_cpu(scratch.logs / "pristine.build.log")
    if why is not None:
        print(f"ERROR: the unmutated cpu extension does not build: {why}", file=sys.stderr)
        return 2
    scratch.save_pristine_ext()
    print(f"  built in {time.time() - t:.0f} s", flush=True)
    rc, rows, _ = scratch.pytest(["tests/test_backends.py", "-k", "nothing_matches_this"],
                                 "import-check")
    imported = [r[2] for r in rows if r[0] == "imported"]
    if (rc not in (0, 5) or not imported
            or not imported[0].startswith(str(scratch.tree) + os.sep)):
        print(f"ERROR: pytest in the scratch copy imported {imported or 'nothing'} (rc {rc})",
              file=sys.stderr)
        return 2
    print(f"pytest imports {imported[0]}", flush=True)

    results: list[Result] = []
    width = max(len(m.id) for m in mutants)
    for i, m in enumerate(mutants, 1):
        if m in stale:
            r = Result(m, "error", f"STALE: `old` not found exactly once in {m.path}", 0.0)
        else:
            r = run_mutant(scratch, m)
        results.append(r)
        print(f"[{i:2d}/{len(mutants)}] {m.id:<{width}}  {r.status:<8} {r.seconds:6.1f} s  "
              f"{r.detail}", flush=True)

    if not args.no_confirm:
        confirm_kills(scratch, results)

    report = table(results)
    total = time.time() - wall
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "error")}
    summary = (f"{len(results)} mutants: {counts['killed']} killed, {counts['survived']} "
               f"survived, {counts['error']} errors; {total / 60:.1f} min")
    print("\n" + report + "\n\n" + summary)
    for r in results:
        if r.status != "killed":
            print(f"  {r.status.upper()}: {r.mutant.id}: {r.detail}")
    if args.report:
        args.report.write_text(report + "\n\n" + summary + "\n")
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
