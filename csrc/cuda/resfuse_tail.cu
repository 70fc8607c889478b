// resfuse::resfuse_tail on CUDA: y = relu(BN_d(u) + h [+ BN_k(W x)]); the
// math is in resfuse_kernels/ops/resfuse_tail.py.
//
// Launch plan (M = N*H*W values per channel, P partial blocks per channel):
//   forward, training:
//     [carry] v = W x         ATen matmul (cuBLAS), product dtype, op layout  reads x; writes v
//     stats(u) [, stats(v)]   reduce (C or C/bx, P) + finalize (C) each    reads u [, v]
//     [carry] v - mean(v)     ATen, rounded to the acc dtype (`centred`)   reads v; writes it
//     bn_params d [, k]       (C)
//     apply                   pointwise: y = relu(...)                     reads u, h [, v]; writes y
//   forward, eval: copies of the running statistics, then as above.
//   backward:
//     [carry] v - mean(v)     matmul again (recomputed, not saved), the forward's mean
//     bn_params d [, k]       (C)
//     sums                    reduce: sum g, g u_hat [, g v_hat]           reads dy, u, h [, v]
//                             and dh = g = dy [z > 0]                       writes dh
//                             + finalize: dweight/dbias, coefficients k2, k3
//     apply                   pointwise: du [, dv] from g = dh             reads dh, u [, v]
//     [carry] dx = W^T dv,  dW = sum_{n,s} dv x^T       two matmuls, product dtype
// z is recomputed by the sums pass only; g is exact in the storage dtype (dy
// or 0), so the apply pass reads it back from dh instead of dy and h.
#include <ATen/ops/matmul.h>
#include <ATen/TensorOperators.h>

#include "bn.cuh"
#include "ops.h"

namespace resfuse_cuda {
namespace {

// z = BN_d(u) + h [+ BN_k(v)] per lane at (n, c, s), with the loaded u and v
// and both BNs' lanes (v and lk only with the carry: v.p != nullptr).
template <bool CL, int V, typename T, typename A>
__device__ __forceinline__ void tail_z(const Act<const T>& u, const Act<const T>& h,
                                       const Act<const A>& v, const Bn<A>& bn_d,
                                       const Bn<A>& bn_k, int64_t n, int64_t c, int64_t s,
                                       A (&z)[V], A (&uv)[V], A (&vv)[V], BnLanes<A, V>& ld,
                                       BnLanes<A, V>& lk) {
  A hv[V];
  load<V>(at_<CL>(u, n, c, s), uv);
  load<V>(at_<CL>(h, n, c, s), hv);
  ld = bn_d.template lanes<V, CL>(c);
  const bool carry = v.p != nullptr;
  if (carry) {
    load<V>(at_<CL>(v, n, c, s), vv);
    lk = bn_k.template lanes<V, CL>(c);
  }
#pragma unroll
  for (int l = 0; l < V; ++l) {
    z[l] = ld.affine(uv[l], l) + hv[l];
    if (carry) z[l] = z[l] + lk.affine(vv[l], l);
  }
}

template <typename T, typename A, int V, bool CL>
struct TailForward {
  Act<const T> u, h;
  Act<const A> v;  // v.p == nullptr without the carry
  Act<T> y;
  Bn<A> bn_d, bn_k;

  __device__ __forceinline__ void apply(int64_t n, int64_t c, int64_t s) const {
    A z[V], uv[V], vv[V];
    BnLanes<A, V> ld, lk;
    tail_z<CL, V>(u, h, v, bn_d, bn_k, n, c, s, z, uv, vv, ld, lk);
#pragma unroll
    for (int l = 0; l < V; ++l) z[l] = relu(z[l]);
    store<V>(at_<CL>(y, n, c, s), z);
  }
};

template <typename T, typename A, int V, bool CL>
struct TailBackward {
  Act<const T> g, u, h;
  Act<const A> v;  // v.p == nullptr without the carry
  Act<T> du, dh;
  Act<A> dv;
  Bn<A> bn_d, bn_k;
  bool training;

  // The three sums' terms: g, g (u - mean_d), g v (v centred; 0 without the
  // carry), with g = dy [z > 0] (the mask multiplies, so NaN in dy
  // propagates); writes dh = g.
  __device__ __forceinline__ void operator()(int64_t n, int64_t c, int64_t s,
                                             double (&out)[3][V]) const {
    A gm[V], z[V], uv[V], vv[V];
    BnLanes<A, V> ld, lk;
    load<V>(at_<CL>(g, n, c, s), gm);
    tail_z<CL, V>(u, h, v, bn_d, bn_k, n, c, s, z, uv, vv, ld, lk);
#pragma unroll
    for (int l = 0; l < V; ++l) gm[l] = gm[l] * positive(z[l]);
    store<V>(at_<CL>(dh, n, c, s), gm);
    const bool carry = v.p != nullptr;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      out[0][l] = gm[l];
      out[1][l] = static_cast<double>(gm[l]) * ld.centred(uv[l], l);
      out[2][l] = carry ? static_cast<double>(gm[l]) * lk.centred(vv[l], l) : 0.0;
    }
  }

  // du [, dv] from g = dh (written by the sums pass) and u [, v]; no dv
  // where dv.p is nullptr (the host forms it in double: carry_input_grad).
  __device__ __forceinline__ void apply(int64_t n, int64_t c, int64_t s) const {
    A gm[V], uv[V], vv[V], duv[V], dvv[V];
    load<V>(at_<CL>(dh, n, c, s), gm);
    load<V>(at_<CL>(u, n, c, s), uv);
    const bool carry = v.p != nullptr && dv.p != nullptr;
    if (carry) load<V>(at_<CL>(v, n, c, s), vv);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      duv[l] = bn_d.input_grad(gm[l], uv[l], CL ? c + l : c, training);
      if (carry) dvv[l] = bn_k.input_grad(gm[l], vv[l], CL ? c + l : c, training);
    }
    store<V>(at_<CL>(du, n, c, s), duv);
    if (carry) store<V>(at_<CL>(dv, n, c, s), dvv);
  }
};

// x in the product dtype, dense in the op's layout, and W as (K, Cx).
std::pair<Tensor, Tensor> carry_operands(const Tensor& x, const Tensor& w, const Geometry& g,
                                         at::ScalarType prod) {
  return {x.to(prod).contiguous(g.format()), w.reshape({w.size(0), w.size(1)}).to(prod)};
}

// v = W x as an (N, K, H, W) tensor in the op's layout, through cuBLAS:
// NCHW is K x Cx times Cx x S per image, channels_last one (N*S) x Cx times
// Cx x K product. The backward's dx = W^T dv is carry_product(dv, W^T).
Tensor carry_product(const Tensor& xa, const Tensor& w2, const Geometry& g) {
  const int64_t K = w2.size(0), Cx = w2.size(1), H = xa.size(2), W = xa.size(3);
  if (g.cl) {
    Tensor v = at::matmul(xa.permute({0, 2, 3, 1}).reshape({g.N * g.S, Cx}), w2.t());
    return v.view({g.N, H, W, K}).permute({0, 3, 1, 2});
  }
  return at::matmul(w2, xa.reshape({g.N, Cx, g.S})).view({g.N, K, H, W});
}

// dv = k1 g + k2 (v - m) + k3 (Bn::input_grad) with every term and
// coefficient in double, from g = dh, the centred v in double and the raw
// sums (sum(g), sum(g (v - m))) grad_finalize kept: where BN_k runs over
// few values the three terms cancel to a small part of their size, and
// float32 terms made dW err 7x the composite's. The cpu backend forms the
// same terms in its apply pass (InputGrad::apply64). In eval k1 g alone.
Tensor carry_input_grad(const Tensor& gm, const Tensor& centred64, const Tensor& weight,
                        const Tensor& var, double eps, const Tensor& sums, double count,
                        bool training, const Geometry& g) {
  const Tensor r = (var.to(at::kDouble) + eps).sqrt().reciprocal();
  const Tensor wr = weight.to(at::kDouble) * r;
  Tensor dz = gm.to(at::kDouble) * wr.view({1, -1, 1, 1});
  if (training && count > 0) {
    const Tensor k2 = -wr * r * (r * sums[1]) / count, k3 = -wr * sums[0] / count;
    dz = dz + (centred64 * k2.view({1, -1, 1, 1}) + k3.view({1, -1, 1, 1}));
  }
  return fit(dz, g);
}

// v - centre (per channel, in v's dtype) rounded once to `acc`, in g's
// layout: the kernels normalise it with mean 0. Centred before rounding:
// at a mean far from the spread, v itself rounded to float32 loses the
// digits of v - mean(v) that BatchNorm magnifies.
Tensor centred(const Tensor& v, const Tensor& centre, const Geometry& g, at::ScalarType acc) {
  return fit((v - centre.view({1, -1, 1, 1})).to(acc), g);
}

void check_tail(const Tensor& u, const Tensor& h, const Tensor& weight_d, const Tensor& bias_d,
                const Opt& x, const Opt& w, const Opt& weight_k, const Opt& bias_k) {
  check_first("u", u);
  check_activation("h", h, u);
  const int64_t C = u.size(1);
  check_channels(C, u, "weight_d", weight_d, "bias_d", bias_d);
  if (!x.has_value()) return;
  TORCH_CHECK(w.has_value() && weight_k.has_value() && bias_k.has_value(),
              "resfuse_cuda: the carry needs x, w, weight_k and bias_k together");
  check_activation("x", *x, u, /*same_nhw_only=*/true);
  TORCH_CHECK(w->device() == u.device() && at::isFloatingType(w->scalar_type()),
              "resfuse_cuda: w must be a floating-point tensor on ", u.device());
  TORCH_CHECK((w->dim() == 2 || (w->dim() == 4 && w->size(2) == 1 && w->size(3) == 1)) &&
                  w->size(0) == C && w->size(1) == x->size(1),
              "resfuse_cuda: w must have shape (", C, ", ", x->size(1), ") or (", C, ", ",
              x->size(1), ", 1, 1), got ", w->sizes());
  check_channels(C, u, "weight_k", *weight_k, "bias_k", *bias_k);
}

}  // namespace

RESFUSE_RESFUSE_TAIL_FORWARD(resfuse_tail_forward) {
  check_tail(u_in, h_in, weight_d, bias_d, x_in, w, weight_k, bias_k);
  const DeviceGuard guard(u_in.device());
  const bool carry = x_in.has_value();
  const Geometry g = Geometry::of(u_in);
  const Tensor u = fit(u_in, g), h = fit(h_in, g);
  Tensor y = at::empty(u_in.sizes(), u_in.options().memory_format(g.format()));
  return RESFUSE_DISPATCH(u.scalar_type(), "tail_fwd", [&] {
    using A = acc_t<scalar_t>;
    Tensor v, prm_k, mean_k, var_k;
    const auto [mean_d, var_d] = stats_or_running<scalar_t>(u, g, training, running_mean_d,
                                                            running_var_d);
    const Tensor prm_d = bn_params<A>(mean_d, var_d, weight_d, bias_d, eps_d);
    if (carry) {
      auto [xp, w2] = carry_operands(*x_in, *w, g, resfuse::product_type(u.scalar_type()));
      const Tensor vp = fit(carry_product(xp, w2, g), g);
      std::tie(mean_k, var_k) = AT_DISPATCH_FLOATING_TYPES(vp.scalar_type(), "carry_stats", [&] {
        return stats_or_running<scalar_t>(vp, g, training, running_mean_k, running_var_k);
      });
      v = centred(vp, mean_k.to(vp.scalar_type()), g, c10::CppTypeToScalarType<A>::value);
      prm_k = bn_params<A>(at::zeros_like(var_k), var_k, *weight_k, *bias_k, eps_k);  // v centred
    } else {
      for (Tensor* t : {&mean_k, &var_k}) *t = at::empty({0}, u.options().dtype(at::kDouble));
    }
    const Bn<A> bn_d{prm_d.const_data_ptr<A>(), g.C};
    const Bn<A> bn_k{carry ? prm_k.const_data_ptr<A>() : nullptr, g.C};
    forward_pass<TailForward, scalar_t>(g, bn_d, bn_k, act<const scalar_t>(u, g),
                                        act<const scalar_t>(h, g), act<const A>(v, g),
                                        act<scalar_t>(y, g));
    return std::make_tuple(y, mean_d, var_d, mean_k, var_k);
  });
}

RESFUSE_RESFUSE_TAIL_BACKWARD(resfuse_tail_backward) {
  check_tail(u_in, h_in, weight_d, bias_d, x_in, w, weight_k, bias_k);
  check_activation("grad_y", grad_in, u_in);
  const int64_t C = u_in.size(1);
  check_channels(C, u_in, "mean_d", mean_d, "var_d", var_d);
  const bool carry = x_in.has_value();
  if (carry) check_channels(C, u_in, "mean_k", mean_k, "var_k", var_k);
  const DeviceGuard guard(u_in.device());
  const Geometry g = Geometry::of(u_in);
  const Tensor u = fit(u_in, g), h = fit(h_in, g), gy = fit(grad_in, g);
  const auto act_opts = u_in.options().memory_format(g.format());
  Tensor du = at::empty(u_in.sizes(), act_opts), dh = at::empty(u_in.sizes(), act_opts);
  return RESFUSE_DISPATCH(u.scalar_type(), "tail_bwd", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const auto opts = u.options().dtype(acc);
    Tensor xa, w2, v, dv, vc64, sums_k;
    // dv in double where the product is (float32/float64 storage), as the cpu backend's
    const bool dv_double = carry && resfuse::product_type(u.scalar_type()) == at::kDouble;
    const BnBackward<A> bd(mean_d, var_d, weight_d, bias_d, eps_d, opts);
    std::optional<BnBackward<A>> bk;
    if (carry) {
      std::tie(xa, w2) = carry_operands(*x_in, *w, g, resfuse::product_type(u.scalar_type()));
      const Tensor vp = fit(carry_product(xa, w2, g), g);
      // BN_k's mean and variance as the forward took them, in double (the
      // batch's of the same v in training): over few values dv cancels to
      // eps / (var + eps) of its terms, and a float32 variance made dW err
      // 6.6x the composite's (the emulation's soak, 2 values a channel)
      const Tensor centre = mean_k.to(vp.scalar_type());
      v = centred(vp, centre, g, acc);
      if (dv_double) {
        vc64 = fit(vp - centre.view({1, -1, 1, 1}), g);
        sums_k = at::zeros({2, C}, opts.dtype(at::kDouble));
      } else {
        dv = at::empty(u_in.sizes(), opts.memory_format(g.format()));
      }
      bk.emplace(/*mean: v is centred*/ Tensor(), var_k, *weight_k, *bias_k, eps_k, opts);
    }
    const Bn<A> bn_k = carry ? bk->bn() : Bn<A>{nullptr, C};
    const BnGrad<A> grad_d = bd.grad(0, 1), grad_k = carry ? bk->grad(0, 2, sums_k) : grad_d;
    backward_pass<3, TailBackward, scalar_t>(
        g, opts, training, carry ? 2 : 1, grad_d, grad_k, bd.bn(), bn_k,
        act<const scalar_t>(gy, g), act<const scalar_t>(u, g), act<const scalar_t>(h, g),
        act<const A>(v, g), act<scalar_t>(du, g), act<scalar_t>(dh, g), act<A>(dv, g));
    const Tensor du_out = du.contiguous(resfuse::format_of(u_in));
    const Tensor dh_out = dh.contiguous(resfuse::format_of(h_in));
    if (!carry) {  // the carry's four gradients are empty tensors, as the composite's
      const Tensor none = at::empty({0}, u_in.options());
      return std::make_tuple(du_out, dh_out, bd.dweight.to(weight_d.scalar_type()),
                             bd.dbias.to(bias_d.scalar_type()), none, none.clone(), none.clone(),
                             none.clone());
    }
    Tensor dvp;
    if (dv_double) {
      // sum(g (v - m)) again in double from the double v, as the cpu
      // backend's: the kernel's float v rounds each v - m, which the
      // cancellation above amplifies
      sums_k[1].copy_((dh.to(at::kDouble) * vc64).sum({0, 2, 3}));
      bk->dweight = ((bk->var64 + eps_k).rsqrt() * sums_k[1]).to(bk->dweight.scalar_type());
      dvp = carry_input_grad(dh, vc64, *weight_k, bk->var64, eps_k, sums_k,
                             static_cast<double>(g.count()), training, g);
    } else {
      dvp = dv.to(xa.scalar_type());
    }
    const Tensor dw = resfuse::carry_weight_grad(dvp, xa, g), dx = carry_product(dvp, w2.t(), g);
    return std::make_tuple(du_out, dh_out, bd.dweight.to(weight_d.scalar_type()),
                           bd.dbias.to(bias_d.scalar_type()),
                           dx.to(x_in->scalar_type()).contiguous(resfuse::format_of(*x_in)),
                           dw.reshape(w->sizes()).to(w->scalar_type()),
                           bk->dweight.to(weight_k->scalar_type()),
                           bk->dbias.to(bias_k->scalar_type()));
  });
}

}  // namespace resfuse_cuda
