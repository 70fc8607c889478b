// The `cuda` backend's registration: the fused CUDA kernels of
// resfuse::highway_gate and resfuse::resfuse_tail (highway_gate.cu,
// resfuse_tail.cu) as the internal ops resfuse_cuda::*, their schemas
// inferred from csrc/backend.h. The Python layer in
// resfuse_kernels/_ext_cuda.py puts them behind the public ops' schema,
// autograd and checks. Each op's passes: the launch plan at the top of its .cu.
#include <torch/library.h>

#include "ops.h"

namespace resfuse_cuda {

TORCH_LIBRARY(resfuse_cuda, m) {
  RESFUSE_DEFINE_KERNELS(m, c10::DispatchKey::CUDA);
  // No tensor argument to dispatch on: one kernel for every backend.
  m.def("kernels_runnable() -> bool", &kernels_runnable);
}

}  // namespace resfuse_cuda
