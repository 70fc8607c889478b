"""Launch machinery shared by the Triton kernels: layouts, configs, statistics.

Layouts. Every 4-D activation is addressed as ``(N, C, S)`` with ``S = H*W``
through its real strides ``(sn, sc, ss)``: NCHW gives ``(C*S, S, 1)``,
channels_last ``(S*C, 1, C)``; both are read in place. Triton specialises a
stride equal to 1, so the unit-stride axis is known at compile time and the
loads are coalesced along it. A tensor whose H and W cannot be merged into
one strided axis (a non-dense view, e.g. a spatial slice) is copied with
``.contiguous()`` first; that is the only copy made.

Tiles. Pointwise kernels run a grid ``(N * cdiv(S, BLOCK_S), cdiv(C, BLOCK_C))``
of ``[BLOCK_S, BLOCK_C]`` tiles inside one image. Reduction kernels run a
grid ``(chunks, cdiv(C, BLOCK_C))``: program ``(i, j)`` walks the i-th
``1/chunks`` of the image-major tile sequence for channel block j and
writes one row of per-chunk partials; ``chunks`` does not depend on the
autotuned block sizes, so partial buffers are sized before tuning. A
reduction program accumulates in tiles of registers, one running value
per element slot of the tile, and reduces across the tile's rows once, at
the end: the loop over tiles only loads and does arithmetic (no shuffles
or barriers per tile). Offsets are int64.

Statistics. Each register slot keeps a Welford (mean, M2) of the values
it sees; at the end of the program the slots are merged down the tile
(count-weighted mean, then M2 plus the count-weighted squared deviations
from it), and the per-chunk triples the same way by
:func:`_stats_finalize`. Nothing subtracts two large sums, so the variance
is accurate at large means and never negative.

Arithmetic is in the compute dtype ``CT`` (a constexpr): float32, or
float64 for float64 storage; loads upcast to it, stores cast back.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..ops._common import STATS_DTYPE, compute_dtype, empty_output, memory_format

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``: on real tensors (the first argument
    a plain tensor) directly, an autotuned kernel with the configuration
    chosen for its key (:class:`Remembered`); on the fake or functional
    tensors of torch.compile's tracing (inside a ``triton_op``) through
    :func:`torch.library.wrap_triton`, which Inductor traces."""
    if not INTERPRET and type(args[0]) is not torch.Tensor:
        return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    if kernel in TUNED:
        return TUNED[kernel].run(grid, args, kwargs)
    return kernel[grid](*args, **kwargs)

# ---------------------------------------------------------------------------
# configurations


# RESFUSE_TRITON_AUTOTUNE=0: one configuration per layout, no benchmarking
# (test runs on a GPU, where tuning every odd channel count would cost minutes).
AUTOTUNE = os.environ.get("RESFUSE_TRITON_AUTOTUNE", "1") != "0"


def _configs(tiles: list[tuple], names: tuple[str, ...], num_stages: int) -> list:
    """``triton.Config`` for each (block sizes..., num_warps) tuple."""
    return [triton.Config(dict(zip(names, t[:-1])), num_warps=t[-1], num_stages=num_stages)
            for t in tiles]


def autotune(nchw: list[tuple], channels_last: list[tuple], names: tuple[str, ...], key,
             num_stages: int = 3):
    """``triton.autotune`` over the configurations of the call's layout only
    (launched eagerly through :class:`Remembered` once a key is tuned).

    ``nchw`` / ``channels_last``: (block sizes..., num_warps) tuples, best
    guess first; a kernel's ``LAYOUT`` argument (:func:`layout_flag`) picks
    the list, so tall tiles (unit stride along pixels) are tried for NCHW
    and wide ones (unit stride along channels) for channels_last: half the
    compilations of one mixed list. With ``RESFUSE_TRITON_AUTOTUNE=0`` only
    the first of each list is used; under the interpreter one small tile
    (BLOCK_S 16, the other sizes 32). ``num_stages``: software pipelining
    depth of a ``tl.dot`` loop (it stages the loop's loads in shared memory).
    The full lists stay reachable, whatever runs by default, for
    :func:`forced_config` (its :class:`Remembered`'s ``configs_by_layout``).
    """
    full = (_configs(nchw, names, num_stages), _configs(channels_last, names, num_stages))
    by_layout = full if AUTOTUNE else (full[0][:1], full[1][:1])

    def prune(configs, named_args, **kwargs):
        return by_layout[1] if named_args["LAYOUT"] else by_layout[0]

    def decorate(fn):
        if INTERPRET:  # one small tile: the tests' tensors are small, numpy pays per element
            tile = _configs([(16,) + (32,) * (len(names) - 1) + (4,)], names, num_stages)
            tuner = triton.autotune(configs=tile, key=key)(fn)
        else:
            tuner = triton.autotune(configs=by_layout[0] + by_layout[1], key=key,
                                    prune_configs_by={"early_config_prune": prune})(fn)
        TUNED[tuner] = Remembered(tuner, key, full, AUTOTUNE and not INTERPRET)
        return tuner

    return decorate


# forced_config's index (None: tune as usual), read by Remembered.
_FORCED: int | None = None


@contextlib.contextmanager
def forced_config(index: int):
    """Within the block, every eager launch of an autotuned kernel skips
    tuning (and the remembered choices) and uses configuration ``index`` of
    its layout's list (``configs_by_layout``; NCHW or channels_last by the
    ``LAYOUT`` argument), taken modulo that list's length: one loop up to
    the longest list (:func:`num_configs`) runs every configuration of every
    list. For tests: under the interpreter and with
    ``RESFUSE_TRITON_AUTOTUNE=0`` only one configuration runs otherwise, yet
    production tuning can pick any. (torch.compile's traced launches are
    Inductor's, not affected.)"""
    global _FORCED
    previous, _FORCED = _FORCED, int(index)
    try:
        yield
    finally:
        _FORCED = previous


class Remembered:
    """The eager launches of autotuned kernel ``tuner`` (Triton's
    ``Autotuner``, left as it is, so that torch.compile's ``wrap_triton``
    sees its configurations): a new key goes through the tuner (tuning,
    pruning) and its ``best_config`` is kept; a known key launches the
    kernel with it directly.

    The key is the ``key`` arguments, which every launch passes by position,
    and the first argument's dtype: ``Autotuner.run`` rebuilds its key on
    every launch from a dict of all ~40-50 arguments, a third to a half of a
    launch's host time before the driver call (``bench/triton_sm90.py
    --dispatch``).

    Under :func:`forced_config` a launch neither reads nor writes
    ``chosen``: no forced choice outlives the block, and no remembered one
    overrides it."""

    def __init__(self, tuner, key: list[str], configs_by_layout: tuple[list, list],
                 benchmarks: bool = True):
        self.tuner, self.configs_by_layout = tuner, configs_by_layout
        self.benchmarks = benchmarks  # a new key runs every configuration (and synchronises)
        names = tuner.fn.arg_names
        self._key_at = [names.index(k) for k in key]
        self._layout_at = names.index("LAYOUT")
        self.chosen: dict[tuple, dict] = {}

    def run(self, grid, args, kwargs):
        kernel = self.tuner.fn
        if _FORCED is not None:  # the only check the normal path pays
            configs = self.configs_by_layout[1 if args[self._layout_at] else 0]
            return kernel[grid](*args, **kwargs, **configs[_FORCED % len(configs)].all_kwargs())
        key = (*[args[i] for i in self._key_at], args[0].dtype)
        config = self.chosen.get(key)
        if config is None:
            if self.benchmarks and _capturing(args[0]):
                raise RuntimeError(
                    f"resfuse: {self.tuner.fn.__name__} meets a new shape or dtype {key} during "
                    "CUDA graph capture, and autotuning it would benchmark (and synchronise) "
                    "inside the capture; run the step eagerly once before capturing "
                    "(resfuse_kernels.graphs.GraphedStep warms up for you)")
            out = self.tuner[grid](*args, **kwargs)
            self.chosen[key] = self.tuner.best_config.all_kwargs()
            return out
        return kernel[grid](*args, **kwargs, **config)


# Every autotuned kernel's Remembered by its tuner, in definition order.
TUNED: dict = {}


def num_configs() -> int:
    """Length of the longest configuration list of any autotuned kernel."""
    return max(len(c) for r in TUNED.values() for c in r.configs_by_layout)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s CUDA stream is being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# [BLOCK_S, BLOCK_C] tiles of the pointwise and reduction kernels.
TILE = ("BLOCK_S", "BLOCK_C")
TILE_NCHW = [(128, 8, 4), (256, 8, 8), (64, 16, 4), (512, 4, 8)]
TILE_CL = [(16, 128, 4), (32, 64, 4), (8, 256, 8), (32, 128, 8)]

# [BLOCK_S, BLOCK_C] tiles of the ResFuse tail with BLOCK_X input channels per
# step of the carry's tl.dot: all >= 16, as tl.dot needs. Chosen with
# bench/triton_sm90.py: none spills registers on sm_90 in bf16 (the 4-warp
# 64x64 and 128x32 tiles, and any 128x64 one, spill 100-800 bytes in the
# carry's backward reduction); 8 warps first, as they halve each thread's
# share of the tile.
TAIL = ("BLOCK_S", "BLOCK_C", "BLOCK_X")
TAIL_NCHW = [(128, 32, 32, 8), (64, 64, 32, 8), (256, 16, 32, 8), (64, 32, 32, 4)]
TAIL_CL = [(64, 64, 32, 8), (128, 32, 32, 8), (64, 32, 32, 4), (32, 64, 32, 4)]
# The carry's tl.dot loop runs CX / BLOCK_X steps (2 at 64 channels):
# pipelining it only holds 2-5x the shared memory and more registers.
TAIL_STAGES = 1


def compute_type(dtype: torch.dtype):
    """The tl dtype of in-kernel arithmetic for storage ``dtype``."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


# Reduction programs under the interpreter: few, as each costs a Python run of
# the kernel body (a test raises it to cover _stats_finalize's loop).
INTERPRET_CHUNKS = 4


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_chunks(t: torch.Tensor) -> int:
    """How many programs split the pixel axis of a reduction over activation
    ``t``: 4 per multiprocessor, so that enough loads are in flight (each
    program walks its tiles one after another), at most one per tile of the
    smallest tile height any configuration uses (16 pixels)."""
    device = t.device
    if INTERPRET or device.type != "cuda":
        target = INTERPRET_CHUNKS
    else:
        target = 4 * _multiprocessors(device.index if device.index is not None
                                      else torch.cuda.current_device())
    n, _, h, w = t.shape
    return max(1, min(target, n * cdiv(h * w, 16)))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: ``triton.cdiv`` is a jit function in newer
    Triton releases, ~10 us a host call through its dispatcher."""
    return -(-a // b)


# ---------------------------------------------------------------------------
# layouts


def view3(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(t', (sn, sc, ss))``: ``t'`` is ``t`` (or a dense copy when H and W do
    not merge into one strided axis) and its strides as an (N, C, H*W) tensor."""
    _, _, height, width = t.shape
    sn, sc, sh, sw = t.stride()
    if height == 1 or sh == sw * width:
        return t, (sn, sc, sw)
    if width == 1:
        return t, (sn, sc, sh)
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def layout_flag(strides: tuple[int, int, int]) -> int:
    """1 when channels are the unit-stride axis (channels_last), else 0."""
    return int(strides[1] == 1 and strides[2] != 1)


def bn_params(*params: torch.Tensor) -> list[torch.Tensor]:
    """``params``, BatchNorms' (mean, var, weight, bias), as dense vectors,
    each in its own dtype: the kernels load them in the compute dtype
    (:func:`channel_vector`) and form ``rstd`` themselves
    (:func:`rstd_vector`), with eps a constexpr: no torch ops per BatchNorm
    on the host."""
    return [p.contiguous() for p in params]


def scratch(like: torch.Tensor) -> torch.Tensor:
    """A one-element stand-in for a pointer argument a kernel never touches.
    Never another argument: torch.compile clones each output of a traced
    kernel, so an aliased output would be written in one clone only."""
    return torch.empty(1, dtype=like.dtype, device=like.device)


def in_output_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of :func:`empty_output` (``like``):
    ``t`` itself when they match, else a copy (the fake implementations
    promise those strides, size-1 dimensions included)."""
    out = torch.empty(like.shape, device="meta", memory_format=memory_format(like))
    return t if t.stride() == out.stride() else empty_output(like, t.dtype).copy_(t)


def grid_tiles(n: int, c: int, s: int):
    """Grid of the pointwise kernels."""
    return lambda meta: (n * cdiv(s, meta["BLOCK_S"]), cdiv(c, meta["BLOCK_C"]))


# ---------------------------------------------------------------------------
# in-kernel helpers


@triton.jit
def tile_coords(t, S, BLOCK_S: tl.constexpr):
    """(n, s, s_mask) of tile ``t`` in image-major order (n int64)."""
    nsb = tl.cdiv(S, BLOCK_S)
    n = t // nsb
    s = (t - n * nsb) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n.to(tl.int64), s, s < S


@triton.jit
def channel_block(C, BLOCK_C: tl.constexpr):
    """(c, c_mask): this program's block of channels (grid axis 1)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def chunk_tile(t, S, cmask, BLOCK_S: tl.constexpr):
    """(n, s, s_mask, mask) of tile ``t`` of a reduction program's walk."""
    n, s, smask = tile_coords(t, S, BLOCK_S)
    return n, s, smask, smask[:, None] & cmask[None, :]


@triton.jit
def pointwise_tile(S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n, s, s_mask, c, c_mask, mask) of this pointwise program's tile."""
    c, cmask = channel_block(C, BLOCK_C)
    n, s, smask, mask = chunk_tile(tl.program_id(0), S, cmask, BLOCK_S)
    return n, s, smask, c, cmask, mask


@triton.jit
def offsets(n, s, c, sn, sc, ss):
    """int64 offsets of the [len(s), len(c)] tile of image n."""
    return n * sn + s.to(tl.int64)[:, None] * ss + c.to(tl.int64)[None, :] * sc


if INTERPRET:
    @triton.jit
    def to_storage(v, ptr):
        """``v`` (compute dtype) in ``ptr``'s element type, rounded to nearest even.

        The interpreter truncates float32 -> bfloat16 (a GPU rounds to
        nearest even), which biases every stored value by half an ulp: round
        the float32 bits (adding 0x7FFF plus the lowest kept bit) and take
        the top 16 as the bfloat16's own bits. (Handing the rounded float32
        back to the interpreter's conversion instead made 0 the subnormal
        1.2e-38.) NaN is converted as it is: the carry could make it Inf.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(v != v, v.to(tl.bfloat16), rounded)
        return v.to(ptr.dtype.element_ty)
else:
    @triton.jit
    def to_storage(v, ptr):  # rounds to nearest even on a GPU
        return v.to(ptr.dtype.element_ty)


@triton.jit
def channel_vector(ptr, c, mask, CT: tl.constexpr):
    return tl.load(ptr + c, mask=mask, other=0.0).to(CT)


@triton.jit
def rstd_vector(var_ptr, c, mask, EPS: tl.constexpr, CT: tl.constexpr):
    """``1 / sqrt(var + eps)`` of channels ``c``, correctly rounded.

    ``eps`` is a constexpr made a ``CT`` constant by ``tl.full``, so float64
    keeps all its digits: as a plain float argument Triton would pass it as
    float32 and Inductor type it float64. (One compilation per eps value;
    models use one.) float32 takes the IEEE ``sqrt_rn``/``div_rn``, not the
    approximate defaults; float64 arithmetic is IEEE anyway."""
    var = channel_vector(var_ptr, c, mask, CT)
    x = var + tl.full(var.shape, EPS, CT)
    if CT == tl.float64:
        return 1.0 / tl.sqrt(x)
    return tl.div_rn(tl.full(var.shape, 1.0, CT), tl.sqrt_rn(x))


@triton.jit
def bn_vectors(mean_ptr, var_ptr, weight_ptr, bias_ptr, c, mask, EPS: tl.constexpr,
               CT: tl.constexpr):
    """(mean, rstd, weight, bias) of one BatchNorm for channels ``c``, in ``CT``.

    Kernels load these once per program, before any loop over tiles: a load
    inside the loop is repeated every tile, and so is its move into the
    tile's register layout (through shared memory, two barriers each)."""
    return (channel_vector(mean_ptr, c, mask, CT), rstd_vector(var_ptr, c, mask, EPS, CT),
            channel_vector(weight_ptr, c, mask, CT), channel_vector(bias_ptr, c, mask, CT))


@triton.jit
def chunk_range(N, S, BLOCK_S: tl.constexpr):
    """[t0, t1): the tiles of this reduction program (axis 0 = chunk)."""
    tiles = N * tl.cdiv(S, BLOCK_S)
    per = tl.cdiv(tiles, tl.num_programs(0))
    t0 = tl.program_id(0) * per
    return t0, tl.minimum(t0 + per, tiles)


@triton.jit
def twelve_bits(v):
    """``v`` (float32 or float64) to 12 significant bits, in its dtype (the
    float32 rounded half-way up, its low 12 bits dropped): a shift ``z0``
    so rounded makes ``z - z0`` exact for every |z| < 2^12 |z0|. With all
    24 bits, ``z - z0`` rounds z0's low bits away alike for every z of a
    binade: a bias in every shifted sum. The cpu backend rounds its shifts
    the same way (channel_shift, csrc/cpu/kernels.h)."""
    bits = (v.to(tl.float32).to(tl.uint32, bitcast=True) + 0x800) & 0xFFFFF000
    return bits.to(tl.float32, bitcast=True).to(v.dtype)


@triton.jit
def shift_of(v, mask, count):
    """Per column of the sample ``v`` (``mask``: its ``count`` values a
    column): their mean to 12 bits (:func:`twelve_bits`) where its square
    exceeds their variance (a mean far from 0), else 0 (a centred channel
    keeps its own digits); 0 where the mean is not finite."""
    mean = tl.sum(v, axis=0) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    far = mean * mean > tl.sum(d * d, axis=0) / count
    return tl.where(far & (mean - mean == 0.0), twelve_bits(mean), 0.0)


@triton.jit
def sample_shift(ptr, c, cmask, S, sc, ss, CT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel ``c``: the shift (:func:`shift_of`) of image 0's first
    BLOCK_S pixels. Every program of a launch loads the same sample, so all
    shift alike."""
    p = tl.arange(0, BLOCK_S)
    mask = (p < S)[:, None] & cmask[None, :]
    v = tl.load(ptr + p.to(tl.int64)[:, None] * ss + c.to(tl.int64)[None, :] * sc, mask=mask,
                other=0.0).to(CT)
    return shift_of(v, mask, tl.minimum(S, BLOCK_S) * 1.0)


@triton.jit
def slot_welford(mean, m2, v, rows, inv_count):
    """Welford's update of running (mean, M2) tiles, one per register slot
    (the module docstring says why), with the tile ``v``. Rows where ``rows``
    is false (pixels past the image) are left as they were; ``inv_count`` is
    1 / each row's count after this tile."""
    d = tl.where(rows[:, None], v - mean, 0.0)
    mean = mean + d * inv_count[:, None]
    return mean, m2 + d * (v - mean)


@triton.jit
def merge_slots(count, mean, m2, mean_ptr, m2_ptr, c, cmask):
    """Per-column (mean, M2) from per-slot running tiles with ``count`` per
    row, merged as the module docstring says (what Chan's pairwise merge sums
    to; plain sums, where a ``tl.reduce`` with a merge function would run
    element by element in the interpreter), stored at ``mean_ptr + c`` and
    ``m2_ptr + c``; returns the column's count."""
    w = tl.broadcast_to(count[:, None], mean.shape)
    total = tl.sum(w, axis=0)
    mu = tl.sum(w * mean, axis=0) / tl.maximum(total, 1.0)
    d = mean - mu[None, :]
    tl.store(mean_ptr + c, mu, mask=cmask)
    tl.store(m2_ptr + c, tl.sum(m2 + w * d * d, axis=0), mask=cmask)
    return total


# ---------------------------------------------------------------------------
# per-channel batch statistics of one or two activations


@autotune(TILE_NCHW, TILE_CL, TILE, key=["C", "LAYOUT"])
@triton.jit
def _stats_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, y_ptr, shift_ptr,
                  N, C, S, sxn, sxc, sxs, syn, syc, sys_, LAYOUT,
                  TWO: tl.constexpr, CT: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    c, cmask = channel_block(C, BLOCK_C)
    t0, t1 = chunk_range(N, S, BLOCK_S)
    # Welford runs on z - z0 (sample_shift), and the partials stay shifted
    # until _stats_finalize adds z0 (shift_ptr) to the mean: at a large mean
    # float32 means of z itself round at ulp(mean) (the variance erred 30x
    # PyTorch's at a mean of 1000).
    x0 = sample_shift(x_ptr, c, cmask, S, sxc, sxs, CT, BLOCK_S)
    y0 = x0
    if TWO:
        y0 = sample_shift(y_ptr, c, cmask, S, syc, sys_, CT, BLOCK_S)
    count = tl.zeros([BLOCK_S], CT)
    zero = tl.zeros([BLOCK_S, BLOCK_C], CT)
    mx, qx, my, qy = zero, zero, zero, zero
    for t in range(t0, t1):
        n64, s, rows, mask = chunk_tile(t, S, cmask, BLOCK_S)
        count += rows.to(CT)
        inv = 1.0 / tl.maximum(count, 1.0)
        v = tl.load(x_ptr + offsets(n64, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(CT)
        mx, qx = slot_welford(mx, qx, v - x0[None, :], rows, inv)
        if TWO:
            v = tl.load(y_ptr + offsets(n64, s, c, syn, syc, sys_), mask=mask, other=0.0).to(CT)
            my, qy = slot_welford(my, qy, v - y0[None, :], rows, inv)
    chunk = tl.program_id(0)
    row = chunk.to(tl.int64) * (2 * C if TWO else C)
    total = merge_slots(count, mx, qx, mean_ptr + row, m2_ptr + row, c, cmask)
    tl.store(cnt_ptr + chunk + c * 0, total, mask=c == 0)
    first_chunk = (c * 0 + chunk) == 0
    tl.store(shift_ptr + c, x0, mask=cmask & first_chunk)
    if TWO:
        merge_slots(count, my, qy, mean_ptr + row + C, m2_ptr + row + C, c, cmask)
        tl.store(shift_ptr + C + c, y0, mask=cmask & first_chunk)


@triton.jit
def _row_tile(p0, P, W, c, mask, BLOCK_P: tl.constexpr):
    """(p, offsets, tile mask) of rows p0 .. p0 + BLOCK_P - 1 of a (P, W)
    matrix of per-chunk partials, columns ``c`` (``mask``): read a tile of
    rows at a time, as a loop over single rows would wait out one memory
    latency per chunk."""
    p = p0 + tl.arange(0, BLOCK_P)
    return p, p.to(tl.int64)[:, None] * W + c[None, :], (p < P)[:, None] & mask[None, :]


@triton.jit
def _stats_finalize(cnt_ptr, mean_ptr, m2_ptr, shift_ptr, mean_x_ptr, var_x_ptr, mean_y_ptr,
                    var_y_ptr, P, W, C, SHIFTED: tl.constexpr, CT: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merge P per-chunk (count, mean, M2) rows of width W into (mean, biased var);
    columns [0, C) go to the x outputs, [C, W) to the y outputs. With
    ``SHIFTED`` the partial means are of values less the column's shift
    (``shift_ptr``), added back to the mean at the end."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < W
    total = tl.zeros([BLOCK], CT)
    weighted = tl.zeros([BLOCK], CT)
    for p0 in range(0, P, BLOCK_P):
        p, offs, tile = _row_tile(p0, P, W, c, mask, BLOCK_P)
        cnt = tl.load(cnt_ptr + p, mask=p < P, other=0.0).to(CT)
        m = tl.load(mean_ptr + offs, mask=tile, other=0.0).to(CT)
        total += tl.sum(cnt, axis=0)
        weighted += tl.sum(cnt[:, None] * m, axis=0)
    mean = weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros([BLOCK], CT)
    for p0 in range(0, P, BLOCK_P):
        p, offs, tile = _row_tile(p0, P, W, c, mask, BLOCK_P)
        cnt = tl.load(cnt_ptr + p, mask=p < P, other=0.0).to(CT)
        d = tl.load(mean_ptr + offs, mask=tile, other=0.0).to(CT) - mean[None, :]
        q = tl.load(m2_ptr + offs, mask=tile, other=0.0).to(CT)
        m2 += tl.sum(tl.where(tile, q + cnt[:, None] * d * d, 0.0), axis=0)
    var = m2 / tl.maximum(total, 1.0)
    var = tl.where(var < 0.0, 0.0, var)  # never negative; NaN stays NaN
    if SHIFTED:  # in float64, rounded once: the shifted mean is small, the shift not
        shift = tl.load(shift_ptr + c, mask=mask, other=0.0).to(tl.float64)
        mean = (mean.to(tl.float64) + shift).to(CT)
    first = mask & (c < C)
    second = mask & (c >= C)
    tl.store(mean_x_ptr + c, mean, mask=first)
    tl.store(var_x_ptr + c, var, mask=first)
    tl.store(mean_y_ptr + (c - C), mean, mask=second)
    tl.store(var_y_ptr + (c - C), var, mask=second)


def chunk_stats(kernel, t: torch.Tensor, c: int, width: int, *args, shift=None,
                mean_dtype=STATS_DTYPE, **constexprs) -> list[torch.Tensor]:
    """One statistics pass over activation ``t``: ``kernel``, launched on
    ``(t, count, mean, M2, *args)`` with a program per chunk and block of the
    ``c`` channels, writes per-chunk partials of ``width`` columns, which
    :func:`_stats_finalize` merges. Returns ``[mean, var]`` per ``c``
    columns, mean in ``mean_dtype``, the biased var in STATS_DTYPE;
    ``shift``: the per-column shift of the partial means, if any."""
    chunks, cdt, ct = num_chunks(t), compute_dtype(t.dtype), compute_type(t.dtype)
    cnt = torch.empty(chunks, dtype=cdt, device=t.device)
    mean_p = torch.empty(chunks, width, dtype=cdt, device=t.device)
    m2_p = torch.empty_like(mean_p)
    launch(kernel, lambda meta: (chunks, cdiv(c, meta["BLOCK_C"])), t, cnt, mean_p, m2_p, *args,
           CT=ct, **constexprs)
    outs = [torch.empty(c, dtype=d, device=t.device)
            for d in (mean_dtype, STATS_DTYPE) * (width // c)]
    ys = [scratch(cnt), scratch(cnt)] if width == c else []  # never written: no y columns
    block = 64
    launch(_stats_finalize, (cdiv(width, block),), cnt, mean_p, m2_p,
           scratch(cnt) if shift is None else shift, *outs, *ys, chunks, width, c,
           SHIFTED=shift is not None, CT=ct, BLOCK=block, BLOCK_P=32)
    return outs


@triton.jit
def _group_sum(part_ptr, P, W, col, c, mask, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Column ``col + c`` of P rows of width W, summed in float64."""
    acc = tl.zeros([BLOCK], tl.float64)
    for p0 in range(0, P, BLOCK_P):
        _, offs, tile = _row_tile(p0, P, W, c, mask, BLOCK_P)
        acc += tl.sum(tl.load(part_ptr + col + offs, mask=tile, other=0.0).to(tl.float64), axis=0)
    return acc


@triton.jit
def _bn_grad(part_ptr, P, W, C, M, SG: tl.constexpr, SC: tl.constexpr,
             m_ptr, v_ptr, w_ptr, dw_ptr, db_ptr, coef_ptr, c, mask,
             EPS: tl.constexpr, TRAINING: tl.constexpr, CT: tl.constexpr,
             BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """One BatchNorm's gradients from its sums of g (group SG) and of
    g (z - mean) about the mean rounded to CT (group SC), all in float64:
    dbias = sum(g); dweight = rstd sum(g (z - mean)) about the float64 mean;
    and the input gradient's coefficients k1 = w rstd,
    k2 = -w rstd^2 sum(g z_hat) / M, k3 = -w rstd sum(g) / M (training only:
    eval's gradient is k1 g), stored in float64 at coef_ptr (3 rows of C):
    the cpu and cuda backends' form."""
    sg = _group_sum(part_ptr, P, W, SG * C, c, mask, BLOCK, BLOCK_P)
    sgc = _group_sum(part_ptr, P, W, SC * C, c, mask, BLOCK, BLOCK_P)
    m = tl.load(m_ptr + c, mask=mask, other=0.0).to(tl.float64)
    # the sums' mean was m rounded to CT; x - x == 0 only for finite x (an
    # infinite mean or sum(g) is left as it is: 0 * inf would make it NaN)
    lo = m - m.to(CT).to(tl.float64)
    sgc = tl.where((m - m == 0.0) & (sg - sg == 0.0), sgc - lo * sg, sgc)
    var = tl.load(v_ptr + c, mask=mask, other=1.0).to(tl.float64)
    r = 1.0 / tl.sqrt(var + tl.full(var.shape, EPS, tl.float64))
    wr = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float64) * r
    dweight = r * sgc
    tl.store(dw_ptr + c, to_storage(dweight, dw_ptr), mask=mask)
    tl.store(db_ptr + c, to_storage(sg, db_ptr), mask=mask)
    tl.store(coef_ptr + c, wr, mask=mask)
    if TRAINING:
        tl.store(coef_ptr + C + c, -wr * r * dweight / M, mask=mask)
        tl.store(coef_ptr + 2 * C + c, -wr * sg / M, mask=mask)


@triton.jit
def _bn_grad_finalize(part_ptr, coef_ptr, P, C, M, m0_ptr, v0_ptr, w0_ptr, m1_ptr, v1_ptr, w1_ptr,
                      dw0_ptr, db0_ptr, dw1_ptr, db1_ptr,
                      G: tl.constexpr, SG0: tl.constexpr, SC0: tl.constexpr,
                      SG1: tl.constexpr, SC1: tl.constexpr,
                      EPS0: tl.constexpr, EPS1: tl.constexpr, TRAINING: tl.constexpr,
                      CT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """:func:`_bn_grad` of one or two BatchNorms (SG1 < 0: one) from the P
    rows of G groups of C per-chunk partial sums."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    _bn_grad(part_ptr, P, G * C, C, M, SG0, SC0, m0_ptr, v0_ptr, w0_ptr, dw0_ptr, db0_ptr,
             coef_ptr, c, mask, EPS0, TRAINING, CT, BLOCK, BLOCK_P)
    if SG1 >= 0:
        _bn_grad(part_ptr, P, G * C, C, M, SG1, SC1, m1_ptr, v1_ptr, w1_ptr, dw1_ptr, db1_ptr,
                 coef_ptr + 3 * C, c, mask, EPS1, TRAINING, CT, BLOCK, BLOCK_P)


@triton.jit
def input_grad(coef_ptr, mean_ptr, c, cmask, C, g, z, TRAINING: tl.constexpr, CT: tl.constexpr):
    """A BatchNorm's input gradient k1 g + (k2 (z - mean) + k3) from the
    (float64) coefficients of :func:`bn_grads` (3 rows of C at coef_ptr) and
    the float64 mean: in training in float64 with two FMAs, rounded once to
    CT, as the cpu and cuda backends (over few values a channel the terms
    cancel to eps / (var + eps) of their size, and float32 terms made da err
    15x the composite's at two values); in eval k1 g. CT float64 keeps it
    unrounded (the carry's dv, whose products are float64)."""
    k1 = channel_vector(coef_ptr, c, cmask, tl.float64)[None, :]
    if TRAINING:
        k2 = channel_vector(coef_ptr + C, c, cmask, tl.float64)[None, :]
        k3 = channel_vector(coef_ptr + 2 * C, c, cmask, tl.float64)[None, :]
        m = channel_vector(mean_ptr, c, cmask, tl.float64)[None, :]
        centred = z.to(tl.float64) - m
        out = tl.fma(tl.broadcast_to(k1, g.shape), g.to(tl.float64),
                     tl.fma(tl.broadcast_to(k2, g.shape), centred, tl.broadcast_to(k3, g.shape)))
    else:
        out = k1 * g.to(tl.float64)
    return out.to(CT)


def bn_grads(kernel, t: torch.Tensor, groups: int, bns: list, training: bool, *args,
             **constexprs):
    """A backward reduction over activation ``t`` (C channels) and its
    finish: ``kernel``, launched on ``(t, part, *args)`` as in
    :func:`chunk_stats`, writes per-chunk partial sums, ``groups`` rows of C,
    into ``part``; each of ``bns`` (one or two) is ``(sum_g group, sum_gc
    group, eps, mean, var, weight, bias)``, its sums of g and of g (z - mean)
    about the mean rounded to the compute dtype. Returns each BatchNorm's
    dweight and dbias (in one list) and the ``(2, 3, C)`` coefficients (k1,
    k2, k3) of the input gradients ``k1 g + k2 (z - mean) + k3``, in float64,
    for the apply pass (:func:`input_grad`; torch ops per gradient would take
    a launch each)."""
    n, c, h, w = t.shape
    chunks, ct = num_chunks(t), compute_type(t.dtype)
    part = torch.empty(chunks, groups * c, dtype=torch.float64, device=t.device)
    launch(kernel, lambda meta: (chunks, cdiv(c, meta["BLOCK_C"])), t, part, *args, CT=ct,
           **constexprs)
    one = bns[0]
    coef = torch.empty(2, 3, c, dtype=torch.float64, device=t.device)
    affine = [torch.empty_like(p) for bn in bns for p in bn[5:]]
    # one BatchNorm: the second's outputs are never written (scratch, not aliases)
    two = bns[1] if len(bns) > 1 else (-1, -1, *one[2:])
    outs = affine if len(bns) > 1 else affine + [scratch(part), scratch(part)]
    block = 64
    launch(_bn_grad_finalize, (cdiv(c, block),), part, coef, chunks, c, n * h * w, *one[3:6],
           *two[3:6], *outs, G=groups, SG0=one[0], SC0=one[1], SG1=two[0], SC1=two[1],
           EPS0=float(one[2]), EPS1=float(two[2]), TRAINING=bool(training), CT=ct,
           BLOCK=block, BLOCK_P=32)
    return affine, coef


def batch_stats(x: torch.Tensor, sx, y: torch.Tensor | None = None, sy=None):
    """Per-channel (mean, biased var) of ``x`` (and of ``y``, same shape).

    ``x``/``y`` come from :func:`view3` with strides ``sx``/``sy``. Returns
    ``[mean_x, var_x]`` or ``[mean_x, var_x, mean_y, var_y]`` in STATS_DTYPE
    (computed in the compute dtype).
    """
    n, c, h, w = x.shape
    two = y is not None
    if x.numel() == 0:
        return [x.new_zeros(c, dtype=STATS_DTYPE) for _ in range(4 if two else 2)]
    width = 2 * c if two else c
    shift = torch.empty(width, dtype=compute_dtype(x.dtype), device=x.device)
    if y is None:
        y, sy = x, sx
    return chunk_stats(_stats_kernel, x, c, width, y, shift, n, c, h * w, *sx, *sy,
                       layout_flag(sx), shift=shift, TWO=two)
