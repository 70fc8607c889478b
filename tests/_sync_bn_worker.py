"""One rank of tests/test_sync_bn.py's process group, and the cases both share.

Run as ``python tests/_sync_bn_worker.py RANK WORLD INIT_FILE OUT``: joins a
gloo group through ``INIT_FILE``, runs every case of :func:`op_cases` and
:func:`block_cases` on its share of the batch, synchronised over the group,
and saves what it got to ``OUT``. The test runs the same cases in one process
on the whole batch and compares.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

import resfuse_kernels as rk
from resfuse_kernels import backends

ACTIVATIONS = {"tail": ("u", "h"), "tail_carry": ("u", "h", "x"), "highway": ("a", "b", "x")}
BNS = {"tail": ("d",), "tail_carry": ("d", "k"), "highway": ("h", "t")}


def op_cases() -> list[dict]:
    """Every (backend, op, batch split, layout, spatial size) the contract covers."""
    backends_ = [b for b in ("torch", "cpu") if backends.unavailable_reason(b, "cpu") is None]
    splits = [((3, 3), (3, 5), "nchw"), ((4, 1), (3, 5), "nchw"), ((5, 0), (3, 5), "nchw"),
              ((1, 2), (1, 1), "nchw"), ((2, 3), (2, 3), "channels_last")]
    cases = [dict(backend=b, op=op, split=split, hw=hw, layout=layout, seed=seed)
             for b in backends_ for op in ACTIVATIONS
             for seed, (split, hw, layout) in enumerate(splits)]
    # interpreted (TRITON_INTERPRET=1, which conftest sets without a GPU and the
    # ranks inherit, so both sides list the same cases): one tiny case an op
    if backends.unavailable_reason("triton", "cpu") is None:
        cases += [dict(backend="triton", op=op, split=(2, 1), hw=(2, 3), layout="nchw", seed=9)
                  for op in ("tail_carry", "highway")]
    return cases


def op_inputs(case: dict) -> dict:
    """The whole batch's inputs of ``case`` in float64, the same on every rank:
    activations, each BatchNorm's own parameters, eps and momentum, the carry
    weight, and the cotangent of y."""
    g = torch.Generator().manual_seed(1000 + case["seed"])
    n, (hh, ww), c, cx = sum(case["split"]), case["hw"], 3, 5

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    acts = {}
    for name in ACTIVATIONS[case["op"]]:
        channels = cx if (case["op"] == "tail_carry" and name == "x") else c
        acts[name] = r(n, channels, hh, ww, scale=1.5, shift=0.3)
    bns = {}
    for i, b in enumerate(BNS[case["op"]]):
        bns[b] = dict(weight=r(c, scale=0.3, shift=1.0), bias=r(c, scale=0.5),
                      running_mean=r(c, scale=0.2), running_var=r(c).abs() + 0.5,
                      eps=1e-5 * (1 + 3 * i), momentum=0.1 + 0.15 * i)
    carry_w = r(c, cx, scale=0.5) if case["op"] == "tail_carry" else None
    return dict(acts=acts, bns=bns, w=carry_w, cotangent=r(n, c, hh, ww))


def run_op(case: dict, inputs: dict, rows: slice, group) -> dict:
    """Forward (train), backward, then an eval forward, on ``rows`` of the
    batch; returns y, every gradient (activations: this rank's rows;
    parameters: this rank's part) and the running statistics."""
    layout = (torch.channels_last if case["layout"] == "channels_last"
              else torch.contiguous_format)
    acts = {k: v[rows].clone().contiguous(memory_format=layout).requires_grad_()
            for k, v in inputs["acts"].items()}
    bns = {b: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in p.items()}
           for b, p in inputs["bns"].items()}
    params = {f"{k}_{b}": bns[b][k].requires_grad_() for b in bns for k in ("weight", "bias")}
    w = inputs["w"].clone().requires_grad_() if inputs["w"] is not None else None
    if w is not None:
        params["w"] = w

    def call(training: bool) -> Tensor:
        kw = {f"{k}_{b}": bns[b][k] for b in bns for k in ("eps", "momentum")}
        bn_args = [bns[b][k] for b in bns
                   for k in ("weight", "bias", "running_mean", "running_var")]
        if case["op"] == "highway":
            return rk.ops.highway_gate(acts["a"], acts["b"], acts["x"], *bn_args,
                                       training=training, process_group=group, **kw)
        carry = [acts["x"], w, *bn_args[4:]] if case["op"] == "tail_carry" else []
        return rk.ops.resfuse_tail(acts["u"], acts["h"], *bn_args[:4], *carry,
                                   training=training, process_group=group, **kw)

    with backends.use(case["backend"]):
        y = call(True)
        (y * inputs["cotangent"][rows]).sum().backward()
        with torch.no_grad():
            y_eval = call(False)
    return dict(y=y.detach(), y_eval=y_eval,
                grads={k: v.grad for k, v in {**acts, **params}.items()},
                running={f"{k}_{b}": bns[b][k] for b in bns
                         for k in ("running_mean", "running_var")})


def block_cases() -> list[dict]:
    """Fused and reference blocks with synchronised BatchNorm, uneven ranks."""
    return [dict(block=block, fused=fused, split=(3, 2), seed=7)
            for block in ("resfuse", "highway") for fused in (False, True)]


def block_inputs(case: dict) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 block with non-trivial BatchNorms (every one its own), the
    whole batch's input and the cotangent of the output."""
    torch.manual_seed(case["seed"])
    c = 3
    block = (rk.nn.ResFuseBlock(c) if case["block"] == "resfuse"
             else rk.nn.HighwayBlock(c)).double()
    with torch.no_grad():
        for i, m in enumerate(m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            m.weight.uniform_(0.6, 1.4)
            m.bias.uniform_(-0.4, 0.4)
            m.running_var.uniform_(0.5, 1.5)
            m.eps, m.momentum = 1e-5 * (i + 1), (0.1 + 0.05 * i) if i % 3 else None
    n = sum(case["split"])
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, c, 4, 5, generator=g, dtype=torch.float64)
    return block, x, torch.randn(n, c, 4, 5, generator=g, dtype=torch.float64)


def run_block(block: nn.Module, x: Tensor, cotangent: Tensor, steps: int = 2) -> dict:
    """``steps`` training steps' outputs and gradients (zeroed between), then
    the buffers."""
    out = {}
    for step in range(steps):
        block.zero_grad()
        x_ = x.clone().requires_grad_()
        y = block(x_)
        (y * cotangent).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x_.grad
        out.update({f"{step}.{k}": p.grad.clone() for k, p in block.named_parameters()})
    out.update({f"buffer.{k}": v.clone() for k, v in block.state_dict().items()})
    return out


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    solo = [dist.new_group([r]) for r in range(world)][rank]  # every rank makes every group
    results = {"ops": [], "blocks": [], "solo": []}
    for case in op_cases():
        start = sum(case["split"][:rank])
        rows = slice(start, start + case["split"][rank])
        results["ops"].append(run_op(case, op_inputs(case), rows, group))
    for case in block_cases():
        block, x, cotangent = block_inputs(case)
        block = rk.convert(block, fused=case["fused"], sync_batchnorm=True, process_group=group)
        start = sum(case["split"][:rank])
        rows = slice(start, start + case["split"][rank])
        results["blocks"].append(run_block(block, x[rows], cotangent[rows]))
    for case in op_cases()[:3]:  # a group of one rank: the per-process path, bit for bit
        inputs = op_inputs(case)
        results["solo"].append([run_op(case, inputs, slice(None), g) for g in (solo, None)])
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
