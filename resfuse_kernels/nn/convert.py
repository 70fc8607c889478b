"""Fuse the residual tails of any model, and give its original forwards back.

:func:`convert` walks a model's modules. The package's own blocks
(:class:`FusableBlock`) are switched with their ``fused`` flag. Every other
module that holds a BatchNorm is traced with ``torch.fx`` (its submodules
kept as calls) and its graph searched for ``bn -> add -> relu`` (the tail of
a residual block, ``relu(bn(u) + h)``) and ``bn -> relu``; each match becomes
one call of :func:`~resfuse_kernels.nn.fused_tail.bn_add_relu`, and the
module's forward is replaced, on that instance only, by the rewritten
graph's. Where tracing fails, blocks shaped like torchvision's
BasicBlock/Bottleneck or MONAI's ResNetBlock/ResNetBottleneck get a fused
forward written for that shape. No parameter, buffer or submodule is added,
removed or renamed, so state_dict keys and checkpoints are unchanged;
``fused=False`` deletes the replaced forwards.
"""

from __future__ import annotations

import copy
import functools
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import FusableBlock
from .fused_tail import bn_add_relu, unsupported_reason
from .sync_bn import convert_sync_batchnorm

__all__ = ["ConvertReport", "Fused", "Skipped", "convert"]

TAIL = "bn -> add -> relu"
BN_RELU = "bn -> relu"
METHODS = ("auto", "fx", "structural")
_MARK = "_resfuse_converted"  # instance attribute: (how, the forward it replaced or None)


@dataclass(frozen=True)
class Fused:
    """A fused tail: BatchNorm ``bn`` (its path), in ``module``'s forward."""

    bn: str
    pattern: str
    module: str
    method: str  # "fx", "structural" or "own block"


@dataclass(frozen=True)
class Skipped:
    """Something convert recognised and left as it was, and why."""

    where: str  # the BatchNorm's path, or the module's whose forward was not read
    what: str   # the pattern, or "forward"
    reason: str


@dataclass
class ConvertReport:
    """What :func:`convert` did (``return_report=True``; printed with ``verbose=True``)."""

    fused: list[Fused] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # modules given their forward back

    def summary(self) -> str:
        counts = Counter(f.pattern for f in self.fused)
        done = ", ".join(f"{n} x {p}" for p, n in counts.items()) or "nothing"
        reasons = Counter(s.reason for s in self.skipped)
        if self.restored and not self.fused:
            return f"restored the original forward of {len(self.restored)} modules"
        out = f"fused {done}; skipped {len(self.skipped)}"
        if reasons:
            out += " (" + "; ".join(f"{n} x {r}" for r, n in reasons.items()) + ")"
        return out

    def __str__(self) -> str:
        lines = [f"rk.convert: {self.summary()}"]
        lines += [f"  fused    {f.bn or f.module or '(model)'}: {f.pattern} [{f.method}"
                  f"{', in ' + (f.module or '(model)') if f.bn else ''}]" for f in self.fused]
        lines += [f"  skipped  {s.where or '(model)'}: {s.what}: {s.reason}" for s in self.skipped]
        lines += [f"  restored {m or '(model)'}" for m in self.restored]
        return "\n".join(lines)


def convert(model: nn.Module, fused: bool = True, *, inplace: bool = True,
            method: str = "auto", bn_relu: bool = False, verbose: bool = False,
            return_report: bool = False, sync_batchnorm: bool = False, process_group=None):
    """Fuse every residual tail ``relu(bn(u) + h)`` that ``model`` computes.

    Args:
        model: any ``nn.Module``.
        fused: True fuses; False gives every converted module its original
            forward back (and switches the package's own blocks off).
        inplace: change ``model`` itself (default) or a deep copy of it.
        method: "auto" (torch.fx, structural matching where tracing fails),
            "fx" or "structural" (only the known block shapes).
        bn_relu: also fuse ``bn -> relu`` without a residual, through the op
            with a zero residual (an extra read and write: not faster).
        verbose: print the report.
        return_report: return ``(model, report)`` instead of ``model``.
        sync_batchnorm: also make every BatchNorm2d synchronised across
            ``process_group`` (None: the default group), fused blocks'
            included (:func:`~resfuse_kernels.nn.sync_bn.convert_sync_batchnorm`:
            nn.SyncBatchNorm for a model on CUDA, which replaces the modules,
            so use the returned model). The tails fused by fx or structural
            matching then run unfused (their BatchNorm is looked up at each
            call, and a synchronised one takes the original computation).

    Parameters, buffers and state_dict keys do not change. A model in which
    nothing is fused gets a warning saying what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module (a model or a block; changed in place "
                        f"unless inplace=False), got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    restored = _restore(model)
    if fused:
        _fuse(model, report, method, bn_relu)
        if not report.fused:
            warnings.warn(f"rk.convert fused nothing in {type(model).__name__}: "
                          f"{report.summary()}", stacklevel=2)
    else:
        report.restored = restored
        for path, m in model.named_modules():
            if isinstance(m, FusableBlock) and m.fused:
                m.fused = False
                report.restored.append(path)
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, process_group)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _restore(model: nn.Module) -> list[str]:
    """Give every converted module of ``model`` its forward back; their paths."""
    paths = []
    for path, m in model.named_modules():
        state = m.__dict__.pop(_MARK, None)
        if state is None:
            continue
        previous = state[1]
        if previous is None:
            del m.__dict__["forward"]
        else:
            m.__dict__["forward"] = previous
        paths.append(path)
    return paths


def _install(m: nn.Module, forward, how: str) -> None:
    m.__dict__[_MARK] = (how, m.__dict__.get("forward"))
    m.__dict__["forward"] = forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or "BatchNorm" in type(m).__name__


def _fuse(model: nn.Module, report: ConvertReport, method: str, bn_relu: bool) -> None:
    own: list[str] = []   # the package's blocks: their own flag, their insides left alone
    claimed: set[int] = set()
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") or p == "" for p in own):
            continue
        if isinstance(m, FusableBlock):
            m.fused = True
            own.append(path)
            report.fused.append(Fused("", "block tail", path, "own block"))
            continue
        if not _reads_forward(m):
            continue
        if method != "structural":
            try:
                graph = _trace(m)
            except Exception as error:  # anything a forward raises on proxies
                if method == "auto" and _structural(m, path, report, claimed):
                    continue
                first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
                report.skipped.append(Skipped(path, "forward", (
                    f"not traceable by torch.fx ({type(error).__name__}: {first}); "
                    f"{'and not a block shape convert knows' if method == 'auto' else 'method=fx'}")))
                continue
            _rewrite(m, path, graph, report, claimed, bn_relu)
        else:
            _structural(m, path, report, claimed)


def _reads_forward(m: nn.Module) -> bool:
    """Whether ``m``'s own forward may hold a pattern: it has one, is not a
    torch.nn layer (Sequential excepted) and has a BatchNorm below it."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)) or _is_norm(m):
        return False
    if type(m).__module__.startswith("torch.nn.") and not isinstance(m, nn.Sequential):
        return False
    return any(_is_norm(x) for x in m.modules() if x is not m)


class _Tracer(fx.Tracer):
    """Traces one module's forward, every submodule call kept as a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


class _Untraceable(Exception):
    pass


def _trace(m: nn.Module) -> fx.Graph:
    """``m``'s forward as a graph, traced in train and in eval mode: a forward
    that differs between them (Python branching on ``self.training``) is
    refused, since a graph holds one branch."""
    flags = [(x, x.training) for x in m.modules()]
    graphs = []
    try:
        for mode in (True, False):
            m.train(mode)
            graphs.append(_Tracer().trace(m))
    finally:
        for x, flag in flags:
            x.training = flag
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise _Untraceable("its forward branches on self.training")
    return graphs[0]


_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu, torch.relu_, F.relu_)
_OTHER_ACTIVATIONS = (F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
                      F.hardswish, F.hardtanh, F.softplus, F.prelu, torch.sigmoid, torch.tanh,
                      F.sigmoid, F.tanh)
_METHOD_ACTIVATIONS = ("sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_")


def _residual(add: fx.Node, bn_node: fx.Node) -> Optional[fx.Node]:
    """``h`` when ``add`` computes ``bn_node + h`` (either order), else None."""
    if add.kwargs or len(add.args) != 2:
        return None
    if add.op == "call_function" and add.target in _ADDS:
        pass
    elif add.op == "call_method" and add.target in ("add", "add_"):
        if add.target == "add_" and add.args[0] is not bn_node:
            return None  # h.add_(bn(u)) writes into h: not a tail to replace
    else:
        return None
    a, b = add.args
    other = b if a is bn_node else a if b is bn_node else None
    return other if isinstance(other, fx.Node) and other is not bn_node else None


def _activation(node: fx.Node, value: fx.Node, modules: dict) -> Optional[str]:
    """"relu" when ``node`` is a ReLU of ``value``, another activation's name,
    or None when it is no activation."""
    if not node.args or node.args[0] is not value:
        return None
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.ReLU) and type(mod).forward is nn.ReLU.forward:
            return "relu"
        if type(mod).__module__ == "torch.nn.modules.activation":
            return type(mod).__name__
        return None
    if node.op == "call_function":
        if node.target in _RELUS:
            extra = set(node.kwargs) - {"inplace"}
            return "relu" if len(node.args) == 1 and not extra else None
        if node.target in _OTHER_ACTIVATIONS:
            return getattr(node.target, "__name__", str(node.target))
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1:
            return "relu"
        if node.target in _METHOD_ACTIVATIONS:
            return node.target
    return None


def _rewrite(m: nn.Module, path: str, graph: fx.Graph, report: ConvertReport,
             claimed: set, bn_relu: bool) -> None:
    modules = dict(m.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    done = 0
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if bn is None or not _is_norm(bn) or len(node.users) != 1:
            continue
        bn_path = _join(path, node.target)
        nxt = next(iter(node.users))
        h = _residual(nxt, node)
        if h is not None:
            if len(nxt.users) != 1:
                continue  # the sum is used elsewhere too: not a tail
            pattern, act = TAIL, next(iter(nxt.users))
        else:
            pattern, act = BN_RELU, nxt
        kind = _activation(act, nxt if h is not None else node, modules)
        if kind is None:
            continue
        reason = None
        if kind != "relu":
            reason = f"non-ReLU activation ({kind}); the fused op's is ReLU"
        elif pattern == BN_RELU and not bn_relu:
            reason = ("no residual: the op would add a zero one, an extra read and write, "
                      "so it is not faster (bn_relu=True fuses it anyway)")
        elif node.args[1:] or node.kwargs or not node.args:
            reason = "the BatchNorm is called with extra arguments"
        else:
            reason = unsupported_reason(bn)
        if reason is None and (calls[node.target] > 1 or id(bn) in claimed):
            reason = "the BatchNorm is called more than once"
        if reason is not None:
            report.skipped.append(Skipped(bn_path, pattern if kind == "relu" else
                                          pattern.replace("relu", kind), reason))
            continue
        with graph.inserting_before(act):
            module_ref = graph.get_attr(node.target)
            args = (module_ref, node.args[0]) + ((h,) if h is not None else ())
            new = graph.call_function(bn_add_relu, args)
        act.replace_all_uses_with(new)
        graph.erase_node(act)
        if h is not None:
            graph.erase_node(nxt)
        graph.erase_node(node)
        claimed.add(id(bn))
        report.fused.append(Fused(bn_path, pattern, path, "fx"))
        done += 1
    if done:
        graph.lint()
        module = fx.GraphModule(m, graph, class_name=type(m).__name__)
        _install(m, type(module).forward.__get__(m), "fx")


# -- structural matching: known block shapes, for forwards fx cannot trace ----

# class name: (activation attribute, number of convolutions); the tail is
# relu(bn<n>(conv<n>(...)) + (downsample(x) or x)).
_SHAPES = {
    "BasicBlock": ("relu", 2),        # torchvision
    "Bottleneck": ("relu", 3),        # torchvision
    "ResNetBlock": ("act", 2),        # MONAI
    "ResNetBottleneck": ("act", 3),   # MONAI
}


def _structural(m: nn.Module, path: str, report: ConvertReport, claimed: set) -> bool:
    """Fuse ``m`` if its class is one of the known block shapes; whether it was."""
    shape = _SHAPES.get(type(m).__name__)
    if shape is None:
        return False
    act_name, n = shape
    names = [act_name, "downsample"] + [f"{k}{i}" for i in range(1, n + 1) for k in ("conv", "bn")]
    if not all(hasattr(m, a) for a in names) or hasattr(m, f"conv{n + 1}"):
        return False
    bn, act = getattr(m, f"bn{n}"), getattr(m, act_name)
    bn_path = _join(path, f"bn{n}")
    reason = None
    if not (isinstance(act, nn.ReLU) and type(act).forward is nn.ReLU.forward):
        reason = f"non-ReLU activation ({type(act).__name__}); the fused op's is ReLU"
    else:
        reason = unsupported_reason(bn)
    if reason is None and id(bn) in claimed:
        reason = "the BatchNorm is called more than once"
    if reason is not None:
        report.skipped.append(Skipped(bn_path, TAIL, reason))
        return True
    _install(m, functools.partial(_structural_forward, m, act_name, n), "structural")
    claimed.add(id(bn))
    report.fused.append(Fused(bn_path, TAIL, path,
                              f"structural, as {type(m).__name__}'s forward is written"))
    return True


def _structural_forward(m: nn.Module, act_name: str, n: int, x: torch.Tensor) -> torch.Tensor:
    act = getattr(m, act_name)
    out = x
    for i in range(1, n):
        out = act(getattr(m, f"bn{i}")(getattr(m, f"conv{i}")(out)))
    u = getattr(m, f"conv{n}")(out)
    identity = x if m.downsample is None else m.downsample(x)
    return bn_add_relu(getattr(m, f"bn{n}"), u, identity)
