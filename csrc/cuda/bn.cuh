// The passes every fused BatchNorm op is made of, generic over the op's
// elementwise math (a functor) and over the layout (NCHW or channels_last):
//
//   batch_stats   per-channel mean and biased variance of one activation:
//                 stats_{nchw,cl}_kernel -> (3, P, C) partial moments,
//                 stats_finalize_kernel merges the P partials (Chan, double).
//   bn_params     per-channel BN parameters (mean, rstd, w*rstd, bias, and
//                 the two backward coefficients) from mean/var/weight/bias.
//   backward_pass per-channel sums of K functor values (the backward's
//                 sum(g), sum(g * z_hat), ...): reduce_{nchw,cl}_kernel ->
//                 (K, P, C) partials, grad_finalize_kernel adds them in
//                 double and writes dweight/dbias and the coefficients.
//   pointwise     one functor call per vector of the whole tensor.
//
// Reductions are two-stage: grid (channel blocks, P) where P splits the
// N*S values of a channel so that the grid has a few blocks per SM; each
// block writes its partial, and a one-warp-per-channel kernel merges the
// P partials. No atomics.
//
// Functors see (n, c, s) of the first lane of a V-lane vector: in NCHW the
// lanes are s..s+V-1 of channel c, in channels_last channels c..c+V-1 of
// pixel s; Bn::lanes gives the per-channel parameters of those lanes.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "../layout.h"
#include "common.cuh"
#include "ops.h"

namespace resfuse_cuda {

// ----------------------------------------------------------------- geometry (host)

using resfuse::Geometry;

// Stride of the merged S = H*W axis, or -1 when H and W do not merge.
inline int64_t s_stride(const Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (H * W <= 1) return 0;  // unused: s is always 0
  if (H == 1) return t.stride(3);
  if (W == 1) return t.stride(2);
  return t.stride(2) == t.stride(3) * W ? t.stride(3) : -1;
}

// True when t can be read in place in the op's layout: H, W merge and the
// op's inner axis has unit stride.
inline bool fits(const Tensor& t, const Geometry& g) {
  const int64_t ss = s_stride(t);
  if (ss < 0) return false;
  return g.cl ? (t.size(1) <= 1 || t.stride(1) == 1) : (ss == 0 || ss == 1);
}

// t itself when it fits the op's layout, else a dense copy in it.
inline Tensor fit(const Tensor& t, const Geometry& g) {
  return fits(t, g) ? t : t.contiguous(g.format());
}

// The Act of a tensor that fits(), or a null Act for an undefined one (an
// absent operand); `so` is the stride of the op's outer non-batch axis (0
// when that axis has size 1, so it never blocks vectors).
template <typename T>
Act<T> act(const Tensor& t, const Geometry& g) {
  if (!t.defined()) return {nullptr, 0, 0};
  T* p;
  if constexpr (std::is_const_v<T>) {
    p = static_cast<T*>(t.const_data_ptr());
  } else {
    p = static_cast<T*>(t.mutable_data_ptr());
  }
  const int64_t so = g.cl ? s_stride(t) : (t.size(1) <= 1 ? 0 : t.stride(1));
  return {p, t.size(0) <= 1 ? 0 : t.stride(0), so};
}

// Whether vectors of V = vec_width<T>() lanes can be used for all these acts:
// the inner axis splits into whole vectors and every vector start is 16-byte aligned.
template <typename T, typename... P>
bool vectorizable(const Geometry& g, const Act<P>&... acts) {
  constexpr int V = vec_width<T>();
  if (V == 1) return true;
  if (g.run_length() % V != 0) return false;
  auto ok = [](auto a) {
    return reinterpret_cast<uintptr_t>(a.p) % 16 == 0 && a.sn % V == 0 && a.so % V == 0;
  };
  return (ok(acts) && ...);
}

// Calls fn(std::integral_constant<bool, CL>, std::integral_constant<int, V>)
// with V = vec_width<T>() when `vec` else 1: the layout and vector width as
// constants (for parameters `cl` and `v`, `cl()` and `v()` are template arguments).
template <typename T, typename Fn>
void dispatch_layout(bool cl, bool vec, Fn&& fn) {
  using Vec = std::integral_constant<int, vec_width<T>()>;
  using One = std::integral_constant<int, 1>;
  const auto width = [&](auto layout) { vec ? fn(layout, Vec{}) : fn(layout, One{}); };
  cl ? width(std::true_type{}) : width(std::false_type{});
}

// A (C,) per-channel tensor in dtype `dtype`, contiguous.
inline Tensor channel(const Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// ----------------------------------------------------------------- reduction plan

// How a per-channel reduction splits: a grid of (groups, P) blocks of (bx, by)
// threads, P partials per group. NCHW: a group is one channel, bx = kThreads;
// channels_last: a group is bx channel vectors, a block (bx vectors) x (by pixels).
struct Plan {
  int64_t P;
  int bx, by;
  int64_t groups;  // grid.x
};

#ifdef RESFUSE_CUDA_EMULATION
constexpr int64_t kMinWorkPerThread = 0;  // as many partials as possible: exercise the merges
#else
constexpr int64_t kMinWorkPerThread = 8;  // vectors (NCHW) or pixels (CL) per thread, at least
#endif

inline Plan reduction_plan(const Geometry& g, int V) {
  const int64_t target = 4 * static_cast<int64_t>(sm_count());  // blocks in the grid
  Plan plan{1, kThreads, 1, g.C};
  int64_t per_group;  // vectors (NCHW) or pixels (CL) one group reduces over
  int64_t per_block;  // how many of those one block should take at least
  if (!g.cl) {
    per_group = g.N * (g.S / V);
    per_block = kMinWorkPerThread * kThreads;
  } else {
    const int64_t cv = g.C / V;
    int bx = 1;
    while (bx < 32 && bx < cv) bx *= 2;
    plan.bx = bx;
    plan.by = kThreads / bx;
    plan.groups = ceil_div(cv, bx);
    per_group = g.count();
    per_block = kMinWorkPerThread * plan.by;
  }
  const int64_t want = ceil_div(target, std::max<int64_t>(plan.groups, 1));
  plan.P = std::min<int64_t>(
      {want, std::max<int64_t>(1, ceil_div(per_group, std::max<int64_t>(per_block, 1))), 65535});
  return plan;
}

// ----------------------------------------------------------------- statistics

// Partial moments of channel blockIdx.x over the blockIdx.y-th 1/P of its
// N * S/V vectors. Each vector's V values (one channel) form an exact
// local (V, mean, M2) merged into the thread's moments.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
stats_nchw_kernel(Act<const T> t, int64_t N, int64_t C, int64_t S, acc_t<T>* part) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int64_t SV = S / V, total = N * SV;
  const int64_t lo = total * p / P, hi = total * (p + 1) / P;
  Moments<A> m{A(0), A(0), A(0)};
  int64_t i = lo + threadIdx.x;
  if (i < hi) {
    Walker2 w(i, kThreads, SV);
    for (; i < hi; i += kThreads, w.advance()) {
      A v[V];
      load<V>(at_<false>(t, w.i1, c, w.i0 * V), v);
      A sum = 0;
#pragma unroll
      for (int l = 0; l < V; ++l) sum += v[l];
      const A mean = sum / A(V);
      A m2 = 0;
#pragma unroll
      for (int l = 0; l < V; ++l) m2 += (v[l] - mean) * (v[l] - mean);
      merge(m, Moments<A>{A(V), mean, m2});
    }
  }
  block_merge(m);
  if (threadIdx.x == 0) {
    part[(0 * P + p) * C + c] = m.n;
    part[(1 * P + p) * C + c] = m.mean;
    part[(2 * P + p) * C + c] = m.m2;
  }
}

// Partial moments of channels [V*cv, V*cv + V) (cv = blockIdx.x*bx + tx)
// over the blockIdx.y-th 1/P of the N*S pixels; thread row ty takes every
// by-th pixel (Welford, one shared count for the V lanes), then the rows are
// merged in shared memory.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
stats_cl_kernel(Act<const T> t, int64_t N, int64_t C, int64_t S, acc_t<T>* part) {
  using A = acc_t<T>;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t cv = blockIdx.x * static_cast<int64_t>(bx) + tx;
  const bool active = cv < C / V;
  const int64_t p = blockIdx.y, P = gridDim.y, total = N * S;
  const int64_t lo = total * p / P, hi = total * (p + 1) / P;
  A n = 0, mean[V], m2[V];
#pragma unroll
  for (int l = 0; l < V; ++l) mean[l] = 0, m2[l] = 0;
  int64_t i = lo + ty;
  if (active && i < hi) {
    Walker2 w(i, by, S);
    for (; i < hi; i += by, w.advance()) {
      A v[V];
      load<V>(at_<true>(t, w.i1, cv * V, w.i0), v);
      n += A(1);
      const A r = A(1) / n;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const A d = v[l] - mean[l];
        mean[l] += d * r;
        m2[l] += d * (v[l] - mean[l]);
      }
    }
  }
  __shared__ Moments<A> sm[kThreads * V];
  const int slot = (ty * bx + tx) * V;
#pragma unroll
  for (int l = 0; l < V; ++l) sm[slot + l] = Moments<A>{n, mean[l], m2[l]};
  __syncthreads();
  for (int stride = by / 2; stride > 0; stride >>= 1) {
    if (ty < stride) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        Moments<A> m = sm[slot + l];
        merge(m, sm[slot + stride * bx * V + l]);
        sm[slot + l] = m;
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int64_t c = cv * V + l;
      part[(0 * P + p) * C + c] = sm[slot + l].n;
      part[(1 * P + p) * C + c] = sm[slot + l].mean;
      part[(2 * P + p) * C + c] = sm[slot + l].m2;
    }
  }
}

// Finalize kernels: one warp per channel. Lane l takes partials l, l+32, ...
// and shuffles merge the lanes: one thread per channel walking all P
// partials in turn (P ~ 500 at the stage shapes) took 0.25-0.5 ms on an H200.
constexpr int kFinalizeWarps = kThreads / 32;

inline dim3 finalize_grid(int64_t C) { return dim3(ceil_div(C, kFinalizeWarps)); }

// Merges the P partial moments of each channel (in double) into the mean
// and the biased variance, in double (the ops' statistics dtype, unrounded);
// an empty channel gets 0 and 0, as the composite.
template <typename A>
__global__ void stats_finalize_kernel(const A* part, int64_t P, int64_t C, double* mean,
                                      double* var) {
  const int lane = threadIdx.x & 31;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kFinalizeWarps) + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warps: the shuffles below stay convergent
  Moments<double> m{0, 0, 0};
  for (int64_t p = lane; p < P; p += 32)
    merge(m, Moments<double>{static_cast<double>(part[(0 * P + p) * C + c]),
                             static_cast<double>(part[(1 * P + p) * C + c]),
                             static_cast<double>(part[(2 * P + p) * C + c])});
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(m, shfl_down(m, o));
  if (lane != 0) return;
  const double v = m.n > 0 ? m.m2 / m.n : 0.0;
  mean[c] = m.mean;
  var[c] = v < 0 ? 0.0 : v;  // keeps NaN
}

// (mean, biased var) over N, H, W of activation t (fit to g), in double.
template <typename T>
std::pair<Tensor, Tensor> batch_stats(const Tensor& t, const Geometry& g) {
  using A = acc_t<T>;
  const auto opts = t.options().dtype(c10::CppTypeToScalarType<A>::value);
  Tensor mean = at::empty({g.C}, opts.dtype(at::kDouble)), var = at::empty({g.C}, mean.options());
  if (g.C == 0) return {mean, var};
  const Act<const T> a = act<const T>(t, g);
  dispatch_layout<T>(g.cl, vectorizable<T>(g, a), [&](auto cl, auto v) {
    const Plan plan = reduction_plan(g, v());
    const cudaStream_t stream = current_stream();
    Tensor part = at::empty({3, plan.P, g.C}, opts);
    launch(cl() ? stats_cl_kernel<T, v()> : stats_nchw_kernel<T, v()>, dim3(plan.groups, plan.P),
           dim3(plan.bx, plan.by), stream, a, g.N, g.C, g.S, part.mutable_data_ptr<A>());
    launch(stats_finalize_kernel<A>, finalize_grid(g.C), dim3(kThreads), stream,
           part.const_data_ptr<A>(), plan.P, g.C, mean.mutable_data_ptr<double>(),
           var.mutable_data_ptr<double>());
  });
  return {mean, var};
}

// The statistics an op uses, in double (resfuse_kernels/ops/_common.py,
// STATS_DTYPE): the batch's in training, copies of the running ones in eval.
template <typename T>
std::pair<Tensor, Tensor> stats_or_running(const Tensor& t, const Geometry& g, bool training,
                                           const Opt& running_mean, const Opt& running_var) {
  if (training) return batch_stats<T>(t, g);
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "resfuse_cuda: running statistics are required in eval mode");
  return {running_mean->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true),
          running_var->to(at::kDouble, false, true)};
}

// ----------------------------------------------------------------- BN parameters

// Rows of the (kParamRows, C) per-channel parameter table of one BN. kWeight
// keeps weight so that the backward's coefficients are formed from the
// unrounded rstd (of the double variance, BnGrad::var), as the cpu
// backend's (Affine::rstd64).
enum ParamRow { kMean = 0, kRstd, kScale, kBias, kWeight, kParamRows };

// One BN's parameters for the V lanes of a vector, with the BN math on them.
template <typename A, int V>
struct BnLanes {
  A mean[V], rstd[V], scale[V], bias[V];

  // weight * (z - mean) * rstd + bias, with (z - mean) formed first so a
  // large mean does not cancel against the spread.
  __device__ __forceinline__ A affine(A z, int l) const {
    return (z - mean[l]) * scale[l] + bias[l];
  }
  // z - mean in double: exact for float z and mean (the backward's sums
  // take g (z - mean) exactly, as the cpu backend's product_of_difference).
  __device__ __forceinline__ double centred(A z, int l) const {
    return static_cast<double>(z) - static_cast<double>(mean[l]);
  }
};

// A parameter table on the device.
template <typename A>
struct Bn {
  const A* p;
  int64_t C;
  // The backward's (4, C) coefficients in double, written by
  // grad_finalize_kernel: k1, k2, k3 and the mean of the input gradient.
  const double* p64 = nullptr;

  // The input gradient of channel ch from g = dL/dBN(z):
  //   training: w r (g - sum_g/M - z_hat sum_gz/M) = k1 g + k2 (z - mean) + k3
  //   eval:     w r g
  // with k1 = w r, k2 = -w r^2 sum_gz/M, k3 = -w r sum_g/M, as
  // k1 g + (k2 (z - mean) + k3) with two FMAs in double, rounded once: over
  // few values a channel the terms cancel to eps / (var + eps) of their
  // size, and float terms and coefficients made da err 15x the composite's
  // at two values (CUDA-emulation soak seed 4108258873; the cpu backend's
  // InputGrad).
  __device__ __forceinline__ A input_grad(A g, A z, int64_t ch, bool training) const {
    const double* q = p64 + ch;
    if (!training) return static_cast<A>(q[0] * static_cast<double>(g));
    const double inner = fma(q[C], static_cast<double>(z) - q[3 * C], q[2 * C]);
    return static_cast<A>(fma(q[0], static_cast<double>(g), inner));
  }

  // Row r for the lanes of the vector at channel c: in channels_last the V
  // lanes are V channels, read as one vector (a table row is 16-byte
  // aligned when C % V == 0, which vectorising requires); in NCHW one
  // channel, broadcast. Rows a caller never reads are not loaded.
  template <int V, bool CL>
  __device__ __forceinline__ void row(int r, int64_t c, A (&out)[V]) const {
    const A* q = p + r * C + c;
    if constexpr (CL && V > 1) {
      load<V>(q, out);
    } else {
      const A v = q[0];
#pragma unroll
      for (int l = 0; l < V; ++l) out[l] = v;
    }
  }

  template <int V, bool CL>
  __device__ __forceinline__ BnLanes<A, V> lanes(int64_t c) const {
    BnLanes<A, V> b;
    row<V, CL>(kMean, c, b.mean);
    row<V, CL>(kRstd, c, b.rstd);
    row<V, CL>(kScale, c, b.scale);
    row<V, CL>(kBias, c, b.bias);
    return b;
  }
};

template <typename A>
__global__ void bn_params_kernel(const double* mean, const double* var, const A* weight,
                                 const A* bias, double eps, int64_t C, A* table) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  // in double, each value rounded once: the cpu backend's Affine
  const double r = 1.0 / sqrt(var[c] + eps);
  table[kMean * C + c] = static_cast<A>(mean[c]);
  table[kRstd * C + c] = static_cast<A>(r);
  table[kScale * C + c] = static_cast<A>(static_cast<double>(weight[c]) * r);
  table[kBias * C + c] = bias[c];
  table[kWeight * C + c] = weight[c];
}

// The parameter table of one BN from its statistics and affine parameters
// (any floating dtypes; used in acc dtype A, the statistics in double).
template <typename A>
Tensor bn_params(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias,
                 double eps) {
  const auto dtype = c10::CppTypeToScalarType<A>::value;
  const int64_t C = weight.numel();
  Tensor m = channel(mean, at::kDouble), v = channel(var, at::kDouble);
  Tensor w = channel(weight, dtype), b = channel(bias, dtype);
  Tensor table = at::empty({kParamRows, C}, weight.options().dtype(dtype));
  if (C > 0) {
    launch(bn_params_kernel<A>, dim3(ceil_div(C, kThreads)), dim3(kThreads), current_stream(),
           m.const_data_ptr<double>(), v.const_data_ptr<double>(), w.const_data_ptr<A>(),
           b.const_data_ptr<A>(), eps, C, table.mutable_data_ptr<A>());
  }
  return table;
}

// ----------------------------------------------------------------- gradient sums

// K per-channel sums of f's values. f(n, c, s, out) fills out[k][lane].
template <int K, int V, typename A, typename F>
__global__ void __launch_bounds__(kThreads)
reduce_nchw_kernel(F f, int64_t N, int64_t C, int64_t S, A* part) {
  const int64_t c = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int64_t SV = S / V, total = N * SV;
  const int64_t lo = total * p / P, hi = total * (p + 1) / P;
  A acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0;
  int64_t i = lo + threadIdx.x;
  if (i < hi) {
    Walker2 w(i, kThreads, SV);
    for (; i < hi; i += kThreads, w.advance()) {
      A v[K][V];
      f(w.i1, c, w.i0 * V, v);
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int l = 0; l < V; ++l) acc[k] += v[k][l];
    }
  }
  block_sum<K>(acc);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) part[(k * P + p) * C + c] = acc[k];
}

template <int K, int V, typename A, typename F>
__global__ void __launch_bounds__(kThreads)
reduce_cl_kernel(F f, int64_t N, int64_t C, int64_t S, A* part) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t cv = blockIdx.x * static_cast<int64_t>(bx) + tx;
  const bool active = cv < C / V;
  const int64_t p = blockIdx.y, P = gridDim.y, total = N * S;
  const int64_t lo = total * p / P, hi = total * (p + 1) / P;
  A acc[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int l = 0; l < V; ++l) acc[k][l] = 0;
  int64_t i = lo + ty;
  if (active && i < hi) {
    Walker2 w(i, by, S);
    for (; i < hi; i += by, w.advance()) {
      A v[K][V];
      f(w.i1, cv * V, w.i0, v);
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int l = 0; l < V; ++l) acc[k][l] += v[k][l];
    }
  }
  // one sum at a time through shared memory (all K at once in double would
  // overflow the 48 KiB of static shared memory at V = 8, K = 4)
  __shared__ A sm[kThreads * V];
  const int slot = (ty * bx + tx) * V;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int l = 0; l < V; ++l) sm[slot + l] = acc[k][l];
    __syncthreads();
    for (int stride = by / 2; stride > 0; stride >>= 1) {
      if (ty < stride)
#pragma unroll
        for (int l = 0; l < V; ++l) sm[slot + l] += sm[slot + stride * bx * V + l];
      __syncthreads();
    }
    if (ty == 0 && active)
#pragma unroll
      for (int l = 0; l < V; ++l) part[(k * P + p) * C + cv * V + l] = sm[slot + l];
    __syncthreads();  // read before the next sum overwrites it
  }
}

// Where one BN's gradient sums are and where its results go.
template <typename A>
struct BnGrad {
  int sum_g, sum_gz;  // indices of sum(g) and sum(g (z - mean)) among the K sums
  A* dweight;
  A* dbias;
  const A* table;  // its parameter table (kMean, kWeight)
  const double* mean;  // the forward's mean in double, (C,); null where kMean is exact
  const double* var;   // the forward's variance in double, (C,)
  double eps;
  double* sums = nullptr;  // if given: (2, C), sum(g) and sum(g (z - mean)) in double
  double* coef64 = nullptr;  // Bn::p64's rows, written
};

// One BN's backward on the host: its parameter table, the forward's
// statistics in double, the coefficients of Bn::input_grad (written by
// grad_finalize_kernel) and dweight, dbias: zeros, which stay the answer when
// there is nothing to reduce (C == 0). An undefined `mean` is that of a
// centred input (the carry's v): 0 in the table, and no BnGrad::mean.
template <typename A>
struct BnBackward {
  Tensor table, mean64, var64, coef, dweight, dbias;
  double eps;

  BnBackward(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias,
             double eps_, const at::TensorOptions& opts)
      : table(bn_params<A>(mean.defined() ? mean : at::zeros_like(var), var, weight, bias, eps_)),
        mean64(mean.defined() ? channel(mean, at::kDouble) : Tensor()),
        var64(channel(var, at::kDouble)),
        coef(at::empty({4, weight.numel()}, opts.dtype(at::kDouble))),
        dweight(at::zeros({weight.numel()}, opts)), dbias(at::zeros_like(dweight)),
        eps(eps_) {}

  Bn<A> bn() const {
    return {table.const_data_ptr<A>(), table.size(1), coef.mutable_data_ptr<double>()};
  }

  // Its sums are the sum_g-th and sum_gz-th of the K; `sums`, if defined, is BnGrad::sums.
  BnGrad<A> grad(int sum_g, int sum_gz, const Tensor& sums = {}) const {
    return {sum_g, sum_gz, dweight.mutable_data_ptr<A>(), dbias.mutable_data_ptr<A>(),
            table.const_data_ptr<A>(),
            mean64.defined() ? mean64.const_data_ptr<double>() : nullptr,
            var64.const_data_ptr<double>(), eps,
            sums.defined() ? sums.mutable_data_ptr<double>() : nullptr,
            coef.mutable_data_ptr<double>()};
  }
};

// Adds the P partials of each channel (double, a warp per channel); for
// each of the `nbn` BNs writes dbias = sum(g), dweight = rstd sum(g (z - mean))
// and the coefficients k2, k3 of Bn::input_grad (zero in eval, and for an
// empty batch).
template <int K, typename A>
__global__ void grad_finalize_kernel(const double* part, int64_t P, int64_t C, double M,
                                     bool training, int nbn, BnGrad<A> bn0, BnGrad<A> bn1) {
  const int lane = threadIdx.x & 31;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kFinalizeWarps) + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warps
  double s[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    s[k] = 0;
    for (int64_t p = lane; p < P; p += 32) s[k] += part[(k * P + p) * C + c];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s[k] += __shfl_down_sync(0xffffffffu, s[k], o);
  }
  if (lane != 0) return;
  for (int j = 0; j < nbn; ++j) {
    const BnGrad<A>& b = j == 0 ? bn0 : bn1;
    double sg = 0, sgc = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {  // constant indices keep s[] in registers
      if (k == b.sum_g) sg = s[k];
      if (k == b.sum_gz) sgc = s[k];
    }
    // sum(g (z - mean)) about the double mean: the reduction took it about
    // the rounded kMean, off by mean_lo; over few values r is large, and that
    // offset made dweight err 7x the composite's (2 values a channel)
    // (an infinite mean or sum(g) leaves it: 0 * inf would make it NaN;
    // x - x == 0 is false exactly for inf and NaN)
    if (b.mean != nullptr && b.mean[c] - b.mean[c] == 0.0 && sg - sg == 0.0)
      sgc -= (b.mean[c] - static_cast<double>(b.table[kMean * C + c])) * sg;
    const double r = 1.0 / sqrt(b.var[c] + b.eps);
    const double wr = static_cast<double>(b.table[kWeight * C + c]) * r;
    const double sgz = r * sgc;  // sum(g z_hat)
    if (b.sums != nullptr) {
      b.sums[c] = sg;
      b.sums[C + c] = sgc;
    }
    b.dbias[c] = static_cast<A>(sg);
    b.dweight[c] = static_cast<A>(sgz);
    const bool batch = training && M > 0;
    b.coef64[c] = wr;
    b.coef64[C + c] = batch ? -wr * r * sgz / M : 0.0;
    b.coef64[2 * C + c] = batch ? -wr * sg / M : 0.0;
    b.coef64[3 * C + c] =
        b.mean != nullptr ? b.mean[c] : static_cast<double>(b.table[kMean * C + c]);
  }
}

// ----------------------------------------------------------------- pointwise

// f.apply(n, c, s) for every V-lane vector, grid-stride over the tensor in
// memory order ([n][c][s/V] in NCHW, [n][s][c/V] in channels_last).
template <bool CL, int V, typename F>
__global__ void __launch_bounds__(kThreads)
pointwise_kernel(F f, int64_t N, int64_t C, int64_t S) {
  const int64_t D0 = (CL ? C : S) / V, D1 = CL ? S : C, total = N * D1 * D0;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (start >= total) return;
  Walker3 w(start, step, D0, D1);
  for (int64_t i = start; i < total; i += step, w.advance()) {
    if (CL)
      f.apply(w.i2, w.i0 * V, w.i1);
    else
      f.apply(w.i2, w.i1, w.i0 * V);
  }
}

template <bool CL, int V, typename F>
void pointwise(const F& f, const Geometry& g) {
  const int64_t total = g.N * g.C * g.S / V;
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 8LL * sm_count());
  launch(pointwise_kernel<CL, V, F>, dim3(blocks), dim3(kThreads), current_stream(), f, g.N, g.C,
         g.S);
}

// A forward's one pass: F<T, A, V, CL>{acts..., bn0, bn1}.apply at every
// vector, V = vec_width<T>() where every act allows it (vectorizable), else 1.
template <template <typename, typename, int, bool> class F, typename T, typename A,
          typename... P>
void forward_pass(const Geometry& g, const Bn<A>& bn0, const Bn<A>& bn1, const Act<P>&... acts) {
  dispatch_layout<T>(g.cl, vectorizable<T>(g, acts...), [&](auto cl, auto v) {
    pointwise<cl(), v()>(F<T, A, v(), cl()>{acts..., bn0, bn1}, g);
  });
}

// A backward's two passes over f = F<T, A, V, CL>{acts..., bn0, bn1, training}: the
// reduction of f's K values (in double: as the cpu backend's sums, and float partials
// of g (z - mean) erred up to 10x the composite's where a BatchNorm runs over two
// values) and its finalize for the first nbn of grad0, grad1; then f.apply at every
// vector, which reads the coefficients the finalize wrote (same stream).
template <int K, template <typename, typename, int, bool> class F, typename T, typename A,
          typename... E>  // not P: GCC 12 mistakes plan.P below for the pack
void backward_pass(const Geometry& g, const at::TensorOptions& opts, bool training, int nbn,
                   const BnGrad<A>& grad0, const BnGrad<A>& grad1, const Bn<A>& bn0,
                   const Bn<A>& bn1, const Act<E>&... acts) {
  if (g.C == 0) return;  // nothing to reduce or apply; dweight, dbias stay zero
  const cudaStream_t stream = current_stream();
  dispatch_layout<T>(g.cl, vectorizable<T>(g, acts...), [&](auto cl, auto v) {
    using Fn = F<T, A, v(), cl()>;
    const Fn f{acts..., bn0, bn1, training};
    const Plan plan = reduction_plan(g, v());
    Tensor part = at::empty({K, plan.P, g.C}, opts.dtype(at::kDouble));
    if constexpr (cl()) {
      launch(reduce_cl_kernel<K, v(), double, Fn>, dim3(plan.groups, plan.P),
             dim3(plan.bx, plan.by), stream, f, g.N, g.C, g.S, part.mutable_data_ptr<double>());
    } else {
      launch(reduce_nchw_kernel<K, v(), double, Fn>, dim3(g.C, plan.P), dim3(kThreads), stream,
             f, g.N, g.C, g.S, part.mutable_data_ptr<double>());
    }
    launch(grad_finalize_kernel<K, A>, finalize_grid(g.C), dim3(kThreads), stream,
           part.const_data_ptr<double>(), plan.P, g.C, static_cast<double>(g.count()), training,
           nbn, grad0, grad1);
    pointwise<cl(), v()>(f, g);
  });
}

// ----------------------------------------------------------------- input checks (host)

inline void check_activation(const char* name, const Tensor& t, const Tensor& like,
                             bool same_nhw_only = false) {
  TORCH_CHECK(on_device(t), "resfuse_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "resfuse_cuda: ", name, " must be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "resfuse_cuda: ", name, " is on ", t.device(),
              " but the op's first input is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "resfuse_cuda: ", name, " has dtype ",
              t.scalar_type(), " but the op's first input has ", like.scalar_type());
  if (same_nhw_only) {
    TORCH_CHECK(t.size(0) == like.size(0) && t.size(2) == like.size(2) &&
                    t.size(3) == like.size(3),
                "resfuse_cuda: ", name, " has shape ", t.sizes(),
                "; its batch and spatial sizes must match ", like.sizes());
  } else {
    TORCH_CHECK(t.sizes() == like.sizes(), "resfuse_cuda: ", name, " has shape ", t.sizes(),
                " but must match the op's first input ", like.sizes());
  }
}

inline void check_first(const char* name, const Tensor& t) {
  TORCH_CHECK(on_device(t), "resfuse_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "resfuse_cuda: ", name, " must be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resfuse_cuda: ", name,
              " must be floating point, got ", t.scalar_type());
  // Grids put channels on blockIdx.x; H * W bounds the per-channel walkers.
  TORCH_CHECK(t.size(1) < (int64_t(1) << 31) && t.size(2) * t.size(3) < (int64_t(1) << 31),
              "resfuse_cuda: C and H * W must each be below 2^31, got ", t.sizes());
}

// check_channels(C, like, "weight_h", weight_h, "bias_h", bias_h, ...): each
// named tensor holds C floating-point values on like's device.
inline void check_channels(int64_t, const Tensor&) {}

template <typename... Rest>
void check_channels(int64_t C, const Tensor& like, const char* name, const Tensor& t,
                    const Rest&... rest) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "resfuse_cuda: ", name, " must have shape (", C,
              ",), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resfuse_cuda: ", name,
              " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "resfuse_cuda: ", name, " is on ", t.device(),
              " but the activations are on ", like.device());
  check_channels(C, like, rest...);
}

}  // namespace resfuse_cuda
