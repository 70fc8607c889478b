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

// An op's (N, C, S), S = H * W, and layout: that of its first activation,
// which is also the layout of every output the kernels write. NCHW is
// [N][C][S] and channels_last [N][S][C] in memory. A "run" is a maximal
// contiguous stretch: one channel of one image (NCHW, S long) or one pixel
// across all channels (channels_last, C long).
struct Geometry {
  int64_t N, C, S;
  bool cl;  // channels_last

  static Geometry of(const at::Tensor& first) {
    return {first.size(0), first.size(1), first.size(2) * first.size(3),
            format_of(first) == at::MemoryFormat::ChannelsLast};
  }
  at::MemoryFormat format() const {
    return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  int64_t runs() const { return cl ? N * S : N * C; }
  int64_t run_length() const { return cl ? C : S; }
  int64_t count() const { return N * S; }  // values per channel
};

}  // namespace resfuse
