// The schemas of the backend kernel ops, written once for every compiled
// backend: resfuse_cpu::* (csrc/cpu), resfuse_cuda::* (csrc/cuda) and the
// tests' resfuse_cuda_emu::*, with the semantics csrc/backend.h gives their
// C++ signatures; the public resfuse::* ops put them behind their checks and
// autograd.
#pragma once

#include <torch/library.h>

namespace resfuse_schema {

inline void define_kernels(torch::Library& m) {
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
}

// Registers one backend's four kernels (functions named as the ops) for the
// dispatch key of the TORCH_LIBRARY_IMPL block `m` belongs to.
template <typename HighwayForward, typename HighwayBackward, typename TailForward,
          typename TailBackward>
void impl_kernels(torch::Library& m, HighwayForward* highway_forward,
                  HighwayBackward* highway_backward, TailForward* tail_forward,
                  TailBackward* tail_backward) {
  m.impl("highway_gate_forward", highway_forward);
  m.impl("highway_gate_backward", highway_backward);
  m.impl("resfuse_tail_forward", tail_forward);
  m.impl("resfuse_tail_backward", tail_backward);
}

}  // namespace resfuse_schema
