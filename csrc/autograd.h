// The public ops' eager path for the compiled backends (cpu, cuda): the
// forward kernel, the running-statistics update and the autograd node in
// one dispatcher call, the backward kernel called from that C++ node.
//
// Why: the Python path (resfuse_kernels/ops/*.py, an autograd.Function
// around the same kernels) spends ~250 us of host time per forward +
// backward on a 2-core CPU outside the kernels, on a GPU more than the
// kernels' own run at the stage shapes. Here the Python layer keeps only the
// argument checks and autocast's promotion (resfuse_kernels/ops/_common.py,
// fused_autograd); what the Python formula does, this does the same way:
//   * running statistics: running = lerp(running, batch, momentum), the
//     variance unbiased by count / (count - 1) (update_running_stats);
//   * saved: the inputs and the per-channel statistics, nothing else;
//   * backward: a missing output gradient is zeros, the gradient made dense
//     in the output's memory format, the gradients of the running
//     statistics and scalars none (ops/resfuse_tail.py, _make_backward);
//   * autocast off inside, forward and backward (no_autocast): the carry's
//     products keep the op's precision.
#pragma once

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "layout.h"

namespace resfuse_autograd {

using at::Tensor;
using Opt = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using resfuse::format_of;

// One BatchNorm's running update from the batch's (mean, biased var) over
// `count` values per channel, as nn.BatchNorm2d.
inline void update_running(const Opt& running_mean, const Opt& running_var, const Tensor& mean,
                           const Tensor& var, int64_t count, double momentum) {
  if (count == 0 || !running_mean || !running_var || !running_mean->defined() ||
      !running_var->defined())
    return;
  const double factor = static_cast<double>(count) / std::max<int64_t>(count - 1, 1);
  Tensor rm = *running_mean, rv = *running_var;
  rm.lerp_(mean.to(rm.scalar_type()), momentum);
  rv.lerp_(var.mul(factor).to(rv.scalar_type()), momentum);
}

inline int64_t values_per_channel(const Tensor& t) {
  return t.size(1) == 0 ? 0 : t.numel() / t.size(1);
}

inline Tensor dense_grad(const Tensor& grad, const Tensor& first) {
  const auto format = format_of(first);
  return grad.defined() ? grad.contiguous(format) : at::zeros_like(first, format);
}

inline Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }

// y = relu(BN_d(u) + h [+ BN_k(W x)]); Forward and Backward are the
// backend's resfuse_tail_forward / resfuse_tail_backward (csrc/schemas.h).
template <auto Forward, auto Backward>
struct Tail : public torch::autograd::Function<Tail<Forward, Backward>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& h,
                        const Tensor& weight_d, const Tensor& bias_d, const Opt& running_mean_d,
                        const Opt& running_var_d, const Opt& x, const Opt& w, const Opt& weight_k,
                        const Opt& bias_k, const Opt& running_mean_k, const Opt& running_var_k,
                        bool training, double eps_d, double eps_k, double momentum_d,
                        double momentum_k) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto [y, mean_d, var_d, mean_k, var_k] =
        Forward(u, h, weight_d, bias_d, running_mean_d, running_var_d, x, w, weight_k, bias_k,
                running_mean_k, running_var_k, training, eps_d, eps_k);
    if (training) {
      const int64_t count = values_per_channel(u);
      update_running(running_mean_d, running_var_d, mean_d, var_d, count, momentum_d);
      if (x) update_running(running_mean_k, running_var_k, mean_k, var_k, count, momentum_k);
    }
    ctx->save_for_backward({u, h, weight_d, bias_d, mean_d, var_d, x.value_or(Tensor()),
                            w.value_or(Tensor()), weight_k.value_or(Tensor()),
                            bias_k.value_or(Tensor()), mean_k, var_k});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps_d"] = eps_d;
    ctx->saved_data["eps_k"] = eps_k;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list s = ctx->get_saved_variables();
    const Tensor &u = s[0], &x = s[6];
    auto [du, dh, dweight_d, dbias_d, dx, dw, dweight_k, dbias_k] =
        Backward(dense_grad(grads[0], u), u, s[1], s[2], s[3], s[4], s[5], opt(x), opt(s[7]),
                 opt(s[8]), opt(s[9]), s[10], s[11], ctx->saved_data["training"].toBool(),
                 ctx->saved_data["eps_d"].toDouble(), ctx->saved_data["eps_k"].toDouble());
    const Tensor none;
    if (!x.defined()) dx = dw = dweight_k = dbias_k = none;
    // one entry per forward argument: 12 tensors, then 5 scalars
    return {du, dh, dweight_d, dbias_d, none, none, dx, dw, dweight_k, dbias_k,
            none, none, none, none, none, none, none};
  }
};

// y = H * T + x * (1 - T), H = relu(BN_h(a)), T = sigmoid(BN_t(b)); Forward
// and Backward are the backend's highway_gate_forward / _backward.
template <auto Forward, auto Backward>
struct Highway : public torch::autograd::Function<Highway<Forward, Backward>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& x,
                        const Tensor& weight_h, const Tensor& bias_h, const Opt& running_mean_h,
                        const Opt& running_var_h, const Tensor& weight_t, const Tensor& bias_t,
                        const Opt& running_mean_t, const Opt& running_var_t, bool training,
                        double eps_h, double eps_t, double momentum_h, double momentum_t) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto [y, mean_h, var_h, mean_t, var_t] =
        Forward(a, b, x, weight_h, bias_h, running_mean_h, running_var_h, weight_t, bias_t,
                running_mean_t, running_var_t, training, eps_h, eps_t);
    if (training) {
      const int64_t count = values_per_channel(a);
      update_running(running_mean_h, running_var_h, mean_h, var_h, count, momentum_h);
      update_running(running_mean_t, running_var_t, mean_t, var_t, count, momentum_t);
    }
    ctx->save_for_backward(
        {a, b, x, weight_h, bias_h, mean_h, var_h, weight_t, bias_t, mean_t, var_t});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps_h"] = eps_h;
    ctx->saved_data["eps_t"] = eps_t;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list s = ctx->get_saved_variables();
    auto [da, db, dx, dweight_h, dbias_h, dweight_t, dbias_t] =
        Backward(dense_grad(grads[0], s[0]), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                 s[8], s[9], s[10], ctx->saved_data["training"].toBool(),
                 ctx->saved_data["eps_h"].toDouble(), ctx->saved_data["eps_t"].toDouble());
    const Tensor none;
    // one entry per forward argument: 11 tensors, then 5 scalars
    return {da, db, dx, dweight_h, dbias_h, none, none, dweight_t, dbias_t, none, none,
            none, none, none, none, none};
  }
};

// Defines resfuse_<backend>::highway_gate_autograd and ::resfuse_tail_autograd
// in the TORCH_LIBRARY block `m`, as composite kernels (every dispatch key:
// autograd is inside them). The running statistics are updated in place.
template <auto HighwayForward, auto HighwayBackward, auto TailForward, auto TailBackward>
void define_autograd(torch::Library& m) {
  m.def("highway_gate_autograd(Tensor a, Tensor b, Tensor x, Tensor weight_h, Tensor bias_h, "
        "Tensor(a!)? running_mean_h, Tensor(b!)? running_var_h, Tensor weight_t, "
        "Tensor bias_t, Tensor(c!)? running_mean_t, Tensor(d!)? running_var_t, bool training, "
        "float eps_h, float eps_t, float momentum_h, float momentum_t) -> Tensor",
        [](const Tensor& a, const Tensor& b, const Tensor& x, const Tensor& weight_h,
           const Tensor& bias_h, const Opt& running_mean_h, const Opt& running_var_h,
           const Tensor& weight_t, const Tensor& bias_t, const Opt& running_mean_t,
           const Opt& running_var_t, bool training, double eps_h, double eps_t,
           double momentum_h, double momentum_t) {
          return Highway<HighwayForward, HighwayBackward>::apply(
              a, b, x, weight_h, bias_h, running_mean_h, running_var_h, weight_t, bias_t,
              running_mean_t, running_var_t, training, eps_h, eps_t, momentum_h, momentum_t);
        });
  m.def("resfuse_tail_autograd(Tensor u, Tensor h, Tensor weight_d, Tensor bias_d, "
        "Tensor(a!)? running_mean_d, Tensor(b!)? running_var_d, Tensor? x, Tensor? w, "
        "Tensor? weight_k, Tensor? bias_k, Tensor(c!)? running_mean_k, "
        "Tensor(d!)? running_var_k, bool training, float eps_d, float eps_k, "
        "float momentum_d, float momentum_k) -> Tensor",
        [](const Tensor& u, const Tensor& h, const Tensor& weight_d, const Tensor& bias_d,
           const Opt& running_mean_d, const Opt& running_var_d, const Opt& x, const Opt& w,
           const Opt& weight_k, const Opt& bias_k, const Opt& running_mean_k,
           const Opt& running_var_k, bool training, double eps_d, double eps_k,
           double momentum_d, double momentum_k) {
          return Tail<TailForward, TailBackward>::apply(
              u, h, weight_d, bias_d, running_mean_d, running_var_d, x, w, weight_k, bias_k,
              running_mean_k, running_var_k, training, eps_d, eps_k, momentum_d, momentum_k);
        });
}

}  // namespace resfuse_autograd
