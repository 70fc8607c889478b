// C++ tests of the CPU kernels (ctest): every forward output and gradient
// against the formula written with ATen ops and differentiated by autograd,
// in float64, on fresh random data, both memory formats, train and eval,
// with and without the carry. Exits non-zero on the first mismatch.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ops.h"

namespace {

using at::Tensor;
int failures = 0;

void expect_close(const Tensor& got, const Tensor& want, const std::string& what) {
  const bool same_shape = got.sizes() == want.sizes();
  double err = 0, scale = 1;
  if (same_shape && want.numel() > 0) {
    err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
    scale = std::max(1.0, want.abs().max().item<double>());
  }
  const bool ok = same_shape && err <= 1e-9 * scale;
  std::printf("%s %-55s max error %.3g\n", ok ? "ok  " : "FAIL", what.c_str(), err);
  failures += !ok;
}

Tensor act(std::vector<int64_t> shape, bool channels_last, double mean = 0) {
  auto t = torch::randn(shape, torch::kDouble) + mean;
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

// Every BatchNorm of an op has its own eps (the two of each op differ), so a
// kernel that uses one BatchNorm's eps for the other fails.
struct BN {
  Tensor weight, bias, mean, var;
  double eps;
  BN(int64_t c, double eps)
      : weight(1 + 0.5 * torch::randn({c}, torch::kDouble)),
        bias(0.5 * torch::randn({c}, torch::kDouble)),
        mean(0.2 * torch::randn({c}, torch::kDouble)),
        var(0.5 + torch::rand({c}, torch::kDouble)),
        eps(eps) {}
  // The reference BatchNorm; running statistics untouched (momentum 0).
  Tensor operator()(const Tensor& z, const Tensor& w, const Tensor& b, bool training) const {
    return at::batch_norm(z, w, b, mean.clone(), var.clone(), training, 0.0, eps, false);
  }
};

std::vector<Tensor> leaves(std::vector<Tensor> ts) {
  for (auto& t : ts) t = t.detach().clone().requires_grad_();
  return ts;
}

void test_highway(bool channels_last, bool training) {
  const std::string tag = std::string("highway ") + (channels_last ? "CL " : "NCHW ") +
                          (training ? "train" : "eval");
  const int64_t C = 5;
  BN bh(C, 1e-3), bt(C, 0.1);
  auto in = leaves({act({3, C, 4, 5}, channels_last), act({3, C, 4, 5}, channels_last),
                    act({3, C, 4, 5}, channels_last), bh.weight, bh.bias, bt.weight, bt.bias});
  auto H = torch::relu(bh(in[0], in[3], in[4], training));
  auto T = torch::sigmoid(bt(in[1], in[5], in[6], training));
  auto y_ref = H * T + in[2] * (1 - T);
  auto gy = torch::randn_like(y_ref);
  auto grads_ref = torch::autograd::grad({y_ref}, in, {gy});

  auto [y, mh, vh, mt, vt] = resfuse_cpu::highway_gate_forward(
      in[0].detach(), in[1].detach(), in[2].detach(), bh.weight, bh.bias, bh.mean, bh.var,
      bt.weight, bt.bias, bt.mean, bt.var, training, bh.eps, bt.eps);
  expect_close(y, y_ref, tag + " y");
  auto grads = resfuse_cpu::highway_gate_backward(
      gy, in[0].detach(), in[1].detach(), in[2].detach(), bh.weight, bh.bias, mh, vh,
      bt.weight, bt.bias, mt, vt, training, bh.eps, bt.eps);
  const char* names[] = {"da", "db", "dx", "dweight_h", "dbias_h", "dweight_t", "dbias_t"};
  std::vector<Tensor> got = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                             std::get<3>(grads), std::get<4>(grads), std::get<5>(grads),
                             std::get<6>(grads)};
  for (size_t i = 0; i < got.size(); ++i) expect_close(got[i], grads_ref[i], tag + " " + names[i]);
}

void test_tail(bool channels_last, bool training, bool carry) {
  const std::string tag = std::string("tail ") + (channels_last ? "CL " : "NCHW ") +
                          (training ? "train" : "eval") + (carry ? " carry" : "");
  const int64_t K = 6, C = 4;
  BN bd(K, 0.1), bk(K, 1e-3);
  auto w = torch::randn({K, C, 1, 1}, torch::kDouble);
  auto in = leaves({act({2, K, 3, 5}, channels_last), act({2, K, 3, 5}, channels_last),
                    bd.weight, bd.bias, act({2, C, 3, 5}, channels_last, 50.0), w, bk.weight,
                    bk.bias});
  auto z = bd(in[0], in[2], in[3], training) + in[1];
  if (carry) z = z + bk(at::conv2d(in[4], in[5]), in[6], in[7], training);
  auto y_ref = torch::relu(z);
  auto gy = torch::randn_like(y_ref);
  std::vector<Tensor> wrt(in.begin(), in.begin() + (carry ? 8 : 4));
  auto grads_ref = torch::autograd::grad({y_ref}, wrt, {gy});

  using Opt = std::optional<Tensor>;
  Opt x = carry ? Opt(in[4].detach()) : std::nullopt, wk = carry ? Opt(w) : std::nullopt;
  Opt gk = carry ? Opt(bk.weight) : std::nullopt, bk_ = carry ? Opt(bk.bias) : std::nullopt;
  Opt mk = carry ? Opt(bk.mean) : std::nullopt, vk = carry ? Opt(bk.var) : std::nullopt;
  auto [y, md, vd, mk_used, vk_used] = resfuse_cpu::resfuse_tail_forward(
      in[0].detach(), in[1].detach(), bd.weight, bd.bias, bd.mean, bd.var, x, wk, gk, bk_, mk,
      vk, training, bd.eps, bk.eps);
  expect_close(y, y_ref, tag + " y");
  auto grads = resfuse_cpu::resfuse_tail_backward(gy, in[0].detach(), in[1].detach(), bd.weight,
                                                  bd.bias, md, vd, x, wk, gk, bk_, mk_used,
                                                  vk_used, training, bd.eps, bk.eps);
  const char* names[] = {"du", "dh", "dweight_d", "dbias_d", "dx", "dw", "dweight_k", "dbias_k"};
  std::vector<Tensor> got = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                             std::get<3>(grads), std::get<4>(grads), std::get<5>(grads),
                             std::get<6>(grads), std::get<7>(grads)};
  for (size_t i = 0; i < wrt.size(); ++i) expect_close(got[i], grads_ref[i], tag + " " + names[i]);
  if (!carry) {
    for (size_t i = 4; i < got.size(); ++i)
      expect_close(got[i], torch::empty({0}, torch::kDouble), tag + " " + names[i] + " empty");
  }
}

}  // namespace

int main() {
  // A fixed seed unless RESFUSE_TEST_SEED says otherwise (CI is deterministic).
  const char* given = std::getenv("RESFUSE_TEST_SEED");
  const uint64_t seed = given && *given ? std::strtoull(given, nullptr, 10) : 20261201;
  torch::manual_seed(seed);
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  for (bool cl : {false, true})
    for (bool training : {true, false}) {
      test_highway(cl, training);
      for (bool carry : {false, true}) test_tail(cl, training, carry);
    }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
