// Relative-perceptual-L1 loss of "Perceptual Image Anomaly Detection" (Tuluptceva et al. 2019),
// §3.1, eq. (3)-(4), as a fused PyTorch op: what the CPU (rel_perc_l1.cpp) and CUDA
// (rel_perc_l1_cuda.cu) kernels share.
//
//   fx~ = (fx - mean) / std,  fy~ = (fy - mean) / std                                  eq. (3)
//   loss[n] = sum |fx~ - fy~| / (sum |fx~| + eps)   (sums over C and spatial)         eq. (4)
//
// Reduced-precision features (bf16 from --precision bf16, half) are read as they are; the sums
// and the loss are in acc_t (float): the loss has dtype acc_t, the gradients the features' dtype.
//
// The denominator depends on fx only and is a constant in backward (as in the authors' code):
//   d loss[n] / d fx = sign(fx - fy) / std[c] / (den[n] + eps),   d loss / d fy = -(that).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>

namespace piad {

template <typename T>
using acc_t = at::opmath_type<T>;  // float for float/half/bfloat16, double for double

// Memory order of the features as the kernels read them: N samples of K elements each, either
// planar (N, C, S contiguous: element i of a sample has channel i / S) or interleaved
// (channels_last, N, S, C dense: channel i % C). A unit is a run of elements that the kernels
// handle together: one channel (S elements) when planar, one pixel (C elements) when interleaved.
struct Layout {
  int64_t N = 0, C = 0, S = 0, K = 0;
  bool interleaved = false;
  C10_HOST_DEVICE int64_t channel(int64_t i) const { return interleaved ? i % C : i / S; }
};

// The checked inputs as the kernels read them: x, y in the kernels' order (channels_last fx read
// in place, `permuted`: x = fx.movedim(1, -1), interleaved; else made contiguous, planar; fy
// follows fx's order), mean and 1/std (eq. (3)) in acc_t.
struct Inputs {
  at::Tensor x, y, mean, inv;
  Layout l;
  bool permuted = false;
  // A tensor in the kernels' order (e.g. at::empty_like(x)) seen in fx's shape (as the fake kernel).
  at::Tensor as_fx(const at::Tensor& t) const { return permuted ? t.movedim(-1, 1) : t; }
};

// grad: the upstream gradient of shape (N,) for the backward, undefined for the forward.
inline Inputs prepare(const at::Tensor& grad, const at::Tensor& fx, const at::Tensor& fy,
                      const at::Tensor& mean, const at::Tensor& std, double eps) {
  const char* op = grad.defined() ? "piad::rel_perc_l1_backward" : "piad::rel_perc_l1";
  TORCH_CHECK(fx.dim() >= 2, op, ": features must have shape (N, C, *), got fx.shape=", fx.sizes());
  TORCH_CHECK(fx.sizes() == fy.sizes(), op, ": fx and fy must have the same shape, got ", fx.sizes(),
              " and ", fy.sizes());
  TORCH_CHECK(fx.scalar_type() == fy.scalar_type(), op, ": fx and fy must have the same dtype, got ",
              fx.scalar_type(), " and ", fy.scalar_type());
  TORCH_CHECK(at::isFloatingType(fx.scalar_type()), op, ": features must be floating point, got ",
              fx.scalar_type());
  TORCH_CHECK(fx.device() == fy.device(), op, ": fx and fy must be on the same device, got ",
              fx.device(), " and ", fy.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"std", std}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == fx.size(1), op, ": ", name,
                " must be 1-D with one entry per channel (C=", fx.size(1), "), got shape ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == fx.device(), op, ": ", name, " is on ", t.device(),
                " but the features are on ", fx.device());
  }
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  if (grad.defined()) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == fx.size(0), op, ": grad must have shape (N,) = (",
                fx.size(0), ",), got ", grad.sizes());
    TORCH_CHECK(grad.device() == fx.device(), op, ": grad is on ", grad.device(),
                " but the features are on ", fx.device());
  }
  Inputs in;
  const at::Tensor xp = fx.movedim(1, -1);
  in.permuted = fx.dim() >= 3 && !fx.is_contiguous() && xp.is_contiguous();
  in.x = in.permuted ? xp : fx.contiguous();
  in.y = (in.permuted ? fy.movedim(1, -1) : fy).contiguous();
  const auto acc = at::toOpMathType(fx.scalar_type());
  in.mean = mean.to(acc).contiguous();
  in.inv = std.to(acc).reciprocal().contiguous();
  in.l.N = fx.size(0);
  in.l.C = fx.size(1);
  in.l.K = in.l.N ? fx.numel() / in.l.N : 0;
  in.l.S = in.l.C ? in.l.K / in.l.C : 0;
  in.l.interleaved = in.permuted || in.l.S == 1;  // (N, C) features: one pixel of C channels
  return in;
}

// One element's gradient: sign(d) * w with sign(0) = 0, d = fx - fy, w = g / (den + eps) / std.
template <typename A>
C10_HOST_DEVICE inline A sign_times(A d, A w) {
  return d > A(0) ? w : (d < A(0) ? -w : A(0));
}

}  // namespace piad
