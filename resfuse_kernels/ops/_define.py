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
* **Synchronised BatchNorm** (:meth:`FusedOp._synchronised`): with a
  process group in training, the statistics are the group's, as
  ``nn.SyncBatchNorm``'s, on every backend by one mechanism: the local
  moments are exchanged, the backend's kernels run in their given-statistics
  (eval) mode, and the backward adds the batch-statistics term from the
  group's sums. ``bn_inputs`` names what each BatchNorm normalises.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import backends
from ._common import (carry_backward, carry_forward, check_momenta, compute_dtype, empty_output,
                      memory_format, no_autocast, promote_under_autocast)

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
            # the ops' statistics are float64: the unbiased variance rounded
            # once into the running dtype (mul writes its out= in that dtype)
            var = torch.mul(var, factor, out=torch.empty_like(running_var))
            mean = mean.to(running_mean.dtype)
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
    arguments; ``fake(*args)`` returns empty outputs shaped as the forward's;
    ``bn_inputs``: what each BatchNorm normalises, an activation's name or
    ``(x, w)`` for the 1x1 convolution ``w x`` (used by the synchronised
    path only); ``activations``: the names of the 4-D inputs, promoted to
    one dtype under autocast.
    """

    def __init__(self, name: str, signature: Callable, check: Callable, fake: Callable,
                 bn_inputs: dict[str, str | tuple[str, str]], activations: tuple[str, ...]):
        self.name, self.check, self.fake = name, check, fake
        self.signature = inspect.signature(signature, eval_str=True)
        names = list(self.signature.parameters)
        self.activation_at = [names.index(a) for a in activations]
        self.training_at = names.index("training")
        self.bns = [n[len("weight_"):] for n in names if n.startswith("weight_")]
        # (weight, running_mean, running_var) positions of each BatchNorm
        self.bn_at = [(names.index(f"weight_{b}"), names.index(f"running_mean_{b}"),
                       names.index(f"running_var_{b}")) for b in self.bns]
        self.bias_at = [names.index(f"bias_{b}") for b in self.bns]
        running = {i for _, m, v in self.bn_at for i in (m, v)}
        self.grad_at = [i for i in range(self.training_at) if i not in running]
        self.backward_signature = self._backward_signature()
        # per BatchNorm: (position of its input, of the 1x1 weight or None)
        self.bn_input_at = [(names.index(spec[0]), names.index(spec[1]))
                            if isinstance(spec, tuple) else (names.index(spec), None)
                            for spec in (bn_inputs[b] for b in self.bns)]

        self.op = self._custom_op(NAMESPACE, backends.kernels, torch.library.custom_op)
        self._apply = self._function()

    # -- schemas --------------------------------------------------------------

    def _backward_signature(self) -> inspect.Signature:
        """``(grad_y, saved..., training, eps...)`` returning the gradients."""
        P = inspect.Parameter
        params = [P("grad_y", P.POSITIONAL_OR_KEYWORD, annotation=Tensor)]
        for p in self.signature.parameters.values():
            if p.name.startswith("running_"):  # running_mean_d -> mean_d
                p = p.replace(name=p.name[len("running_"):], annotation=Tensor)
            params.append(p)
        grads = tuple[(Tensor,) * len(self.grad_at)]
        return inspect.Signature(params, return_annotation=grads)

    def _custom_op(self, namespace: str, kernels: Callable, define: Callable):
        """The forward and backward ops ``namespace::<name>[_backward]``,
        defined with ``define`` (``custom_op`` or ``triton_op``), running the
        kernels of ``kernels(device)`` (:meth:`_run`), with this op's checks,
        fakes and autograd formula. Returns the forward op."""
        def forward_impl(*args):
            self.check(*args)
            return self._run(kernels(args[0].device), "forward", args)

        def backward_impl(*args):
            return self._run(kernels(args[1].device), "backward", args)

        forward = define(f"{namespace}::{self.name}", _with_signature(
            forward_impl, self.name, self.signature), mutates_args=())
        backward = define(f"{namespace}::{self.name}_backward", _with_signature(
            backward_impl, f"{self.name}_backward", self.backward_signature), mutates_args=())
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

    def define_twin(self, namespace: str, launchers):
        """A ``torch.library.triton_op`` twin ``namespace::<name>`` of the
        registered op (same schema, checks and autograd) running the Triton
        launchers ``<name>_forward`` and ``<name>_backward`` of module
        ``launchers``, which torch.compile traces into. Returns the forward op."""
        return self._custom_op(namespace, lambda _device: launchers, torch.library.triton_op)

    # -- implementations ------------------------------------------------------

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

    def _autograd_backward(self, run: Callable, leading: int = 0) -> Callable:
        """The backward of the autograd formula, with ``run(ctx, *args)``
        calling the backward kernel (directly, or through the registered
        backward op); ``leading`` arguments before the op's get no gradient."""
        grad_at, lead = self.grad_at, (None,) * leading

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
            return (*lead, *out)

        return backward

    def _function(self) -> Callable:
        """``apply(sync, *args)`` of the autograd.Function of the eager and
        synchronised routes, which call the backend's kernels directly.
        ``sync`` is None (eager), or :meth:`_synchronised`'s ``(group, count,
        present)``: ``args`` are then in given-statistics mode (checked there)
        and the backward kernel's gradients go through :meth:`_sync_backward`."""
        setup_context = self._setup_context

        def forward(ctx, sync, *args):
            # setup_context is called here, not declared: Function.apply binds a
            # declared one's arguments through inspect.signature on every call.
            if sync is None:
                self.check(*args)
            kernels = backends.kernels(args[0].device)
            out = self._run(kernels, "forward", args)
            setup_context(ctx, args, out)
            ctx.kernels, ctx.sync = kernels, sync
            return out

        def run(ctx, *args):
            grads = self._run(ctx.kernels, "backward", args)
            return grads if ctx.sync is None else self._sync_backward(*ctx.sync, args, list(grads))

        camel = "".join(part.title() for part in self.name.split("_"))
        fn = type(camel, (torch.autograd.Function,),
                  {"forward": staticmethod(forward),
                   "backward": staticmethod(self._autograd_backward(run, leading=1))})
        return fn.apply

    # -- the public call ------------------------------------------------------

    def __call__(self, args: tuple, momenta: dict, process_group=None) -> Tensor:
        """Run the op on the forward kernel's ``args`` (the activations
        promoted under autocast, then checked) and fold the batch statistics
        into the running ones with ``momenta`` (``momentum_<bn>`` by name,
        one per BatchNorm, in order) when training. With a ``process_group``
        of more than one rank, training statistics are the group's
        (:meth:`_synchronised`). Returns y."""
        if not all(isinstance(m, float) for m in momenta.values()):
            check_momenta(**momenta)  # the common case pays one isinstance a momentum
        return self._call(self._promoted(args), tuple(momenta.values()), process_group)

    def _promoted(self, args: tuple) -> tuple:
        """``args`` with the activations promoted to one dtype under autocast."""
        at = self.activation_at
        promoted = promote_under_autocast([args[i] for i in at])
        if all(p is args[i] for p, i in zip(promoted, at)):
            return args
        args = list(args)
        for p, i in zip(promoted, at):
            args[i] = p
        return tuple(args)

    def _call(self, args: tuple, momenta: tuple, process_group) -> Tensor:
        first = args[0]
        training = args[self.training_at]
        synchronised = (process_group is not None and training
                        and _group_size(process_group) > 1)
        if synchronised:
            y, count, stats = self._synchronised(args, process_group)
        elif _eager(first):
            y, *stats = self._apply(None, *args)
        else:
            twin = (backends.traceable_op(self.name, first.device.type)
                    if isinstance(first, Tensor) else None)
            y, *stats = (twin or self.op)(*args)
        if training:
            if not synchronised:
                count = first.numel() // first.shape[1] if first.shape[1] else 0
            update_running_stats(count, *(
                (args[m], args[v], stats[2 * k], stats[2 * k + 1], momenta[k])
                for k, (w, m, v) in enumerate(self.bn_at) if args[w] is not None))
        return y

    # -- synchronised BatchNorm -----------------------------------------------
    #
    # Forward: each BatchNorm's local (count, mean, M2) in float64, one
    # all_gather, Chan's count-weighted merge; then the forward kernel in its
    # given-statistics mode (training=False, the group's mean and biased
    # variance in place of the running statistics), so the normalisation and
    # everything after it stay fused. Backward: the backward kernel in the
    # same mode gives the local sum(g) and sum(g * z_hat) (the affine
    # gradients, which stay local: DDP averages them) and the input gradient
    # without the batch-statistics term, weight * rstd * g; one all_reduce of
    # the sums, then that term, -weight * rstd * (sum_g + z_hat * sum_gz) / M
    # with the group's M, is added (through W^T and x^T for the carry). This is
    # nn.SyncBatchNorm's gradient.

    @torch.compiler.disable
    def _synchronised(self, args: tuple, group) -> tuple[Tensor, int, list]:
        """``(y, group count, statistics)`` of a training call whose
        BatchNorms use ``group``'s statistics."""
        first = args[0]
        if type(first) is not Tensor or first.is_meta:
            raise ValueError(f"{self.name}: synchronised BatchNorm (process_group=...) needs "
                             f"real tensors, got {type(first).__name__} on {first.device}")
        present = [k for k, (w, _, _) in enumerate(self.bn_at) if args[w] is not None]
        # Checked as in eval, with the weights standing in for the statistics: a
        # rank may hold one value a channel, or none; the group's count is checked.
        self.check(*self._given(args, {k: (args[self.bn_at[k][0]],) * 2 for k in present}))
        count, moments = self._group_moments(args, present, group)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 "
                             f"over the process group (input of size {tuple(first.shape)} "
                             f"on this rank)")
        y, *stats = self._apply((group, count, present), *self._given(args, moments))
        return y, count, stats

    def _given(self, args: tuple, stats: dict) -> list:
        """``args`` in given-statistics mode: ``training=False`` and BatchNorm
        ``k``'s running statistics replaced by ``stats[k] = (mean, var)``."""
        given = list(args)
        given[self.training_at] = False
        for k, (mean, var) in stats.items():
            _, m, v = self.bn_at[k]
            given[m], given[v] = mean, var
        return given

    def _bn_input(self, args: tuple, k: int, dtype: torch.dtype) -> Tensor:
        """What BatchNorm ``k`` normalises, in ``dtype``."""
        z_at, w_at = self.bn_input_at[k]
        z = args[z_at].to(dtype)
        return z if w_at is None else carry_forward(z, args[w_at].to(dtype))

    def _group_moments(self, args: tuple, present: list, group) -> tuple[int, dict]:
        """The group's count and, per BatchNorm, (mean, biased var) in float64
        (STATS_DTYPE, unrounded): local moments in the compute dtype (torch's
        var_mean), widened to float64, exchanged by one all_gather and merged
        by Chan's formula, count-weighted (an empty rank adds nothing)."""
        first = args[0]
        local = compute_dtype(first.dtype)
        channels = first.shape[1]
        n = first.numel() // channels if channels else 0
        parts = [torch.full((1,), float(n), dtype=torch.float64, device=first.device)]
        with torch.no_grad(), no_autocast(first):
            for k in present:
                z = self._bn_input(args, k, local)
                if n:
                    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
                else:
                    var = mean = z.new_zeros(channels)
                parts += (mean.double(), var.double() * n)
            mine = torch.cat(parts)
            everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(everyone, mine, group=group)
            gathered = torch.stack(everyone)  # (ranks, 1 + 2 C per BatchNorm)
            counts = gathered[:, :1]
            total = counts.sum()
            count = int(total.item())  # the running update's factor and the check need it
            per_bn = gathered[:, 1:].view(len(everyone), len(present), 2, channels)
            moments = {}
            for j, k in enumerate(present):
                means, m2s = per_bn[:, j, 0], per_bn[:, j, 1]
                mean = (counts * means).sum(0) / total.clamp(min=1)
                m2 = (m2s + counts * (means - mean).square()).sum(0)
                moments[k] = (mean, m2 / total.clamp(min=1))
        return count, moments

    def _sync_backward(self, group, count: int, present: list, args: tuple,
                       grads: list) -> list:
        """The backward kernel's given-statistics ``grads`` (one per
        ``grad_at``) of the backward kernel's ``args`` made training-mode
        gradients over ``group``: the ``present`` BatchNorms' sum(g) and
        sum(g * z_hat) summed over the group, the input gradients corrected
        with them."""
        saved, scalars = args[1:1 + self.training_at], args[1 + self.training_at:]
        slot = {i: j for j, i in enumerate(self.grad_at)}
        total = torch.cat([grads[slot[i]].double() for k in present
                           for i in (self.bn_at[k][0], self.bias_at[k])])
        dist.all_reduce(total, group=group)
        first = saved[0]
        ct = compute_dtype(first.dtype)
        with torch.no_grad(), no_autocast(first):
            for k, (sum_gz, sum_g) in zip(present, total.view(len(present), 2, first.shape[1])):
                w_at, mean_at, var_at = self.bn_at[k]
                rstd = torch.rsqrt(saved[var_at].double() + scalars[1 + k])
                wr = saved[w_at].double() * rstd
                k2 = (wr * rstd * sum_gz / count).view(1, -1, 1, 1)
                k3 = (wr * sum_g / count).view(1, -1, 1, 1)
                mean = saved[mean_at].double().view(1, -1, 1, 1)
                z_at, carry_at = self.bn_input_at[k]
                if carry_at is None:  # dz -= k3 + k2 (z - mean)
                    g = grads[slot[z_at]]
                    term = (saved[z_at].to(ct) - mean.to(ct)).mul_(k2.to(ct)).add_(k3.to(ct))
                    if g.dtype == ct:  # the kernel's fresh output: corrected in place
                        g.sub_(term)
                    else:
                        grads[slot[z_at]] = (g.to(ct) - term).to(g.dtype).contiguous(
                            memory_format=memory_format(g))
                    continue
                # the carry v = W x: dv -= k3 + k2 (v - mean), in float64, through
                # dx = W^T dv and dW = dv x^T (carry_backward, the composite's)
                dv = torch.addcmul(k3, self._bn_input(saved, k, torch.float64) - mean, k2)
                ddx, ddw = carry_backward(dv, saved[z_at], saved[carry_at])
                dx, dw = grads[slot[z_at]], grads[slot[carry_at]]
                grads[slot[z_at]] = (dx.double() - ddx).to(dx.dtype).contiguous(
                    memory_format=memory_format(dx))
                grads[slot[carry_at]] = (dw.double() - ddw.reshape(dw.shape)).to(dw.dtype)
        return grads


def _group_size(group) -> int:
    """The number of ranks in ``group`` (a clear error before
    ``init_process_group``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group first, or pass "
                           "process_group=None for per-process statistics")
    return dist.get_world_size(group)


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
