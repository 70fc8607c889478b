"""Every configuration of every autotuned Triton kernel, against the float64 oracle.

By default only one configuration per layout runs under test (the
interpreter's one small tile; ``RESFUSE_TRITON_AUTOTUNE=0`` on a GPU), yet
production tuning can pick any of each list. Here
:func:`resfuse_kernels.triton._launch.forced_config` launches each in turn,
on sizes that give those block sizes at least two tiles, the last one
ragged, along both pixels and channels (and the carry's input channels),
and each launch is checked to have run with the forced block sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the triton backend is untested")

# the skips (no GPU, no interpreter) and the helpers of the backend's own tests
from test_triton_kernels import _highway, _highway_case, _tail, _tail_case, tk  # noqa: E402

L = tk._launch
BLOCKS = ("BLOCK_S", "BLOCK_C", "BLOCK_X")


def _name(tuner) -> str:
    fn = tuner.fn.fn
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


TUNERS = {_name(r.tuner): r for r in L.TUNED.values()}  # name -> Remembered

# The autotuned kernels each case launches (eval runs no statistics pass).
_STATS = {"_launch._stats_kernel"}
_GATE = {"highway_gate._forward_kernel", "highway_gate._backward_reduce_kernel",
         "highway_gate._backward_apply_kernel"}
_TAIL = {"resfuse_tail._forward_kernel", "resfuse_tail._backward_reduce_kernel",
         "resfuse_tail._backward_apply_kernel"}
KERNELS = {
    ("gate", False, True): _STATS | _GATE,
    ("gate", False, False): _GATE,
    ("tail", False, True): _STATS | _TAIL,
    ("tail", False, False): _TAIL,
    ("tail", True, True): _STATS | _TAIL | {"resfuse_tail._carry_stats_kernel"},
    ("tail", True, False): _TAIL,
}


def _forced(name: str, channels_last: bool, index: int) -> dict:
    """The block sizes ``forced_config(index)`` gives kernel ``name``."""
    configs = TUNERS[name].configs_by_layout[int(channels_last)]
    return {k: v for k, v in configs[index % len(configs)].kwargs.items() if k in BLOCKS}


def _ragged(blocks: set[int], square: bool) -> int:
    """The least size above 5/4 of the largest block (a square when ``square``)
    that no block divides: at least two tiles, the last one part full."""
    least = max(blocks) * 5 // 4 + 1
    for n in range(1, 4 * least):
        size = n * n if square else n
        if size >= least and all(size % b for b in blocks):
            return n
    raise AssertionError(blocks)


@pytest.fixture
def launches(monkeypatch):
    """(kernel, block sizes) of every autotuned launch, as the kernel's grid sees them."""
    seen = []
    for name, remembered in TUNERS.items():
        kernel = remembered.tuner.fn
        run = kernel.run

        def recording(*args, grid, name=name, run=run, **kwargs):
            def traced(meta):
                seen.append((name, {k: meta[k] for k in BLOCKS if k in meta}))
                return grid(meta)
            return run(*args, grid=traced, **kwargs)

        monkeypatch.setattr(kernel, "run", recording)
    return seen


def test_cases_cover_every_autotuned_kernel():
    assert set().union(*KERNELS.values()) == set(TUNERS)


@pytest.mark.parametrize("index", range(L.num_configs()))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op,carry", [("gate", False), ("tail", False), ("tail", True)],
                         ids=["gate", "tail", "tail_carry"])
def test_forced_config(monkeypatch, launches, op, carry, training, channels_last, index):
    # two reduction programs under the interpreter: each walks one image, a
    # full tile and then the ragged one (after the full one, a lane the
    # ragged tile masks has a running count, so a missing mask shows)
    monkeypatch.setattr(L, "INTERPRET_CHUNKS", 2)
    names = KERNELS[op, carry, training]
    blocks = {name: _forced(name, channels_last, index) for name in names}
    h = _ragged({b["BLOCK_S"] for b in blocks.values()}, square=True)  # H = W
    c = _ragged({b["BLOCK_C"] for b in blocks.values()}, square=False)
    dtype = torch.float32
    with L.forced_config(index):
        if op == "gate":
            _highway(_highway_case(2, c, h, dtype, channels_last, training), dtype)
        else:
            cx = _ragged({b["BLOCK_X"] for b in blocks.values() if "BLOCK_X" in b},
                         square=False)
            _tail(_tail_case(2, c, h, dtype, channels_last, training, carry, cx=cx), dtype)
    assert {name for name, _ in launches} == names
    for name, seen in launches:
        assert seen == blocks[name], (name, seen, blocks[name])


def _unforced(name: str, channels_last: bool) -> dict | None:
    """The block sizes of an unforced launch where only one configuration is
    tried (the interpreter's one tile, or RESFUSE_TRITON_AUTOTUNE=0); None
    where tuning picks."""
    remembered = TUNERS[name]
    if len(remembered.tuner.configs) == 1:
        config = remembered.tuner.configs[0]
    elif not L.AUTOTUNE:
        config = remembered.configs_by_layout[int(channels_last)][0]
    else:
        return None
    return {k: v for k, v in config.kwargs.items() if k in BLOCKS}


def test_forced_choice_does_not_outlive_its_block(launches):
    """A forced launch neither reads nor writes the remembered choices: a
    key launched first forced, then unforced, then forced again, in turn."""
    args = _highway_case(2, 7, 3, torch.float32, False, False)  # 7 channels: a fresh key
    name = "highway_gate._forward_kernel"
    last = L.num_configs() - 1

    def blocks_of_one_run():
        launches.clear()
        tk.highway_gate_forward(*args)
        return [b for n, b in launches if n == name]

    with L.forced_config(last):
        assert blocks_of_one_run() == [_forced(name, False, last)]
    blocks_of_one_run()  # tuned (a GPU's tuning launches every configuration)
    settled = blocks_of_one_run()
    unforced = _unforced(name, False)
    assert len(settled) == 1 and (unforced is None or settled == [unforced]), settled
    for index in range(L.num_configs()):
        with L.forced_config(index):
            assert blocks_of_one_run() == [_forced(name, False, index)]
        assert blocks_of_one_run() == settled
