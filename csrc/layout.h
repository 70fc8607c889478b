// The memory-format rule of every op, once for the C++ sources (in Python:
// resfuse_kernels/ops/_common.py, memory_format): an activation that is
// channels_last and not also contiguous is channels_last, any other NCHW.
// An op's outputs take the format of their input (the first activation's,
// for y). With the op's geometry, storage dtypes and the host code over
// them that both compiled backends share.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>

// AT_DISPATCH_* over the storage dtypes of the ops: float64, float32, bfloat16, float16.
#define RESFUSE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

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

// The dtype of the carry's products v = W x, dx = W^T dv and dW = dv x^T,
// and of the dv they take, for activations of dtype `storage`, on every
// backend: double for float32/float64 (BatchNorm over few values amplifies
// a float32 product's rounding: dW erred 5x the composite's at two values a
// channel), float for bf16/fp16, whose storage rounds more than that.
inline at::ScalarType product_type(at::ScalarType storage) {
  return storage == at::kFloat || storage == at::kDouble ? at::kDouble : at::kFloat;
}

// The carry's dW = sum over the pixels of dv x^T, (K, Cx), from dv (N, K, H, W) and
// x (N, Cx, H, W) dense in g's layout: one GEMM over the pixels for channels_last,
// one per image (summed) for NCHW.
inline at::Tensor carry_weight_grad(const at::Tensor& dv, const at::Tensor& x, const Geometry& g) {
  const int64_t K = dv.size(1), Cx = x.size(1);
  if (g.cl)
    return at::mm(dv.permute({0, 2, 3, 1}).reshape({g.N * g.S, K}).t(),
                  x.permute({0, 2, 3, 1}).reshape({g.N * g.S, Cx}));
  return at::bmm(dv.reshape({g.N, K, g.S}), x.reshape({g.N, Cx, g.S}).transpose(1, 2)).sum(0);
}

}  // namespace resfuse
