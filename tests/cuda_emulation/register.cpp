// The emulated CUDA kernels as resfuse_cuda_emu::* on CPU tensors, with the
// schemas of resfuse_cuda::* (csrc/cuda/ops.cpp).
#include <torch/library.h>

#include "../../csrc/cuda/ops.h"

TORCH_LIBRARY(resfuse_cuda_emu, m) {
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

TORCH_LIBRARY_IMPL(resfuse_cuda_emu, CPU, m) {
  m.impl("highway_gate_forward", &resfuse_cuda::highway_gate_forward);
  m.impl("highway_gate_backward", &resfuse_cuda::highway_gate_backward);
  m.impl("resfuse_tail_forward", &resfuse_cuda::resfuse_tail_forward);
  m.impl("resfuse_tail_backward", &resfuse_cuda::resfuse_tail_backward);
}
