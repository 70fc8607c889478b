// The `cuda` backend's registration: the fused CUDA kernels of
// resfuse::highway_gate and resfuse::resfuse_tail (highway_gate.cu,
// resfuse_tail.cu) as the internal ops resfuse_cuda::*, with the same
// schemas as resfuse_cpu::* (csrc/cpu/ops.cpp). The Python layer in
// resfuse_kernels/_ext_cuda.py puts them behind the public ops' schema,
// autograd and checks.
//
// Kernels and passes (details at the top of each .cu):
//   highway forward, training:  stats(a), stats(b) | y = H*T + x*(1-T)
//   highway backward:           sums(g_h, g_h*a_hat, g_t, g_t*b_hat) | da, db, dx
//   tail forward, training:     [v = W x (cuBLAS)] stats(u [, v]) | y = relu(...)
//   tail backward:              [v = W x] sums(g, g*u_hat [, g*v_hat]) | du, dh [, dv]
//                               [dx = W^T dv, dW = dv x^T (cuBLAS)]
// In eval the statistics pass disappears.
#include <torch/library.h>

#include "ops.h"

namespace resfuse_cuda {

TORCH_LIBRARY(resfuse_cuda, m) {
  m.def("highway_gate_forward(Tensor a, Tensor b, Tensor x, Tensor weight_h, Tensor bias_h, "
        "Tensor? running_mean_h, Tensor? running_var_h, Tensor weight_t, Tensor bias_t, "
        "Tensor? running_mean_t, Tensor? running_var_t, bool training, float eps_h, "
        "float eps_t) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("highway_gate_backward(Tensor grad_y, Tensor a, Tensor b, Tensor x, Tensor weight_h, "
        "Tensor bias_h, Tensor mean_h, Tensor var_h, Tensor weight_t, Tensor bias_t, "
        "Tensor mean_t, Tensor var_t, bool training, float eps_h, float eps_t) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("resfuse_tail_forward(Tensor u, Tensor h, Tensor weight_d, Tensor bias_d, "
        "Tensor? running_mean_d, Tensor? running_var_d, Tensor? x, Tensor? w, Tensor? weight_k, "
        "Tensor? bias_k, Tensor? running_mean_k, Tensor? running_var_k, bool training, "
        "float eps_d, float eps_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("resfuse_tail_backward(Tensor grad_y, Tensor u, Tensor h, Tensor weight_d, "
        "Tensor bias_d, Tensor mean_d, Tensor var_d, Tensor? x, Tensor? w, Tensor? weight_k, "
        "Tensor? bias_k, Tensor mean_k, Tensor var_k, bool training, float eps_d, float eps_k) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // No tensor argument to dispatch on: one kernel for every backend.
  m.def("kernels_runnable() -> bool", &kernels_runnable);
}

TORCH_LIBRARY_IMPL(resfuse_cuda, CUDA, m) {
  m.impl("highway_gate_forward", &highway_gate_forward);
  m.impl("highway_gate_backward", &highway_gate_backward);
  m.impl("resfuse_tail_forward", &resfuse_tail_forward);
  m.impl("resfuse_tail_backward", &resfuse_tail_backward);
}

}  // namespace resfuse_cuda
