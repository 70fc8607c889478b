// The emulated CUDA kernels as resfuse_cuda_emu::* on CPU tensors, with the
// schemas every backend's are inferred from (csrc/backend.h).
#include <torch/library.h>

#include "../../csrc/cuda/ops.h"

namespace resfuse_cuda {

TORCH_LIBRARY(resfuse_cuda_emu, m) {
  RESFUSE_DEFINE_KERNELS(m, c10::DispatchKey::CPU);
}

}  // namespace resfuse_cuda
