// The fused CUDA kernels of the `cuda` backend, callable from C++ directly or
// through the dispatcher as resfuse_cuda::<name> (registered in ops.cpp;
// implemented in highway_gate.cu and resfuse_tail.cu). All tensors must be
// on one CUDA device; kernels run on its current stream.
// Semantics, shapes and return values are those of the Python backend
// interface (resfuse_kernels/ops/composite.py): forward returns
// (y, mean, var, mean_k, var_k) with the statistics used (biased batch ones
// in training, copies of the running ones in eval); backward returns the
// gradients of every tensor input and BN affine parameter. Without the
// carry (x absent) its outputs are empty tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace resfuse_cuda {

using at::Tensor;
using Opt = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> highway_gate_forward(
    const Tensor& a, const Tensor& b, const Tensor& x, const Tensor& weight_h,
    const Tensor& bias_h, const Opt& running_mean_h, const Opt& running_var_h,
    const Tensor& weight_t, const Tensor& bias_t, const Opt& running_mean_t,
    const Opt& running_var_t, bool training, double eps_h, double eps_t);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> highway_gate_backward(
    const Tensor& grad_y, const Tensor& a, const Tensor& b, const Tensor& x,
    const Tensor& weight_h, const Tensor& bias_h, const Tensor& mean_h, const Tensor& var_h,
    const Tensor& weight_t, const Tensor& bias_t, const Tensor& mean_t, const Tensor& var_t,
    bool training, double eps_h, double eps_t);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> resfuse_tail_forward(
    const Tensor& u, const Tensor& h, const Tensor& weight_d, const Tensor& bias_d,
    const Opt& running_mean_d, const Opt& running_var_d, const Opt& x, const Opt& w,
    const Opt& weight_k, const Opt& bias_k, const Opt& running_mean_k, const Opt& running_var_k,
    bool training, double eps_d, double eps_k);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> resfuse_tail_backward(
    const Tensor& grad_y, const Tensor& u, const Tensor& h, const Tensor& weight_d,
    const Tensor& bias_d, const Tensor& mean_d, const Tensor& var_d, const Opt& x,
    const Opt& w, const Opt& weight_k, const Opt& bias_k, const Tensor& mean_k,
    const Tensor& var_k, bool training, double eps_d, double eps_k);

// Whether this library holds code the current device can run (built for
// its architecture, or PTX it can compile): the loader asks before it
// offers the backend.
bool kernels_runnable();

}  // namespace resfuse_cuda
