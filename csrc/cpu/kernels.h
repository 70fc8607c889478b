// Building blocks of the fused CPU kernels: the tensor geometry, vector
// loads/stores with conversion, per-channel reductions and elementwise
// passes, both over NCHW and channels_last memory.
//
// Arithmetic is in acc_t = at::opmath_type<scalar_t> (float for
// bf16/fp16/fp32, double for fp64) on at::vec::Vectorized<acc_t>; per-channel
// sums add every contribution in double, and the batch statistics are tile
// moments merged in double (batch_stats), so both are accurate even for
// large activations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../layout.h"

namespace resfuse_cpu {

using at::Tensor;

using resfuse::Geometry;

// `t` dense in the geometry's memory format (a copy only if it is not).
inline Tensor dense(const Tensor& t, const Geometry& g) {
  return t.contiguous(g.format());
}

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;
template <typename scalar_t>
using Vec = at::vec::Vectorized<acc_t<scalar_t>>;

// 8 bf16/fp16 values <-> 8 floats in one AVX2 register: a full vector of a
// 16-bit storage type converts in a few instructions, not 8 scalar casts.
// Both directions round to nearest even, as c10's scalar conversions do.
template <typename scalar_t>
inline __m256 widen8(const scalar_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    return _mm256_cvtph_ps(raw);
  }
}

template <typename scalar_t>
inline void narrow8(scalar_t* p, __m256 v) {
  __m128i packed;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    // NaN stays NaN (the rounding carry could turn a NaN payload into Inf).
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), nan);
    const __m256i high = _mm256_srli_epi32(rounded, 16);  // each <= 0xffff: packus is exact
    packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  } else {
    packed = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename scalar_t>
constexpr bool fast16 = (std::is_same_v<scalar_t, at::BFloat16> ||
                         std::is_same_v<scalar_t, at::Half>) &&
                        at::vec::Vectorized<float>::size() == 8;

// Load `count` (<= Vec::size()) elements, converting to acc_t; missing
// lanes are zero.
template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* p, int64_t count) {
  using A = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, A>) {
    return Vec<scalar_t>::loadu(p, count);
  } else {
    if constexpr (fast16<scalar_t>) {
      if (count == Vec<scalar_t>::size()) return Vec<scalar_t>(widen8(p));
    }
    alignas(64) A tmp[Vec<scalar_t>::size()] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<A>(p[i]);
    return Vec<scalar_t>::loadu(tmp);
  }
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vec<scalar_t>& v, int64_t count) {
  using A = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, A>) {
    v.store(p, count);
  } else {
    if constexpr (fast16<scalar_t>) {
      if (count == Vec<scalar_t>::size()) return narrow8(p, static_cast<__m256>(v));
    }
    alignas(64) A tmp[Vec<scalar_t>::size()];
    v.store(tmp);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// Per-channel parameters (acc_t arrays of length C) for the lanes starting
// at run position `pos`: a broadcast in NCHW, a load in channels_last.
template <typename A>
inline at::vec::Vectorized<A> channel_param(const A* p, const Geometry& g, int64_t c,
                                            int64_t pos, int64_t count) {
  using V = at::vec::Vectorized<A>;
  return g.cl ? V::loadu(p + pos, count) : V(p[c]);
}

// ---------------------------------------------------------------- double lanes
//
// The double-precision steps (input gradients, the carry's double v) work on
// an acc_t vector as Halves<A> vectors of 4 doubles: 2 for float (AVX2's 8
// lanes), 1 for double.
using Vec64 = at::vec::Vectorized<double>;
template <typename A>
constexpr int kHalves = at::vec::Vectorized<A>::size() / Vec64::size();
template <typename A>
using Halves = std::array<Vec64, kHalves<A>>;

// How many of the n lanes of a group fall in half j.
inline int64_t half_lanes(int64_t n, int j) {
  return std::clamp<int64_t>(n - j * Vec64::size(), 0, Vec64::size());
}

template <typename A>
inline Halves<A> widen(const at::vec::Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
    static_assert(at::vec::Vectorized<float>::size() == 8 && Vec64::size() == 4, "AVX2");
    const __m256 v = x;
    return {Vec64(_mm256_cvtps_pd(_mm256_castps256_ps128(v))),
            Vec64(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))};
  } else {
    return {x};
  }
}

// Each lane rounded once to acc_t.
template <typename A>
inline at::vec::Vectorized<A> narrow(const Halves<A>& d) {
  if constexpr (std::is_same_v<A, float>) {
    return at::vec::Vectorized<float>(
        _mm256_set_m128(_mm256_cvtpd_ps(d[1]), _mm256_cvtpd_ps(d[0])));
  } else {
    return d[0];
  }
}

// z - mean in double for the n lanes of a double tensor at p (per-channel
// means as channel_param's); lanes at and beyond n are 0.
template <typename A>
inline Halves<A> centred_lanes(const double* p, const double* mean, const Geometry& g, int64_t c,
                               int64_t pos, int64_t n) {
  Halves<A> d;
  for (int j = 0; j < kHalves<A>; ++j) {
    const int64_t m = half_lanes(n, j), first = j * Vec64::size();
    d[j] = m > 0 ? Vec64::loadu(p + first, m) - channel_param(mean, g, c, pos + first, m)
                 : Vec64(0);
  }
  return d;
}

// 1 / (1 + exp(-z)), NaN for NaN as torch.sigmoid: exp_u20 clamps its
// argument with min/max, which drop a NaN (sigmoid(NaN) came out 0, and a
// NaN gate input gave y = x, a whole channel of it in training).
template <typename V>
inline V sigmoid(const V& z) {
  const V one(1);
  return V::blendv(one / (one + z.neg().exp_u20()), z, z.isnan());
}

// g * (z - m) as hi + lo, with hi + lo = g (z - m) up to lo's own rounding:
// the difference by TwoSum, the product by TwoProduct (an FMA). Summed in
// double (channel_sums), sum(g (z - m)) is then as PyTorch's CPU BatchNorm
// takes it, differences and products in double: where the sum cancels (a
// BatchNorm over few values) a float32 product's rounding made dweight err
// 5x PyTorch's in a trained block.
template <typename V>
inline void product_of_difference(const V& g, const V& z, const V& m, V& hi, V& lo) {
  const V d = z - m;
  const V back = d - z;  // TwoSum of z and -m: z - m = d + err exactly
  const V err = (z - (d - back)) - (m + back);
  hi = g * d;
  lo = at::vec::fmsub(g, d, hi) + g * err;
  lo = V::blendv(lo, V(0), (hi - hi) != V(0));  // hi +-Inf or NaN: it alone, as PyTorch
}

// Elementwise pass: f(offset, pos, c, count) for every group of up to
// Vec::size() consecutive elements; `offset` indexes the dense buffers,
// `pos` is the position within the run and `c` the run's channel (NCHW).
template <typename scalar_t, typename F>
void for_each_vector(const Geometry& g, const F& f) {
  const int64_t len = g.run_length(), width = Vec<scalar_t>::size();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(len, 1));
  at::parallel_for(0, g.runs(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = g.cl ? 0 : r % g.C;
      for (int64_t pos = 0; pos < len; pos += width)
        f(r * len + pos, pos, c, std::min(width, len - pos));
    }
  });
}

// Per-channel sums of K quantities over N and S. f(offset, pos, c, count,
// out) writes the K contributions of a group of lanes into out[0..K);
// lanes at and beyond `count` must be zero (use Vec::set). Returns K
// vectors of C doubles.
//
// Every contribution is added in double, as PyTorch's CPU BatchNorm
// accumulates: float partials of ~100 values a lane made the batch mean of
// 2 x 33 x 33 values 18x less accurate than PyTorch's (2.7e-8 against
// 3.3e-9 at a mean of ~0.02).
template <int K, typename scalar_t, typename F>
std::array<std::vector<double>, K> channel_sums(const Geometry& g, const F& f) {
  using V = Vec<scalar_t>;
  using A = acc_t<scalar_t>;
  const int64_t width = V::size();
  std::array<std::vector<double>, K> total;
  for (auto& t : total) t.assign(g.C, 0.0);
  if (g.count() == 0 || g.C == 0) return total;

  // The runs are split into one contiguous chunk per thread, read in memory
  // order (the hardware prefetchers lose a stream at every 4 KiB page, so
  // hopping between the runs of one channel would be latency bound). Each
  // chunk keeps double sums per channel, merged at the end.
  const int64_t runs = g.runs(), chunks = std::min<int64_t>(at::get_num_threads(), runs);
  std::vector<std::array<std::vector<double>, K>> partial(chunks, total);  // zeros

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) A lanes[V::size()];
    alignas(64) double folded[V::size()];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      auto& mine = partial[chunk];
      const int64_t r0 = runs * chunk / chunks, r1 = runs * (chunk + 1) / chunks;
      const int64_t len = g.run_length();
      for (int64_t r = r0; r < r1; ++r) {
        // NCHW: a run is one channel of one image, summed lane-wise and
        // folded into its channel at its end. channels_last: a run is one
        // pixel across the channels, each lane a channel.
        if (g.cl) {
          for (int64_t pos = 0; pos < len; pos += width) {
            const int64_t count = std::min(width, len - pos);
            V out[K];
            f(r * len + pos, pos, 0, count, out);
            for (int k = 0; k < K; ++k) {
              out[k].store(lanes);
              double* s = mine[k].data() + pos;
              for (int64_t i = 0; i < count; ++i) s[i] += lanes[i];
            }
          }
          continue;
        }
        // Lane sums in registers, in double (a float vector's lanes widened:
        // the additions a scalar loop over the lanes makes, in order); sums in
        // a stack array made each run a chain of store-to-load round trips.
        const int64_t c = r % g.C;
        Halves<A> sums[K];
        for (auto& s : sums) s.fill(Vec64(0));
        for (int64_t pos = 0; pos < len; pos += width) {
          V out[K];
          f(r * len + pos, pos, c, std::min(width, len - pos), out);
          for (int k = 0; k < K; ++k) {
            const Halves<A> d = widen<A>(out[k]);
            for (int j = 0; j < kHalves<A>; ++j) sums[k][j] = sums[k][j] + d[j];
          }
        }
        for (int k = 0; k < K; ++k) {
          for (int j = 0; j < kHalves<A>; ++j) sums[k][j].store(folded + j * Vec64::size());
          for (int64_t i = 0; i < width; ++i) mine[k][c] += folded[i];
        }
      }
    }
  });
  for (const auto& mine : partial)
    for (int k = 0; k < K; ++k)
      for (int64_t c = 0; c < g.C; ++c) total[k][c] += mine[k][c];
  return total;
}

// ---------------------------------------------------------------- batch statistics
//
// The one statistics algorithm of every backend (docs/ops.md): the values of
// a channel are cut into tiles; each tile's moments (count, mean, M2) come
// from two passes over it (its mean, then the squared deviations from that
// mean); tiles merge by Chan's formula. Here both passes and the merges are
// in double and a tile (at most kTileValues values) stays in L1 between its
// passes, so memory is read once; the CUDA kernels merge V-value tiles and
// the Triton ones register slots the same way, in their accumulation type.

struct Moments {
  double n = 0, mean = 0, m2 = 0;  // count, mean, sum of squared deviations
};

// a <- the moments of a's values and b's (Chan, Golub and LeVeque). Equal
// means differ by 0, the same infinity included: a channel of +Inf keeps
// the mean +Inf (inf - inf would make it NaN), as PyTorch's sum does.
inline void merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const double n = a.n + b.n, w = b.n / n;
  const double d = b.mean == a.mean ? 0.0 : b.mean - a.mean;
  a.mean += d * w;
  a.m2 += b.m2 + d * d * a.n * w;
  a.n = n;
}

constexpr int64_t kTileValues = 4096;  // 16 KiB of float32: one tile in L1
constexpr int kLanes = 8;              // independent double accumulators (vectorised)

// Moments of len > 0 contiguous values (a tile of one channel, NCHW).
template <typename scalar_t>
Moments tile_moments(const scalar_t* p, int64_t len) {
  double s[kLanes] = {}, sum = 0;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += static_cast<double>(p[i + l]);
  for (; i < len; ++i) sum += static_cast<double>(p[i]);
  for (int l = 0; l < kLanes; ++l) sum += s[l];
  const double mean = sum / static_cast<double>(len);
  double q[kLanes] = {}, m2 = 0;
  for (i = 0; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = static_cast<double>(p[i + l]) - mean;
      q[l] += d * d;
    }
  for (; i < len; ++i) {
    const double d = static_cast<double>(p[i]) - mean;
    m2 += d * d;
  }
  for (int l = 0; l < kLanes; ++l) m2 += q[l];
  return {static_cast<double>(len), mean, m2};
}

// Moments of `rows` pixels x C channels (channels_last), per channel, merged
// into out[0..C); sum and q are scratch of C doubles.
template <typename scalar_t>
void tile_moments_cl(const scalar_t* p, int64_t rows, int64_t C, double* sum, double* q,
                     Moments* out) {
  std::fill(sum, sum + C, 0.0);
  std::fill(q, q + C, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<double>(p[r * C + c]);
  for (int64_t c = 0; c < C; ++c) sum[c] /= static_cast<double>(rows);  // now the means
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(p[r * C + c]) - sum[c];
      q[c] += d * d;
    }
  for (int64_t c = 0; c < C; ++c) merge(out[c], Moments{static_cast<double>(rows), sum[c], q[c]});
}

// Batch mean and biased variance of one activation, per channel, in double
// (the ops' statistics dtype for every storage dtype, unrounded). The runs
// are split into chunks as channel_sums's (which says why); the chunks'
// moments merge in chunk order at the end.
template <typename scalar_t>
std::pair<Tensor, Tensor> batch_stats(const Tensor& t, const Geometry& g) {
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  const int64_t runs = g.runs(), len = g.run_length();
  const int64_t chunks = g.count() == 0 || g.C == 0
                             ? 0 : std::min<int64_t>(at::get_num_threads(), runs);
  std::vector<std::vector<Moments>> partial(chunks, std::vector<Moments>(g.C));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(g.cl ? g.C : 0), q(sum.size());
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      Moments* mine = partial[chunk].data();
      const int64_t r0 = runs * chunk / chunks, r1 = runs * (chunk + 1) / chunks;
      if (g.cl) {  // a run is one pixel: a tile is a block of pixels
        const int64_t rows = std::max<int64_t>(1, kTileValues / g.C);
        for (int64_t r = r0; r < r1; r += rows)
          tile_moments_cl(p + r * len, std::min(rows, r1 - r), g.C, sum.data(), q.data(), mine);
      } else {  // a run is one channel of one image: tiles along it
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t pos = 0; pos < len; pos += kTileValues)
            merge(mine[r % g.C], tile_moments(p + r * len + pos, std::min(kTileValues, len - pos)));
      }
    }
  });
  auto opts = t.options().dtype(at::kDouble);
  Tensor mean = at::zeros({g.C}, opts), var = at::zeros({g.C}, opts);
  double* m = mean.mutable_data_ptr<double>();
  double* v = var.mutable_data_ptr<double>();
  for (int64_t c = 0; c < g.C && chunks > 0; ++c) {
    Moments total;
    for (const auto& mine : partial) merge(total, mine[c]);
    m[c] = total.mean;
    v[c] = total.m2 / total.n;
  }
  return {mean, var};
}

// A (C,) tensor of any floating dtype as doubles, read in place: a
// conversion through ATen ops cost about a microsecond of host time each,
// a few per BatchNorm, where the kernels of a small call take tens.
inline std::vector<double> channel_vector(const Tensor& t) {
  std::vector<double> out(t.numel());
  RESFUSE_DISPATCH(t.scalar_type(), "channel_vector", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t c = 0; c < out.size(); ++c) out[c] = static_cast<double>(p[c * t.stride(0)]);
  });
  return out;
}

// BatchNorm as (z - mean) * scale + bias, scale = weight * rstd and
// rstd = 1 / sqrt(var + eps); rstd64 is rstd unrounded, for the backward's
// per-channel coefficients, and mean_lo the part of the (double) mean that
// `mean` rounds off, for its sums. z - mean is formed first: folded
// into z * scale + (bias - mean * scale), the two terms cancel where the
// mean is large against the spread (b at -0.71 with a spread of 0.005 lost
// 1e-5 of the gate's input, and db erred 10x PyTorch's).
template <typename A>
struct Affine {
  using V = at::vec::Vectorized<A>;
  std::vector<A> scale, bias, mean;
  std::vector<double> rstd64, mean_lo;

  Affine(const Tensor& weight, const Tensor& bias_t, const Tensor& mean_t, const Tensor& var_t,
         double eps) {
    auto w = channel_vector(weight), b = channel_vector(bias_t);
    auto m = channel_vector(mean_t), v = channel_vector(var_t);
    const size_t C = w.size();
    scale.resize(C), bias.resize(C), mean.resize(C), rstd64.resize(C), mean_lo.resize(C);
    for (size_t c = 0; c < C; ++c) {
      const double r = 1.0 / std::sqrt(v[c] + eps);
      rstd64[c] = r;
      mean[c] = static_cast<A>(m[c]);
      mean_lo[c] = std::isfinite(m[c]) ? m[c] - static_cast<double>(mean[c]) : 0.0;
      scale[c] = static_cast<A>(w[c] * r);
      bias[c] = static_cast<A>(b[c]);
    }
  }

  // BN(z) for a group of lanes (channel_param's c, pos, n).
  V apply(const V& z, const Geometry& g, int64_t c, int64_t pos, int64_t n) const {
    return at::vec::fmadd(z - channel_param(mean.data(), g, c, pos, n),
                          channel_param(scale.data(), g, c, pos, n),
                          channel_param(bias.data(), g, c, pos, n));
  }

  // A group of lanes' terms of the backward's sums: out[0] = g (0 at and
  // beyond lane n) and out[1], out[2] = g (z - mean) by product_of_difference.
  // Flattened: GCC otherwise calls Vectorized<float>::set out of line here.
  __attribute__((flatten)) void grad_sums(const V& g, const V& z, const Geometry& geo, int64_t c,
                                          int64_t pos, int64_t n, V* out) const {
    const V m = channel_param(mean.data(), geo, c, pos, n);
    out[0] = g;
    product_of_difference(g, V::set(V(0), z, n), V::set(V(0), m, n), out[1], out[2]);
  }
};

}  // namespace resfuse_cpu
