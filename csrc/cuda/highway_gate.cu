// resfuse::highway_gate on CUDA: y = H*T + x*(1-T), H = relu(BN_h(a)),
// T = sigmoid(BN_t(b)); the math is in resfuse_kernels/ops/highway_gate.py.
//
// Launch plan (M = N*H*W values per channel, P partial blocks per channel):
//   forward, training:
//     stats(a), stats(b)      2 x [reduce (C or C/bx, P) + finalize (C)]    reads a, b
//     bn_params h, t          2 x (C)
//     apply                   pointwise: y = H T + x (1 - T)              reads a, b, x; writes y
//   forward, eval: copies of the running statistics, bn_params, apply.
//   backward:
//     bn_params h, t          2 x (C)
//     sums                    reduce: sum g_h, g_h a_hat, g_t, g_t b_hat  reads g, a, b, x
//                             + finalize: dweight/dbias, coefficients k2, k3
//     apply                   pointwise: da, db, dx                       reads g, a, b, x
// H, T, a_hat, b_hat are recomputed in every pass, never stored.
#include "bn.cuh"
#include "ops.h"

namespace resfuse_cuda {
namespace {

template <typename T, typename A, int V, bool CL>
struct HighwayForward {
  Act<const T> a, b, x;
  Act<T> y;
  Bn<A> bn_h, bn_t;

  __device__ __forceinline__ void apply(int64_t n, int64_t c, int64_t s) const {
    A av[V], bv[V], xv[V], yv[V];
    load<V>(at_<CL>(a, n, c, s), av);
    load<V>(at_<CL>(b, n, c, s), bv);
    load<V>(at_<CL>(x, n, c, s), xv);
    const BnLanes<A, V> lh = bn_h.template lanes<V, CL>(c), lt = bn_t.template lanes<V, CL>(c);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const A h = relu(lh.affine(av[l], l));
      const A t = sigmoid(lt.affine(bv[l], l));
      yv[l] = h * t + xv[l] * (A(1) - t);
    }
    store<V>(at_<CL>(y, n, c, s), yv);
  }
};

// The backward's elementwise part, shared by the sums and the apply pass:
// for one lane, the gradients at the two pre-activations and at x.
template <typename A>
struct GateGrads {
  A g_h, g_t, dx;
};

template <typename A, int V>
__device__ __forceinline__ GateGrads<A> gate_grads(A g, A a, A b, A x, const BnLanes<A, V>& lh,
                                                   const BnLanes<A, V>& lt, int l) {
  const A h = relu(lh.affine(a, l));
  const A t = sigmoid(lt.affine(b, l));
  // dx = g (1 - T);  g_h = g T [H > 0];  g_t = g (H - x) T (1 - T)
  return {g * t * positive(h), g * (h - x) * t * (A(1) - t), g * (A(1) - t)};
}

template <typename T, typename A, int V, bool CL>
struct HighwayBackward {
  Act<const T> g, a, b, x;
  Act<T> da, db, dx;
  Bn<A> bn_h, bn_t;
  bool training;

  __device__ __forceinline__ void load_all(int64_t n, int64_t c, int64_t s, A (&gv)[V],
                                           A (&av)[V], A (&bv)[V], A (&xv)[V]) const {
    load<V>(at_<CL>(g, n, c, s), gv);
    load<V>(at_<CL>(a, n, c, s), av);
    load<V>(at_<CL>(b, n, c, s), bv);
    load<V>(at_<CL>(x, n, c, s), xv);
  }

  // The four sums' terms: g_h, g_h (a - mean_h), g_t, g_t (b - mean_t).
  __device__ __forceinline__ void operator()(int64_t n, int64_t c, int64_t s,
                                             double (&out)[4][V]) const {
    A gv[V], av[V], bv[V], xv[V];
    load_all(n, c, s, gv, av, bv, xv);
    const BnLanes<A, V> lh = bn_h.template lanes<V, CL>(c), lt = bn_t.template lanes<V, CL>(c);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const GateGrads<A> d = gate_grads(gv[l], av[l], bv[l], xv[l], lh, lt, l);
      out[0][l] = d.g_h;
      out[1][l] = static_cast<double>(d.g_h) * lh.centred(av[l], l);
      out[2][l] = d.g_t;
      out[3][l] = static_cast<double>(d.g_t) * lt.centred(bv[l], l);
    }
  }

  __device__ __forceinline__ void apply(int64_t n, int64_t c, int64_t s) const {
    A gv[V], av[V], bv[V], xv[V], dav[V], dbv[V], dxv[V];
    load_all(n, c, s, gv, av, bv, xv);
    const BnLanes<A, V> lh = bn_h.template lanes<V, CL>(c), lt = bn_t.template lanes<V, CL>(c);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const GateGrads<A> d = gate_grads(gv[l], av[l], bv[l], xv[l], lh, lt, l);
      dav[l] = bn_h.input_grad(d.g_h, av[l], CL ? c + l : c, training);
      dbv[l] = bn_t.input_grad(d.g_t, bv[l], CL ? c + l : c, training);
      dxv[l] = d.dx;
    }
    store<V>(at_<CL>(da, n, c, s), dav);
    store<V>(at_<CL>(db, n, c, s), dbv);
    store<V>(at_<CL>(dx, n, c, s), dxv);
  }
};

void check_inputs(const Tensor& a, const Tensor& b, const Tensor& x, const Tensor& weight_h,
                  const Tensor& bias_h, const Tensor& weight_t, const Tensor& bias_t) {
  check_first("a", a);
  check_activation("b", b, a);
  check_activation("x", x, a);
  check_channels(a.size(1), a, "weight_h", weight_h, "bias_h", bias_h, "weight_t", weight_t,
                 "bias_t", bias_t);
}

}  // namespace

RESFUSE_HIGHWAY_GATE_FORWARD(highway_gate_forward) {
  check_inputs(a_in, b_in, x_in, weight_h, bias_h, weight_t, bias_t);
  const DeviceGuard guard(a_in.device());
  const Geometry g = Geometry::of(a_in);
  const Tensor a = fit(a_in, g), b = fit(b_in, g), x = fit(x_in, g);
  Tensor y = at::empty(a_in.sizes(), a_in.options().memory_format(g.format()));
  return RESFUSE_DISPATCH(a.scalar_type(), "highway_fwd", [&] {
    using A = acc_t<scalar_t>;
    const auto [mean_h, var_h] = stats_or_running<scalar_t>(a, g, training, running_mean_h,
                                                            running_var_h);
    const auto [mean_t, var_t] = stats_or_running<scalar_t>(b, g, training, running_mean_t,
                                                            running_var_t);
    const Tensor prm_h = bn_params<A>(mean_h, var_h, weight_h, bias_h, eps_h);
    const Tensor prm_t = bn_params<A>(mean_t, var_t, weight_t, bias_t, eps_t);
    const Bn<A> bn_h{prm_h.const_data_ptr<A>(), g.C}, bn_t{prm_t.const_data_ptr<A>(), g.C};
    forward_pass<HighwayForward, scalar_t>(g, bn_h, bn_t, act<const scalar_t>(a, g),
                                           act<const scalar_t>(b, g), act<const scalar_t>(x, g),
                                           act<scalar_t>(y, g));
    return std::make_tuple(y, mean_h, var_h, mean_t, var_t);
  });
}

RESFUSE_HIGHWAY_GATE_BACKWARD(highway_gate_backward) {
  check_inputs(a_in, b_in, x_in, weight_h, bias_h, weight_t, bias_t);
  check_activation("grad_y", grad_in, a_in);
  check_channels(a_in.size(1), a_in, "mean_h", mean_h, "var_h", var_h, "mean_t", mean_t, "var_t",
                 var_t);
  const DeviceGuard guard(a_in.device());
  const Geometry g = Geometry::of(a_in);
  const Tensor a = fit(a_in, g), b = fit(b_in, g), x = fit(x_in, g), gy = fit(grad_in, g);
  const auto act_opts = a_in.options().memory_format(g.format());
  Tensor da = at::empty(a_in.sizes(), act_opts), db = at::empty(a_in.sizes(), act_opts),
         dx = at::empty(a_in.sizes(), act_opts);
  return RESFUSE_DISPATCH(a.scalar_type(), "highway_bwd", [&] {
    using A = acc_t<scalar_t>;
    const auto opts = a.options().dtype(c10::CppTypeToScalarType<A>::value);
    const BnBackward<A> bh(mean_h, var_h, weight_h, bias_h, eps_h, opts);
    const BnBackward<A> bt(mean_t, var_t, weight_t, bias_t, eps_t, opts);
    backward_pass<4, HighwayBackward, scalar_t>(
        g, opts, training, 2, bh.grad(0, 1), bt.grad(2, 3), bh.bn(), bt.bn(),
        act<const scalar_t>(gy, g), act<const scalar_t>(a, g), act<const scalar_t>(b, g),
        act<const scalar_t>(x, g), act<scalar_t>(da, g), act<scalar_t>(db, g),
        act<scalar_t>(dx, g));
    return std::make_tuple(
        da.contiguous(resfuse::format_of(a_in)), db.contiguous(resfuse::format_of(b_in)),
        dx.contiguous(resfuse::format_of(x_in)),
        bh.dweight.to(weight_h.scalar_type()), bh.dbias.to(bias_h.scalar_type()),
        bt.dweight.to(weight_t.scalar_type()), bt.dbias.to(bias_t.scalar_type()));
  });
}

bool kernels_runnable() {
#ifdef RESFUSE_CUDA_EMULATION
  return true;
#else
  cudaFuncAttributes attributes;
  // Fails (cudaErrorInvalidDeviceFunction or NoKernelImageForDevice) when
  // no image in the fatbinary fits the current device.
  if (cudaFuncGetAttributes(&attributes, bn_params_kernel<float>) == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear it: nothing else should see this error
  return false;
#endif
}

}  // namespace resfuse_cuda
