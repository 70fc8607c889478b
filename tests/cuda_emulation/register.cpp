// The emulated CUDA kernels as resfuse_cuda_emu::* on CPU tensors, with the
// schemas of every backend (csrc/schemas.h).
#include <torch/library.h>

#include "../../csrc/cuda/ops.h"
#include "../../csrc/schemas.h"

using namespace resfuse_cuda;

TORCH_LIBRARY(resfuse_cuda_emu, m) {
  resfuse_schema::define_kernels(m);
}

TORCH_LIBRARY_IMPL(resfuse_cuda_emu, CPU, m) {
  resfuse_schema::impl_kernels(m, &highway_gate_forward, &highway_gate_backward,
                               &resfuse_tail_forward, &resfuse_tail_backward);
}
