// The memory-format rule of every op, once for the C++ sources (in Python:
// resfuse_kernels/ops/_common.py, memory_format): an activation that is
// channels_last and not also contiguous is channels_last, any other NCHW.
// An op's outputs take the format of their input (the first activation's,
// for y).
#pragma once

#include <ATen/core/Tensor.h>

namespace resfuse {

inline at::MemoryFormat format_of(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace resfuse
