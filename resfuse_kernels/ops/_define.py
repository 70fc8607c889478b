"""What every fused op is made of, written once for all of them.

An op module gives three things: ``signature`` (a typed stub whose
parameters are the forward kernel's: activations and BatchNorm tensors,
then ``training`` and one ``eps_<bn>`` per BatchNorm), ``check`` (the
argument checks) and ``fake`` (its outputs' shapes, dtypes and strides).
:class:`FusedOp` derives everything else from the parameter names, where a
BatchNorm ``<bn>`` is ``weight_<bn>, bias_<bn>, running_mean_<bn>,
running_var_<bn>``:

* **Schemas.** ``resfuse::<op>(inputs..., bool training, float eps...)
  -> (y, mean_<bn>, var_<bn>, ...)`` and ``resfuse::<op>_backward(grad_y,
  saved..., training, eps...)`` returning the gradient of every
  differentiable input, in order. ``saved`` is the inputs with each
  BatchNorm's running statistics replaced by the statistics the forward used
  (the batch's in training, the running ones in eval). The differentiable
  inputs are the tensors that are not running statistics; an absent one
  (``None``) gets an empty tensor.
* **The autograd formula** (:meth:`FusedOp._setup_context`,
  :meth:`FusedOp._backward`): saved are the inputs and the per-channel
  statistics, nothing else; the backward kernel of the forward's backend
  computes every gradient from them; the statistics have none.
* **The running-statistics update** (:func:`update_running_stats`), as
  ``nn.BatchNorm2d``'s: ``momentum=None`` arrives as the cumulative
  average's weight, a 0-dim tensor.
* **Two routes** from the public entry point (:meth:`FusedOp.__call__`) to a
  kernel. *Eager* (plain tensors outside torch.compile): an
  ``autograd.Function`` whose forward and backward call the backend's
  kernels directly, skipping the custom op's Python dispatch (its argument
  binding and redispatch cost as much host time as a small kernel's run).
  *Traced* (torch.compile, fake and meta tensors): the registered op, or,
  for CUDA tensors on the compiled Triton backend, its ``triton_op`` twin
  (:meth:`FusedOp.define_twin`: same schema and autograd) whose kernels
  Inductor sees.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import backends
from ._common import empty_output, memory_format, no_autocast

NAMESPACE = "resfuse"


def update_running_stats(count: int, *updates: tuple) -> None:
    """Fold one batch's statistics into the running ones, as nn.BatchNorm2d does.

    Each update is ``(running_mean, running_var, mean, var, momentum)``:
    ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased variance ``var * count / (count - 1)``; ``var`` is the biased
    batch variance the ops return. An empty batch, or a BatchNorm without
    running statistics, leaves them unchanged. Float momenta go in one
    ``torch._foreach_lerp_`` per value (one launch on a GPU).
    """
    if count == 0:
        return
    factor = count / max(count - 1, 1)  # training rejects count 1 before this
    by_momentum: dict[float, tuple[list, list]] = {}
    with torch.no_grad():
        for running_mean, running_var, mean, var, momentum in updates:
            if running_mean is None or running_var is None:
                continue
            var = var * factor
            if mean.dtype != running_mean.dtype:  # the statistics of float64 activations
                mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
            if isinstance(momentum, Tensor):  # momentum=None: the cumulative average
                momentum = momentum.to(running_mean.dtype)
                running_mean.lerp_(mean, momentum)
                running_var.lerp_(var, momentum)
                continue
            selves, others = by_momentum.setdefault(float(momentum), ([], []))
            selves += (running_mean, running_var)
            others += (mean, var)
        for momentum, (selves, others) in by_momentum.items():
            torch._foreach_lerp_(selves, others, momentum)


def _eager(first: object) -> bool:
    """Whether a call on first activation ``first`` takes the eager route:
    a plain tensor (not fake, functional, meta or another subclass) outside
    torch.compile's tracing."""
    return type(first) is Tensor and not first.is_meta and not torch.compiler.is_compiling()


class FusedOp:
    """One fused op: its registered forward and backward ops, the autograd
    formula, and the public call (see the module docstring).

    ``signature``: typed stub of the forward kernel's parameters (its
    return annotation is the forward's); ``check(*args)`` raises on bad
    arguments; ``fake(*args)`` returns empty outputs shaped as the forward's.
    """

    def __init__(self, name: str, signature: Callable, check: Callable, fake: Callable):
        self.name, self.check, self.fake = name, check, fake
        self.signature = inspect.signature(signature, eval_str=True)
        names = list(self.signature.parameters)
        self.training_at = names.index("training")
        self.bns = [n[len("weight_"):] for n in names if n.startswith("weight_")]
        # (weight, running_mean, running_var) positions of each BatchNorm
        self.bn_at = [(names.index(f"weight_{b}"), names.index(f"running_mean_{b}"),
                       names.index(f"running_var_{b}")) for b in self.bns]
        running = {i for _, m, v in self.bn_at for i in (m, v)}
        self.grad_at = [i for i in range(self.training_at) if i not in running]
        self.backward_signature = self._backward_signature()

        self.op = self._custom_op(NAMESPACE, self._forward_impl, self.backward_impl,
                                  torch.library.custom_op)
        self._eager_apply = self._eager_function()

    # -- schemas --------------------------------------------------------------

    def _backward_signature(self) -> inspect.Signature:
        """``(grad_y, saved..., training, eps...)`` returning the gradients."""
        P = inspect.Parameter
        params = [P("grad_y", P.POSITIONAL_OR_KEYWORD, annotation=Tensor)]
        for i, p in enumerate(self.signature.parameters.values()):
            if i >= self.training_at:
                params.append(p)
            elif p.name.startswith("running_"):  # running_mean_d -> mean_d
                params.append(p.replace(name=p.name[len("running_"):], annotation=Tensor))
            else:
                params.append(p)
        grads = tuple[(Tensor,) * len(self.grad_at)]
        return inspect.Signature(params, return_annotation=grads)

    def _custom_op(self, namespace: str, forward_impl: Callable, backward_impl: Callable,
                   define: Callable):
        """The forward and backward ops ``namespace::<name>[_backward]``,
        defined with ``define`` (``custom_op`` or ``triton_op``), with this
        op's fakes and autograd formula. Returns the forward op."""
        forward_impl = _with_signature(forward_impl, self.name, self.signature)
        backward_impl = _with_signature(backward_impl, f"{self.name}_backward",
                                        self.backward_signature)
        forward = define(f"{namespace}::{self.name}", forward_impl, mutates_args=())
        backward = define(f"{namespace}::{self.name}_backward", backward_impl, mutates_args=())
        if define is torch.library.custom_op:  # a triton_op's fake is its traced kernels
            forward.register_fake(self._fake)
            backward.register_fake(self._fake_backward)

        def run_backward(ctx, *args):
            # the backward runs on the forward's backend, even outside its use()
            with backends.use(ctx.forced):
                return backward(*args)

        forward.register_autograd(self._autograd_backward(run_backward),
                                  setup_context=self._setup_context)
        return forward

    def define_twin(self, namespace: str, forward: Callable, backward: Callable):
        """A ``torch.library.triton_op`` twin ``namespace::<name>`` of the
        registered op (same schema, checks and autograd) running the Triton
        launchers ``forward`` and ``backward``, which torch.compile traces
        into. Returns the forward op."""
        def forward_impl(*args):
            self.check(*args)
            with no_autocast(args[0]):  # as the registered op: internal products keep their precision
                return forward(*args)

        def backward_impl(*args):
            with no_autocast(args[1]):
                return backward(*args)

        return self._custom_op(namespace, forward_impl, backward_impl,
                               torch.library.triton_op)

    # -- implementations ------------------------------------------------------

    def _forward_impl(self, *args):
        self.check(*args)
        return self._run(backends.kernels(args[0].device), "forward", args)

    def backward_impl(self, *args):
        return self._run(backends.kernels(args[1].device), "backward", args)

    def _run(self, kernels, which: str, args: tuple):
        """Backend module ``kernels``' forward or backward kernel on ``args``,
        autocast off (internal products keep the op's precision)."""
        with no_autocast(args[0] if which == "forward" else args[1]):
            return getattr(kernels, f"{self.name}_{which}")(*args)

    def _fake(self, *args):
        self.check(*args)
        return self.fake(*args)

    def _fake_backward(self, grad_y, *saved_and_scalars):
        return tuple(_empty_grad(saved_and_scalars[i], grad_y) for i in self.grad_at)

    # -- the autograd formula -------------------------------------------------

    def _setup_context(self, ctx, inputs, output) -> None:
        stats = output[1:]
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics
        saved = list(inputs[:self.training_at])
        for k, (_, mean_at, var_at) in enumerate(self.bn_at):
            saved[mean_at], saved[var_at] = stats[2 * k], stats[2 * k + 1]
        ctx.save_for_backward(*saved)
        ctx.scalars = inputs[self.training_at:]
        ctx.forced = backends.forced()

    def _autograd_backward(self, run: Callable) -> Callable:
        """The backward of the autograd formula, with ``run(ctx, *args)``
        calling the backward kernel (directly, or through the registered
        backward op)."""
        grad_at = self.grad_at

        def backward(ctx, grad_y, *_stat_grads):
            saved = ctx.saved_tensors
            first = saved[0]
            if grad_y is None:  # grads are not materialised (the statistics never have one)
                grad_y = torch.zeros_like(first, memory_format=memory_format(first))
            # Kernels want a dense gradient; an expanded (zero-stride) one is copied.
            grad_y = grad_y.contiguous(memory_format=memory_format(first))
            grads = run(ctx, grad_y, *saved, *ctx.scalars)
            out = [None] * (len(saved) + len(ctx.scalars))
            for g, i in zip(grads, grad_at):
                if saved[i] is not None:
                    out[i] = g
            return tuple(out)

        return backward

    def _eager_function(self) -> Callable:
        """``apply`` of the eager route's autograd.Function."""
        setup_context, name = self._setup_context, self.name

        def forward(ctx, *args):
            # setup_context is called here, not declared: Function.apply binds a
            # declared one's arguments through inspect.signature on every call.
            self.check(*args)
            kernels = backends.kernels(args[0].device)
            out = self._run(kernels, "forward", args)
            setup_context(ctx, args, out)
            ctx.kernels = kernels
            return out

        def run(ctx, *args):
            return self._run(ctx.kernels, "backward", args)

        camel = "".join(part.title() for part in name.split("_"))
        fn = type(camel, (torch.autograd.Function,),
                  {"forward": staticmethod(forward),
                   "backward": staticmethod(self._autograd_backward(run))})
        return fn.apply

    # -- the public call ------------------------------------------------------

    def __call__(self, args: tuple, momenta: tuple) -> Tensor:
        """Run the op on the forward kernel's ``args`` (checked, promoted)
        and fold the batch statistics into the running ones with ``momenta``
        (one per BatchNorm, in order) when training. Returns y."""
        first = args[0]
        if _eager(first):
            y, *stats = self._eager_apply(*args)
        else:
            twin = (backends.traceable_op(self.name, first.device.type)
                    if isinstance(first, Tensor) else None)
            y, *stats = (twin or self.op)(*args)
        if args[self.training_at]:
            count = first.numel() // first.shape[1] if first.shape[1] else 0
            update_running_stats(count, *(
                (args[m], args[v], stats[2 * k], stats[2 * k + 1], momenta[k])
                for k, (w, m, v) in enumerate(self.bn_at) if args[w] is not None))
        return y


def _with_signature(fn: Callable, name: str, signature: inspect.Signature) -> Callable:
    """``fn(*args)`` as a function named ``name`` with ``signature`` (from
    which torch.library infers the schema)."""
    def impl(*args, **kwargs):
        return fn(*(signature.bind(*args, **kwargs).args if kwargs else args))

    impl.__signature__ = signature
    impl.__name__ = name
    return impl


def _empty_grad(t: Optional[Tensor], like: Tensor) -> Tensor:
    """The fake gradient of input ``t``: its shape and format; for an absent
    input an empty tensor like ``like``."""
    if t is None:
        return like.new_empty(0)
    return empty_output(t) if t.dim() == 4 else torch.empty_like(t)
