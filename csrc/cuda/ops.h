// The fused CUDA kernels of the `cuda` backend (declared in csrc/backend.h),
// callable from C++ directly or through the dispatcher as resfuse_cuda::<name>
// (registered in ops.cpp; implemented in highway_gate.cu and resfuse_tail.cu).
// All tensors must be on one CUDA device; kernels run on its current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace resfuse_cuda {
#include "../backend.h"

// Whether this library holds code the current device can run (built for
// its architecture, or PTX it can compile): the loader asks before it
// offers the backend.
bool kernels_runnable();

}  // namespace resfuse_cuda
