// The `cuda` backend's registration: the fused CUDA kernels of
// resfuse::highway_gate and resfuse::resfuse_tail (highway_gate.cu,
// resfuse_tail.cu) as the internal ops resfuse_cuda::*, with the schemas
// of every backend (csrc/schemas.h). The Python layer in
// resfuse_kernels/_ext_cuda.py puts them behind the public ops' schema,
// autograd and checks. Each op's passes: the launch plan at the top of its .cu.
#include <torch/library.h>

#include "../schemas.h"

#include "ops.h"

namespace resfuse_cuda {

TORCH_LIBRARY(resfuse_cuda, m) {
  resfuse_schema::define_kernels(m);
  // No tensor argument to dispatch on: one kernel for every backend.
  m.def("kernels_runnable() -> bool", &kernels_runnable);
}

TORCH_LIBRARY_IMPL(resfuse_cuda, CUDA, m) {
  resfuse_schema::impl_kernels(m, &highway_gate_forward, &highway_gate_backward,
                               &resfuse_tail_forward, &resfuse_tail_backward);
}

}  // namespace resfuse_cuda
