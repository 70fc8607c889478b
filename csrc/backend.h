// The fused kernels' entry points, declared once for every compiled
// backend: csrc/cpu/ops.h and csrc/cuda/ops.h include this file inside
// their namespace (resfuse_cpu, resfuse_cuda), whose sources define them.
// Semantics, shapes and return values are those of the Python backend
// interface (resfuse_kernels/ops/composite.py): forward returns
// (y, mean, var, mean_k, var_k) with the statistics used (biased batch ones
// in training, copies of the running ones in eval); backward returns the
// gradients of every tensor input and BN affine parameter. Without the
// carry (x absent) its outputs are empty tensors.
//
// Each signature is spelled once, as a macro that the definitions use too
// (`RESFUSE_RESFUSE_TAIL_FORWARD(resfuse_tail_forward) { ... }`), and the
// op schemas are inferred from it (RESFUSE_DEFINE_KERNELS): adding an
// argument is one edit here and one per body.
//
// No include guard and no includes: each backend's ops.h includes it once,
// in its namespace, after <ATen/core/Tensor.h>, <optional> and <tuple>.

using at::Tensor;
using Opt = std::optional<Tensor>;

#define RESFUSE_HIGHWAY_GATE_FORWARD(name) \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> name( \
    const Tensor& a_in, const Tensor& b_in, const Tensor& x_in, const Tensor& weight_h, \
    const Tensor& bias_h, const Opt& running_mean_h, \
    const Opt& running_var_h, const Tensor& weight_t, const Tensor& bias_t, \
    const Opt& running_mean_t, const Opt& running_var_t, \
    bool training, double eps_h, double eps_t)

#define RESFUSE_HIGHWAY_GATE_BACKWARD(name) \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> name( \
    const Tensor& grad_in, const Tensor& a_in, const Tensor& b_in, const Tensor& x_in, \
    const Tensor& weight_h, const Tensor& bias_h, const Tensor& mean_h, const Tensor& var_h, \
    const Tensor& weight_t, const Tensor& bias_t, const Tensor& mean_t, const Tensor& var_t, \
    bool training, double eps_h, double eps_t)

#define RESFUSE_RESFUSE_TAIL_FORWARD(name) \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> name( \
    const Tensor& u_in, const Tensor& h_in, const Tensor& weight_d, const Tensor& bias_d, \
    const Opt& running_mean_d, const Opt& running_var_d, \
    const Opt& x_in, const Opt& w, \
    const Opt& weight_k, const Opt& bias_k, \
    const Opt& running_mean_k, const Opt& running_var_k, \
    bool training, double eps_d, double eps_k)

#define RESFUSE_RESFUSE_TAIL_BACKWARD(name) \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> name( \
    const Tensor& grad_in, const Tensor& u_in, const Tensor& h_in, const Tensor& weight_d, \
    const Tensor& bias_d, const Tensor& mean_d, const Tensor& var_d, \
    const Opt& x_in, const Opt& w, \
    const Opt& weight_k, const Opt& bias_k, \
    const Tensor& mean_k, const Tensor& var_k, bool training, double eps_d, double eps_k)

RESFUSE_HIGHWAY_GATE_FORWARD(highway_gate_forward);
RESFUSE_HIGHWAY_GATE_BACKWARD(highway_gate_backward);
RESFUSE_RESFUSE_TAIL_FORWARD(resfuse_tail_forward);
RESFUSE_RESFUSE_TAIL_BACKWARD(resfuse_tail_backward);

// Registers these four kernels, inside a TORCH_LIBRARY block `m`, as the ops
// <library>::<name> for dispatch key `key` (resfuse_cpu::* on CPU,
// resfuse_cuda::* on CUDA, the tests' resfuse_cuda_emu::* on CPU). Their
// schemas are inferred from the signatures above; the arguments are unnamed
// there (_0, _1, ...), as the Python layer passes them by position.
#define RESFUSE_DEFINE_KERNEL(m, key, name) m.def(#name, torch::dispatch(key, &name))
#define RESFUSE_DEFINE_KERNELS(m, key)                  \
  RESFUSE_DEFINE_KERNEL(m, key, highway_gate_forward);  \
  RESFUSE_DEFINE_KERNEL(m, key, highway_gate_backward); \
  RESFUSE_DEFINE_KERNEL(m, key, resfuse_tail_forward);  \
  RESFUSE_DEFINE_KERNEL(m, key, resfuse_tail_backward)
