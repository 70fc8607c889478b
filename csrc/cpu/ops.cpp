// The `cpu` backend: fused CPU kernels of resfuse::highway_gate and
// resfuse::resfuse_tail, forward and backward, registered as the internal
// ops resfuse_cpu::* (the Python layer in resfuse_kernels/_ext_cpu.py
// puts them behind the public ops' schema, autograd and checks).
//
// Passes over memory (M = N*H*W values per channel):
//   highway forward, training: stats(a, b) | y = H*T + x*(1-T)        2 passes
//   highway backward:          sums(g_h, g_h*a_hat, g_t, g_t*b_hat) | da, db, dx
//   tail forward, training:    stats(u) | y = relu(...)               2 passes
//   tail backward:             sums(g, g*u_hat [, g*v_hat]), dh = g | du [, dv]
// In eval the statistics pass disappears. The carry's 1x1 products v = W x
// and dx = W^T dv, and dW = dv x^T, go through ATen's matmuls in
// product_type (csrc/layout.h: double, float for bf16/fp16 storage); v is
// held in double: its statistics are batch_stats of it, the fused passes
// centre it in double (centred_lanes), and the apply pass writes dv in double.
// The math is in the Python ops' docstrings.
#include "ops.h"

#include <torch/library.h>

#include "kernels.h"

namespace resfuse_cpu {
namespace {

// Training statistics or copies of the running ones, in double: the ops'
// statistics dtype (resfuse_kernels/ops/_common.py, STATS_DTYPE), which the
// backward's coefficients take unrounded (Affine::rstd64).
template <typename scalar_t>
std::pair<Tensor, Tensor> stats_or_running(const Tensor& t, const Geometry& g, bool training,
                                           const Opt& running_mean, const Opt& running_var) {
  if (training) return batch_stats<scalar_t>(t, g);
  return {running_mean->to(at::kDouble, false, true), running_var->to(at::kDouble, false, true)};
}

// Coefficients of a BN input gradient dz = k1 * g + k2 * (z - m) + k3 (per
// channel) from sum_g = sum(g) and sum_gz = sum(g * z_hat):
//   training: dz = w r (g - sum_g / M - z_hat sum_gz / M), z_hat = (z - m) r
//   eval:     dz = w r g
// (z - m) is formed first: folding m into k3 would cancel catastrophically
// when the mean is large against the spread.
template <typename A>
struct InputGrad {
  std::vector<double> k1, k2, k3, mean;  // in double: see apply
  bool batch;  // the batch-statistics terms (k2, k3) are there
  InputGrad(const Tensor& weight, const Affine<A>& bn, const std::vector<double>& sum_g,
            const std::vector<double>& sum_gz, double count, bool training)
      : batch(training && count > 0) {
    auto w = channel_vector(weight);
    const size_t C = w.size();
    k1.resize(C), k2.assign(C, 0), k3.assign(C, 0), mean.resize(C);
    for (size_t c = 0; c < C; ++c) {
      const double r = bn.rstd64[c], wr = w[c] * r;
      k1[c] = wr;
      if (batch) k2[c] = -wr * r * sum_gz[c] / count, k3[c] = -wr * sum_g[c] / count;
      mean[c] = static_cast<double>(bn.mean[c]) + bn.mean_lo[c];
    }
  }
  // dz for a group of lanes, given g and z, in double and rounded once: over
  // few values a channel the three terms cancel to eps / (var + eps) of
  // their size, and float32 terms and coefficients made da err 15x the
  // composite's at two values (CUDA-emulation soak seed 4108258873: 4.7e-6;
  // 5.7e-8 in double). In eval k1 g alone: 0 * (z - m) would make an
  // infinite z's gradient NaN where PyTorch's (and the composite's) is finite.
  at::vec::Vectorized<A> apply(const Geometry& geo, int64_t c, int64_t pos, int64_t n,
                               const at::vec::Vectorized<A>& g,
                               const at::vec::Vectorized<A>& z) const {
    const Halves<A> gd = widen<A>(g), zd = widen<A>(z);
    Halves<A> dz;
    for (int j = 0; j < kHalves<A>; ++j) dz[j] = formula(geo, c, pos, n, j, gd[j], zd[j]);
    return narrow<A>(dz);
  }
  // The same for a z given in double (the carry's centred v), kept in
  // double: dv, the input of the double products dx = W^T dv and dW.
  void apply64(double* out, const Geometry& geo, int64_t c, int64_t pos, int64_t n,
               const at::vec::Vectorized<A>& g, const Halves<A>& z) const {
    const Halves<A> gd = widen<A>(g);
    for (int j = 0; j < kHalves<A>; ++j) {
      const int64_t m = half_lanes(n, j);
      if (m > 0) formula(geo, c, pos, n, j, gd[j], z[j]).store(out + j * Vec64::size(), m);
    }
  }

 private:
  // k1 g [+ (k2 (z - m) + k3)] in double for half j of the n lanes at (c, pos).
  Vec64 formula(const Geometry& geo, int64_t c, int64_t pos, int64_t n, int j, const Vec64& g,
                const Vec64& z) const {
    const int64_t m = half_lanes(n, j), first = pos + j * Vec64::size();
    if (m == 0) return Vec64(0);
    const auto k1v = channel_param(k1.data(), geo, c, first, m);
    if (!batch) return k1v * g;
    return at::vec::fmadd(k1v, g,
                          at::vec::fmadd(channel_param(k2.data(), geo, c, first, m),
                                         z - channel_param(mean.data(), geo, c, first, m),
                                         channel_param(k3.data(), geo, c, first, m)));
  }
};

// sum(g z_hat) = rstd sum(g (z - m)), in double, from the hi and lo sums of
// product_of_difference about the rounded mean and sum_g = sum(g): less
// mean_lo sum(g) for the double mean. Over few values rstd is large, and the
// rounded mean's offset made dweight_h err 7x the composite's (2 values).
// An infinite sum(g) leaves the sum as it is (0 * inf would make it NaN).
template <typename A>
std::vector<double> centred_sum(const std::vector<double>& hi, const std::vector<double>& lo,
                                const std::vector<double>& sum_g, const Affine<A>& bn) {
  std::vector<double> out(hi.size());
  for (size_t c = 0; c < hi.size(); ++c) {
    const double shift = std::isfinite(sum_g[c]) ? bn.mean_lo[c] * sum_g[c] : 0.0;
    out[c] = bn.rstd64[c] * (hi[c] + lo[c] - shift);
  }
  return out;
}

// v as a (C,) tensor of like's dtype (rounded once, as ATen's conversion).
Tensor channel_tensor(const std::vector<double>& v, const Tensor& like) {
  Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options());
  RESFUSE_DISPATCH(out.scalar_type(), "channel_tensor", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < v.size(); ++c) p[c] = static_cast<scalar_t>(v[c]);
  });
  return out;
}

}  // namespace

// ---------------------------------------------------------------- highway

RESFUSE_HIGHWAY_GATE_FORWARD(highway_gate_forward) {
  const Geometry g = Geometry::of(a_in);
  Tensor a = dense(a_in, g), b = dense(b_in, g), x = dense(x_in, g);
  Tensor y = at::empty_like(a, a.options().memory_format(g.format()));
  Tensor mean_h, var_h, mean_t, var_t;
  RESFUSE_DISPATCH(a.scalar_type(), "highway_fwd", [&] {
    using A = acc_t<scalar_t>;
    using V = Vec<scalar_t>;
    std::tie(mean_h, var_h) = stats_or_running<scalar_t>(a, g, training, running_mean_h, running_var_h);
    std::tie(mean_t, var_t) = stats_or_running<scalar_t>(b, g, training, running_mean_t, running_var_t);
    const Affine<A> bn_h(weight_h, bias_h, mean_h, var_h, eps_h);
    const Affine<A> bn_t(weight_t, bias_t, mean_t, var_t, eps_t);
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>(),
                   *px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    for_each_vector<scalar_t>(g, [&](int64_t off, int64_t pos, int64_t c, int64_t n) {
      const V h = at::vec::maximum(bn_h.apply(load(pa + off, n), g, c, pos, n), V(0));
      const V t = sigmoid(bn_t.apply(load(pb + off, n), g, c, pos, n));
      const V xv = load(px + off, n);
      // H T + x (1 - T) in that form, not x + T (H - x): an infinite x
      // gives inf - inf = NaN in the latter, +-Inf (as PyTorch) here.
      store(py + off, at::vec::fmadd(h, t, xv * (V(1) - t)), n);
    });
  });
  return {y, mean_h, var_h, mean_t, var_t};
}

RESFUSE_HIGHWAY_GATE_BACKWARD(highway_gate_backward) {
  const Geometry g = Geometry::of(a_in);
  Tensor a = dense(a_in, g), b = dense(b_in, g), x = dense(x_in, g), gy = dense(grad_in, g);
  Tensor da = at::empty_like(a), db = at::empty_like(a), dx = at::empty_like(a);
  Tensor dweight_h, dbias_h, dweight_t, dbias_t;
  RESFUSE_DISPATCH(a.scalar_type(), "highway_bwd", [&] {
    using A = acc_t<scalar_t>;
    using V = Vec<scalar_t>;
    const Affine<A> bn_h(weight_h, bias_h, mean_h, var_h, eps_h);
    const Affine<A> bn_t(weight_t, bias_t, mean_t, var_t, eps_t);
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>(),
                   *px = x.const_data_ptr<scalar_t>(), *pg = gy.const_data_ptr<scalar_t>();
    // Recomputes H, T and the gradients g_h, g_t at the pre-activations;
    // returns (a, b, g_h, g_t, dx).
    auto gates = [&](int64_t off, int64_t pos, int64_t c, int64_t n) {
      const V av = load(pa + off, n), bv = load(pb + off, n);
      const V pre_h = bn_h.apply(av, g, c, pos, n);
      const V h = at::vec::maximum(pre_h, V(0));
      const V t = sigmoid(bn_t.apply(bv, g, c, pos, n));
      const V gv = load(pg + off, n), xv = load(px + off, n);
      const V gt_ = gv * t;
      return std::array<V, 5>{av, bv, V::blendv(V(0), gt_, pre_h > V(0)),
                              gt_ * (h - xv) * (V(1) - t), gv - gt_};
    };
    // sums of g_h, g_h (a - m_h) (hi, lo), g_t, g_t (b - m_t) (hi, lo)
    auto sums = channel_sums<6, scalar_t>(g, [&](int64_t off, int64_t pos, int64_t c, int64_t n, V* out) {
      const auto [av, bv, gh, gt, dxv] = gates(off, pos, c, n);
      bn_h.grad_sums(V::set(V(0), gh, n), av, g, c, pos, n, out);
      bn_t.grad_sums(V::set(V(0), gt, n), bv, g, c, pos, n, out + 3);
    });
    const double M = static_cast<double>(g.count());
    const auto sum_gh = centred_sum(sums[1], sums[2], sums[0], bn_h);
    const auto sum_gt = centred_sum(sums[4], sums[5], sums[3], bn_t);
    const InputGrad<A> in_h(weight_h, bn_h, sums[0], sum_gh, M, training);
    const InputGrad<A> in_t(weight_t, bn_t, sums[3], sum_gt, M, training);
    scalar_t *pda = da.mutable_data_ptr<scalar_t>(), *pdb = db.mutable_data_ptr<scalar_t>(),
             *pdx = dx.mutable_data_ptr<scalar_t>();
    for_each_vector<scalar_t>(g, [&](int64_t off, int64_t pos, int64_t c, int64_t n) {
      const auto [av, bv, gh, gt, dxv] = gates(off, pos, c, n);
      store(pda + off, in_h.apply(g, c, pos, n, gh, av), n);
      store(pdb + off, in_t.apply(g, c, pos, n, gt, bv), n);
      store(pdx + off, dxv, n);
    });
    dbias_h = channel_tensor(sums[0], bias_h);
    dweight_h = channel_tensor(sum_gh, weight_h);
    dbias_t = channel_tensor(sums[3], bias_t);
    dweight_t = channel_tensor(sum_gt, weight_t);
  });
  return {da.contiguous(resfuse::format_of(a_in)), db.contiguous(resfuse::format_of(b_in)),
          dx.contiguous(resfuse::format_of(x_in)), dweight_h, dbias_h, dweight_t, dbias_t};
}

// ---------------------------------------------------------------- ResFuse tail

namespace {

// out = M t per pixel (t: (N, C, H, W) dense in g's layout, M: (K, C) or
// (K, C, 1, 1)), in the layout of t, as `out` values: the carry's v = W x,
// and dx = W^T dv in its backward. The product is taken in `prod`
// (product_type; t and M are converted, no copy if they have it) and rounded
// once: BatchNorm over a few values multiplies v's rounding by rstd_v (large
// where a channel's values nearly agree), and a float32 product's rounding
// made the carry's gradients err up to 12x PyTorch's (whose single-threaded
// 1x1 convolution rounds about half as much as a float32 matmul) at
// BatchNorm over three values. A bmm per image for NCHW (M broadcast over
// the images: at::matmul would fold them and copy t to (N, H*W, C)), one
// matmul over the pixels for channels_last.
Tensor pixel_product(const Tensor& t, const Tensor& m, const Geometry& g, at::ScalarType prod,
                     at::ScalarType out) {
  const int64_t K = m.size(0), C = m.size(1);
  const Tensor tp = t.to(prod), mp = m.reshape({K, C}).to(prod);
  if (g.cl) {
    return at::mm(tp.permute({0, 2, 3, 1}).reshape({g.N * g.S, C}), mp.t())
        .to(out)
        .reshape({g.N, t.size(2), t.size(3), K})
        .permute({0, 3, 1, 2});
  }
  return at::bmm(mp.expand({g.N, K, C}), tp.reshape({g.N, C, g.S}))
      .to(out)
      .reshape({g.N, K, t.size(2), t.size(3)});
}

}  // namespace

RESFUSE_RESFUSE_TAIL_FORWARD(resfuse_tail_forward) {
  const Geometry g = Geometry::of(u_in);
  const bool carry = x_in.has_value();
  Tensor u = dense(u_in, g), h = dense(h_in, g);
  Tensor y = at::empty_like(u, u.options().memory_format(g.format()));
  Tensor mean_d, var_d, mean_k, var_k;
  RESFUSE_DISPATCH(u.scalar_type(), "tail_fwd", [&] {
    using A = acc_t<scalar_t>;
    using V = Vec<scalar_t>;
    Tensor v64;  // the carry's v = W x, held in double; BN_k's statistics from it
    if (carry) {
      v64 = pixel_product(dense(*x_in, g), *w, g, resfuse::product_type(u.scalar_type()),
                          at::kDouble);
      std::tie(mean_k, var_k) = stats_or_running<double>(v64, g, training, running_mean_k, running_var_k);
    } else {
      for (Tensor* t : {&mean_k, &var_k}) *t = at::empty({0}, u.options().dtype(at::kDouble));
    }
    const auto centre_k = channel_vector(mean_k);  // empty without the carry
    std::tie(mean_d, var_d) = stats_or_running<scalar_t>(u, g, training, running_mean_d, running_var_d);
    const Affine<A> bn_d(weight_d, bias_d, mean_d, var_d, eps_d);
    // v is centred: BN_k's mean is 0
    const Affine<A> bn_k =
        carry ? Affine<A>(*weight_k, *bias_k, at::zeros_like(var_k), var_k, eps_k) : bn_d;
    const scalar_t *pu = u.const_data_ptr<scalar_t>(), *ph = h.const_data_ptr<scalar_t>();
    const double* pv = carry ? v64.const_data_ptr<double>() : nullptr;
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    for_each_vector<scalar_t>(g, [&](int64_t off, int64_t pos, int64_t c, int64_t n) {
      V z = bn_d.apply(load(pu + off, n), g, c, pos, n) + load(ph + off, n);
      if (pv != nullptr) {
        const V vc = narrow<A>(centred_lanes<A>(pv + off, centre_k.data(), g, c, pos, n));
        z = z + bn_k.apply(vc, g, c, pos, n);
      }
      store(py + off, at::vec::maximum(z, V(0)), n);
    });
  });
  return {y, mean_d, var_d, mean_k, var_k};
}

RESFUSE_RESFUSE_TAIL_BACKWARD(resfuse_tail_backward) {
  const Geometry g = Geometry::of(u_in);
  const bool carry = x_in.has_value();
  Tensor u = dense(u_in, g), h = dense(h_in, g), gy = dense(grad_in, g);
  Tensor du = at::empty_like(u), dh = at::empty_like(u);
  Tensor dweight_d, dbias_d, dx, dw, dweight_k, dbias_k;
  RESFUSE_DISPATCH(u.scalar_type(), "tail_bwd", [&] {
    using A = acc_t<scalar_t>;
    using V = Vec<scalar_t>;
    // The carry: x in the products' dtype, v again as the forward formed
    // it and dv, both held in double and formed from BN_k's mean and
    // variance as the forward took them, unrounded: over few values a
    // channel dv cancels to eps / (var + eps) of its terms, and a float32
    // variance made dW err 6.6x the composite's (the CUDA emulation's soak,
    // 2 values). dv is rounded once into the products' dtype.
    const at::ScalarType prod = resfuse::product_type(u.scalar_type());
    Tensor xp, v64, dv64;
    if (carry) {
      xp = dense(*x_in, g).to(prod);
      v64 = pixel_product(xp, *w, g, prod, at::kDouble);
      dv64 = at::empty_like(v64);
    }
    const auto centre_k = channel_vector(mean_k);  // empty without the carry
    const Affine<A> bn_d(weight_d, bias_d, mean_d, var_d, eps_d);
    // v is centred: BN_k's mean is 0
    const Affine<A> bn_k =
        carry ? Affine<A>(*weight_k, *bias_k, at::zeros_like(var_k), var_k, eps_k) : bn_d;
    const scalar_t *pu = u.const_data_ptr<scalar_t>(), *ph = h.const_data_ptr<scalar_t>(),
                   *pg = gy.const_data_ptr<scalar_t>();
    const double* pv = carry ? v64.const_data_ptr<double>() : nullptr;
    scalar_t *pdu = du.mutable_data_ptr<scalar_t>(), *pdh = dh.mutable_data_ptr<scalar_t>();
    // The reduction pass recomputes z, forms g = dy [z > 0] and writes it as
    // dh (exact in the storage dtype: dy or 0); the apply pass reads it back
    // with u (and v) and never needs h or z again.
    // sums of g, g (u - m_d) (hi, lo), g (v - m_k) (hi, lo, rest): the
    // double v - m_k is the float vc plus its rest, and g vc is exact as
    // hi + lo, so sum(g (v - m_k)) is as exact as dv's other inputs. From
    // vc alone dW's worst error in the CUDA-emulation harness at two values
    // a channel was 0.49 of the tolerance rule's bound over 300 seeds (0.78
    // over 3,000), against 0.014 with the rest.
    // One instantiation with the carry, one without (its code compiled out).
    auto reduce = [&](auto with_carry) {
      return [&](int64_t off, int64_t pos, int64_t c, int64_t n, V* out) {
      const V uv = load(pu + off, n);
      V z = bn_d.apply(uv, g, c, pos, n) + load(ph + off, n);
      V vc(0), rest(0);
      if constexpr (decltype(with_carry)::value) {
        const Halves<A> vc64 = centred_lanes<A>(pv + off, centre_k.data(), g, c, pos, n);
        vc = narrow<A>(vc64);
        const Halves<A> back = widen<A>(vc);
        Halves<A> diff;
        for (int j = 0; j < kHalves<A>; ++j) diff[j] = vc64[j] - back[j];  // exact
        rest = narrow<A>(diff);
        rest = V::blendv(rest, V(0), rest != rest);  // inf - inf at an infinite v
        z = z + bn_k.apply(vc, g, c, pos, n);
      }
      const V gm = V::set(V(0), V::blendv(V(0), load(pg + off, n), z > V(0)), n);
      store(pdh + off, gm, n);
      bn_d.grad_sums(gm, uv, g, c, pos, n, out);
      if constexpr (decltype(with_carry)::value) {
        product_of_difference(gm, V::set(V(0), vc, n), V(0), out[3], out[4]);
        out[5] = gm * V::set(V(0), rest, n);
      }
      };
    };
    std::array<std::vector<double>, 6> sums;
    if (carry) {
      sums = channel_sums<6, scalar_t>(g, reduce(std::true_type{}));
    } else {
      auto plain = channel_sums<3, scalar_t>(g, reduce(std::false_type{}));
      for (int k = 0; k < 6; ++k) sums[k] = k < 3 ? std::move(plain[k]) : std::vector<double>(g.C);
    }
    const double M = static_cast<double>(g.count());
    const auto sum_gu = centred_sum(sums[1], sums[2], sums[0], bn_d);
    for (int64_t c = 0; c < g.C; ++c) sums[4][c] += sums[5][c];
    const auto sum_gv = centred_sum(sums[3], sums[4], sums[0], bn_k);
    const InputGrad<A> in_d(weight_d, bn_d, sums[0], sum_gu, M, training);
    const InputGrad<A> in_k(carry ? *weight_k : weight_d, bn_k, sums[0], sum_gv, M, training);
    double* pdv = carry ? dv64.mutable_data_ptr<double>() : nullptr;
    for_each_vector<scalar_t>(g, [&](int64_t off, int64_t pos, int64_t c, int64_t n) {
      const V gm = load(pdh + off, n);
      store(pdu + off, in_d.apply(g, c, pos, n, gm, load(pu + off, n)), n);
      if (pdv != nullptr)
        in_k.apply64(pdv + off, g, c, pos, n, gm,
                     centred_lanes<A>(pv + off, centre_k.data(), g, c, pos, n));
    });
    dbias_d = channel_tensor(sums[0], bias_d);
    dweight_d = channel_tensor(sum_gu, weight_d);
    if (carry) {
      const int64_t K = w->size(0), C = w->size(1);
      // dx = W^T dv per pixel, as the forward's product; dW = dv x^T in
      // the same dtype, for the same reason.
      const Tensor dvp = dv64.to(prod);
      dx = pixel_product(dvp, w->reshape({K, C}).t(), g, prod, x_in->scalar_type())
               .contiguous(resfuse::format_of(*x_in));
      dw = resfuse::carry_weight_grad(dvp, xp, g).reshape(w->sizes()).to(w->scalar_type());
      dbias_k = channel_tensor(sums[0], *bias_k);
      dweight_k = channel_tensor(sum_gv, *weight_k);
    } else {
      for (Tensor* t : {&dx, &dw, &dweight_k, &dbias_k}) *t = at::empty({0}, u.options());
    }
  });
  return {du.contiguous(resfuse::format_of(u_in)), dh.contiguous(resfuse::format_of(h_in)),
          dweight_d, dbias_d, dx, dw, dweight_k, dbias_k};
}

TORCH_LIBRARY(resfuse_cpu, m) {
  RESFUSE_DEFINE_KERNELS(m, c10::DispatchKey::CPU);
}

}  // namespace resfuse_cpu
