"""CUDA graphs of whole training steps: captured once, replayed every step.

PyTorch's whole-network capture recipe (``torch.cuda.graphs`` docs), in one
object that the trainer and the benchmarks share::

    def train_step(x, y):                  # no zero_grad here
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return loss, logits

    step = GraphedStep(train_step, optimizer)
    for x, y in batches:
        loss, logits = step(x, y)          # static outputs, see below

* The first ``warmup`` calls run ``train_step`` eagerly on a side stream:
  real training steps, which also autotune the Triton kernels and create
  the optimizer's state and the libraries' workspaces before capture.
* The next call captures ``train_step`` on static input buffers (allocated
  like the first call's inputs) into a ``torch.cuda.CUDAGraph`` and replays
  it; every later call copies its inputs into the buffers and replays.
  Capturing runs nothing, so every call is exactly one training step.
* The gradients are set to None before each warm-up step and before
  capture, so the captured backward writes them rather than accumulates.
* A graph bakes in the optimizer's Python-number hyperparameters. They
  are compared before every replay with their values at capture, and a
  change (a learning-rate schedule) captures again, without warm-up.
* Optimizers that have a ``capturable`` option (Adam, AdamW, ...) get it
  set; SGD has none and needs none (its state is its momentum buffers).

The outputs of a replay are the graph's own tensors, overwritten by the
next call: clone what must outlive it. ``train_step`` must be capturable:
no host synchronisation (``.item()``, ``.cpu()``, printing a tensor, a
Python branch on a tensor's value), fixed shapes, autocast without its
weight cache; the fused ops are (``tests/test_capture.py``).

``emulate=True`` runs the same bookkeeping (static buffers, gradients set
to None, the warm-up count) with ``train_step`` called eagerly on every
call and nothing captured: how a machine without CUDA exercises the code
that drives a graph. It measures nothing about graphs.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["GraphedStep", "GraphUnavailable", "unavailable_reason"]


class GraphUnavailable(RuntimeError):
    """CUDA graphs were asked for where they cannot run."""


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when CUDA graphs can be captured on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this is a {device.type} device"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a build without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def hyperparameters(optimizer: Optional[torch.optim.Optimizer]) -> tuple:
    """What a captured optimizer step bakes in: every param group's
    Python-number settings (lr, momentum, betas, ...)."""
    if optimizer is None:
        return ()
    return tuple(tuple((k, v) for k, v in group.items()
                       if k != "params" and isinstance(v, (numbers.Number, tuple)))
                 for group in optimizer.param_groups)


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Set ``capturable`` on every param group that has the option, moving
    step counters already created on the CPU to their parameter's device."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != p.device:
                state["step"] = step.to(p.device)


class GraphedStep:
    """``train_step`` (forward, loss, backward, optimizer step; see the module
    docstring) run as a CUDA graph after ``warmup`` eager calls.

    Args:
        train_step: callable on the step's input tensors returning a tensor or
            a tuple of tensors; must not zero the gradients.
        optimizer: the optimizer ``train_step`` steps (its gradients are set
            to None before warm-up steps and capture, and its hyperparameters
            trigger a new capture when they change); None for a step with no
            optimizer (an op benchmark's forward + backward).
        warmup: eager calls before capture, at least 1.
        emulate: call ``train_step`` eagerly every time, capture nothing
            (machines without CUDA); otherwise the inputs must be CUDA tensors.
        device: the CUDA device of a step without inputs (default: the
            current one); a step with inputs runs on its first input's.
    """

    def __init__(self, train_step: Callable, optimizer: Optional[torch.optim.Optimizer] = None,
                 warmup: int = 3, emulate: bool = False,
                 device: torch.device | str = "cuda") -> None:
        if not callable(train_step):
            raise TypeError(f"train_step must be callable, got {type(train_step).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before capture: they "
                             f"autotune kernels and create the optimizer state), got {warmup!r}")
        self.train_step, self.optimizer = train_step, optimizer
        self.warmup, self.emulate = warmup, bool(emulate)
        self.calls = 0          # training steps run
        self.captures = 0       # graphs captured
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.static_inputs: Optional[list[Tensor]] = None
        self._outputs: Optional[tuple[Tensor, ...]] = None
        self._single = False
        self._captured_with: tuple = ()
        self._stream = None
        self.device = torch.device(device)

    @property
    def mode(self) -> str:
        """``"cuda-graph"`` or ``"emulated"``."""
        return "emulated" if self.emulate else "cuda-graph"

    def __call__(self, *inputs: Tensor):
        """One training step on ``inputs``; returns ``train_step``'s outputs."""
        self._stage(inputs)
        if self.emulate:
            self._zero_grad()
            outputs = self._run()
        elif self.calls < self.warmup:
            outputs = self._warm_step()
        else:
            hyper = hyperparameters(self.optimizer)
            if self.graph is None or hyper != self._captured_with:
                self._capture(hyper)
            self.graph.replay()
            outputs = self._outputs
        self.calls += 1
        return outputs[0] if self._single else outputs

    # -- the steps -------------------------------------------------------------

    def _stage(self, inputs: Sequence[Tensor]) -> None:
        """Copy ``inputs`` into the static buffers (allocated at the first call)."""
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor):
                raise TypeError(f"input {i} is a {type(t).__name__}; a graphed step takes "
                                f"tensors only")
        if self.static_inputs is None:
            if inputs:
                self.device = inputs[0].device
            if not self.emulate:
                for i, device in enumerate([t.device for t in inputs] or [self.device]):
                    reason = unavailable_reason(device)
                    if reason is not None:
                        raise GraphUnavailable(f"{f'input {i}: ' if inputs else ''}{reason} "
                                               f"(emulate=True runs the step eagerly instead)")
                if self.optimizer is not None:
                    make_capturable(self.optimizer)
            self.static_inputs = [torch.empty_like(t) for t in inputs]
        elif len(inputs) != len(self.static_inputs):
            raise ValueError(f"the step was first called with {len(self.static_inputs)} "
                             f"inputs, now {len(inputs)}")
        for i, (s, t) in enumerate(zip(self.static_inputs, inputs)):
            if (t.shape, t.dtype, t.device) != (s.shape, s.dtype, s.device):
                raise ValueError(
                    f"input {i} is {tuple(t.shape)} {t.dtype} on {t.device}, but the step's "
                    f"buffers are {tuple(s.shape)} {s.dtype} on {s.device}: a CUDA graph "
                    f"replays fixed shapes (make every batch full-size, or build a new "
                    f"GraphedStep for the new shape)")
            s.copy_(t, non_blocking=True)

    def _run(self) -> tuple[Tensor, ...]:
        out = self.train_step(*self.static_inputs)
        self._single = isinstance(out, Tensor)
        outputs = (out,) if self._single else tuple(out) if isinstance(out, (tuple, list)) \
            else None
        if outputs is None or not all(isinstance(o, Tensor) for o in outputs):
            raise TypeError("train_step must return a tensor or a tuple of tensors, got "
                            f"{type(out).__name__}")
        return outputs

    def _zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _warm_step(self) -> tuple[Tensor, ...]:
        """An eager step on a side stream (the capture recipe's warm-up)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            self._zero_grad()
            outputs = self._run()
        current.wait_stream(self._stream)
        return outputs

    def _capture(self, hyper: tuple) -> None:
        self.graph = self._outputs = None  # the previous graph's memory goes first
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph):
            outputs = self._run()
        self.graph, self._outputs, self._captured_with = graph, outputs, hyper
        self.captures += 1
