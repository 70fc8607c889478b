// Building blocks of the fused CUDA kernels (the `cuda` backend): the
// activation layout, 16-byte vector loads/stores with conversion, index
// walkers, mean/variance merging and block reductions. Shared by
// highway_gate.cu and resfuse_tail.cu; the BatchNorm passes built on them
// (statistics, per-channel parameters, gradient sums) are in bn.cuh.
//
// Layout. Every 4-D activation is addressed as (N, C, S), S = H * W, with
// one unit-stride axis: S for NCHW ("rows" are (n, c)), C for channels_last
// ("rows" are (n, s)). An Act holds the pointer and the two other strides,
// so views with larger batch/row strides (slices) are read in place; a
// tensor whose H and W do not merge, or whose unit-stride axis is not the
// op's, is made dense first (host side, fit() in bn.cuh).
//
// Arithmetic is in acc_t = at::opmath_type (float for bf16/fp16/fp32,
// double for fp64). Offsets are int64.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#ifdef RESFUSE_CUDA_EMULATION
#include "emulation.h"  // CPU stand-ins: launch, on_device, DeviceGuard, ...
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace resfuse_cuda {

using at::Tensor;

// Threads per block of every kernel (reductions assume a multiple of 32).
constexpr int kThreads = 256;

template <typename T>
using acc_t = at::opmath_type<T>;

// Elements of T in one 16-byte load.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));
}

// ----------------------------------------------------------------- layout

// One activation seen as (N, C, S) with a unit-stride inner axis: S when
// CL is false (NCHW), C when CL is true (channels_last). `so` is the
// stride of the other non-batch axis (C in NCHW, S in channels_last).
template <typename T>
struct Act {
  T* p;
  int64_t sn, so;
};

template <bool CL, typename T>
__device__ __forceinline__ T* at_(const Act<T>& t, int64_t n, int64_t c, int64_t s) {
  return t.p + (CL ? n * t.sn + s * t.so + c : n * t.sn + c * t.so + s);
}

// ----------------------------------------------------------------- vectors

// V elements of T; 16-byte aligned when that is its size or more (a larger
// pack, e.g. 8 floats next to 8 bf16, becomes several 16-byte accesses).
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Pack {
  T v[V];
};

// Loads V consecutive elements at p (aligned for Pack<T, V> when V > 1)
// converted to A. Whole 16-byte packs move as uint4, so the compiler emits
// one 128-bit access each (a struct copy of 2-byte elements may be split).
template <int V, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[V]) {
  using U = std::remove_const_t<T>;
  using P = Pack<U, V>;
  if constexpr (V == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    P pk;
    if constexpr (sizeof(P) % 16 == 0) {
      const uint4* src = reinterpret_cast<const uint4*>(p);
      uint4* dst = reinterpret_cast<uint4*>(&pk);
#pragma unroll
      for (int j = 0; j < static_cast<int>(sizeof(P) / 16); ++j) dst[j] = src[j];
    } else {
      pk = *reinterpret_cast<const P*>(p);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = static_cast<A>(pk.v[i]);
  }
}

// The bits of v as an unsigned integer of its size.
template <typename U, typename T>
__device__ __forceinline__ U bits(const T& v) {
  static_assert(sizeof(U) == sizeof(T), "bits: size mismatch");
  U u;
  memcpy(&u, &v, sizeof(U));
  return u;
}

// Stores V values converted to T at p (aligned for Pack<T, V> when V > 1).
// The converted values are packed into 32-bit words and written as uint4:
// a struct copy of the converted elements gets split into scalar stores.
template <int V, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    static_assert(sizeof(T) * V % 16 == 0, "vector stores are whole 16-byte packs");
    constexpr int kWords = static_cast<int>(sizeof(T) * V / 4);
    uint32_t w[kWords];
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int j = 0; j < kWords; ++j)
        w[j] = static_cast<uint32_t>(bits<uint16_t>(static_cast<T>(in[2 * j]))) |
               (static_cast<uint32_t>(bits<uint16_t>(static_cast<T>(in[2 * j + 1]))) << 16);
    } else if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int j = 0; j < kWords; ++j) w[j] = bits<uint32_t>(static_cast<T>(in[j]));
    } else {
      static_assert(sizeof(T) == 8, "element size 2, 4 or 8");
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const uint64_t b = bits<uint64_t>(static_cast<T>(in[i]));
        w[2 * i] = static_cast<uint32_t>(b);
        w[2 * i + 1] = static_cast<uint32_t>(b >> 32);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int k = 0; k < kWords / 4; ++k)
      __stwb(dst + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
  }
}

// ----------------------------------------------------------------- math

// ReLU that keeps NaN, as torch.relu does (fmax would drop it).
template <typename A>
__device__ __forceinline__ A relu(A z) {
  return z < A(0) ? A(0) : z;
}

// 1 / (1 + exp(-z)): exp overflows to inf for very negative z and the
// result is then 0, never NaN.
__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// The 0/1 mask of a ReLU, as a factor: the composite multiplies by the
// boolean mask, so NaN/inf in the gradient still propagate through it.
template <typename A>
__device__ __forceinline__ A positive(A z) {
  return z > A(0) ? A(1) : A(0);
}

// ----------------------------------------------------------------- walkers

// The (i1, i0) coordinates of a flat index i = i1 * D0 + i0 that advances
// by a fixed step: one division when created, then adds and one carry.
struct Walker2 {
  int64_t i0, i1, d0, d1, D0;
  __device__ __forceinline__ Walker2(int64_t start, int64_t step, int64_t D0_) : D0(D0_) {
    i0 = start % D0, i1 = start / D0, d0 = step % D0, d1 = step / D0;
  }
  __device__ __forceinline__ void advance() {
    i0 += d0, i1 += d1;
    if (i0 >= D0) i0 -= D0, ++i1;
  }
};

// Likewise for i = (i2 * D1 + i1) * D0 + i0. Each carry is at most 1 since
// i0 + d0 < 2 D0 and i1 + d1 + 1 < 2 D1.
struct Walker3 {
  int64_t i0, i1, i2, d0, d1, d2, D0, D1;
  __device__ __forceinline__ Walker3(int64_t start, int64_t step, int64_t D0_, int64_t D1_)
      : D0(D0_), D1(D1_) {
    int64_t q = start / D0;
    i0 = start % D0, i1 = q % D1, i2 = q / D1;
    q = step / D0;
    d0 = step % D0, d1 = q % D1, d2 = q / D1;
  }
  __device__ __forceinline__ void advance() {
    i0 += d0, i1 += d1, i2 += d2;
    if (i0 >= D0) i0 -= D0, ++i1;
    if (i1 >= D1) i1 -= D1, ++i2;
  }
};

// ----------------------------------------------------------------- moments

// (count, mean, sum of squared deviations) of a set of values. Merging two
// (Chan et al.) never subtracts large sums, so the variance stays accurate
// when the mean is large against the spread, and M2 never goes negative.
template <typename A>
struct Moments {
  A n, mean, m2;
};

template <typename A>
__device__ __forceinline__ void merge(Moments<A>& a, const Moments<A>& b) {
  if (b.n == A(0)) return;
  if (a.n == A(0)) {
    a = b;
    return;
  }
  const A n = a.n + b.n, w = b.n / n, d = b.mean - a.mean;
  a.mean += d * w;
  a.m2 += b.m2 + d * d * a.n * w;
  a.n = n;
}

template <typename A>
__device__ __forceinline__ Moments<A> shfl_down(const Moments<A>& m, int offset) {
  return {__shfl_down_sync(0xffffffffu, m.n, offset),
          __shfl_down_sync(0xffffffffu, m.mean, offset),
          __shfl_down_sync(0xffffffffu, m.m2, offset)};
}

// ----------------------------------------------------------------- block reductions
// For 1-D blocks of kThreads threads; the result is valid in thread 0. Every
// thread of the block must call them (they synchronise).

template <typename A>
__device__ __forceinline__ void block_merge(Moments<A>& m) {
  __shared__ Moments<A> warp_part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(m, shfl_down(m, o));
  if (lane == 0) warp_part[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? warp_part[lane] : Moments<A>{A(0), A(0), A(0)};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) merge(m, shfl_down(m, o));
  }
}

template <int K, typename A>
__device__ __forceinline__ void block_sum(A (&v)[K]) {
  __shared__ A warp_part[kThreads / 32][K];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) warp_part[warp][k] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kThreads / 32 ? warp_part[lane][k] : A(0);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
}

// ----------------------------------------------------------------- host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef RESFUSE_CUDA_EMULATION
// Streaming multiprocessors of the current device (sizes the grids).
inline int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

// The current stream (what at::cuda::getCurrentCUDAStream() returns; the
// c10 header avoids ATen/cuda/CUDAContext.h, which needs the cuBLAS headers).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// kernel<<<grid, block, 0, stream>>>(args...), checked.
template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool on_device(const Tensor& t) { return t.is_cuda(); }

using DeviceGuard = c10::cuda::CUDAGuard;
#endif

}  // namespace resfuse_cuda
