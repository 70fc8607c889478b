// The fused CPU kernels of the `cpu` backend (declared in csrc/backend.h),
// callable from C++ directly or through the dispatcher as resfuse_cpu::<name>
// (registered in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace resfuse_cpu {
#include "../backend.h"
}  // namespace resfuse_cpu
