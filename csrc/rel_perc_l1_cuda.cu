// Relative-perceptual-L1 loss (Tuluptceva et al. 2019, §3.1, eq. (3)-(4)): CUDA kernels of
// torch.ops.piad.rel_perc_l1 / rel_perc_l1_backward (maths and shared helpers: rel_perc_l1.h).
//
// One thread block per sample, a fixed summation order (no atomics): deterministic results.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "rel_perc_l1.h"

namespace piad {
namespace {

constexpr int kThreads = 256;

// Block n = blockIdx.x sums, a fixed strided subset per thread, num = sum |fx~ - fy~| (forward
// only) and den = sum |fx~| of eq. (3)-(4); cub::BlockReduce adds the threads' sums. Then forward
// (grad == nullptr): loss[n] into `loss` (acc_t); backward: grad_fx into `out` (features' dtype).
template <typename T, typename A>
__global__ void rel_perc_l1_kernel(const A* grad, const T* x, const T* y, const A* mean, const A* inv,
                                   Layout l, double eps, A* loss, T* out) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage tmp[2];
  __shared__ A scale;
  const int64_t base = blockIdx.x * l.K;
  A an = 0, ad = 0;
  for (int64_t i = threadIdx.x; i < l.K; i += kThreads) {
    const int64_t c = l.channel(i);
    const A xv = static_cast<A>(x[base + i]);
    if (!grad) an += ::fabs(xv - static_cast<A>(y[base + i])) * inv[c];
    ad += ::fabs(xv - mean[c]) * inv[c];
  }
  const A num = Reduce(tmp[0]).Sum(an), den = Reduce(tmp[1]).Sum(ad);  // valid in thread 0
  if (threadIdx.x == 0 && !grad) loss[blockIdx.x] = num / (den + static_cast<A>(eps));
  if (threadIdx.x == 0 && grad) scale = grad[blockIdx.x] / (den + static_cast<A>(eps));
  if (!grad) return;  // the same for the whole block
  __syncthreads();
  for (int64_t i = threadIdx.x; i < l.K; i += kThreads) {
    const A d = static_cast<A>(x[base + i]) - static_cast<A>(y[base + i]);
    out[base + i] = static_cast<T>(sign_times(d, scale * inv[l.channel(i)]));
  }
}

// The op's forward (grad undefined) or backward, one block per sample.
at::Tensor launch(const at::Tensor& grad, const at::Tensor& fx, const at::Tensor& fy,
                  const at::Tensor& mean, const at::Tensor& std, double eps) {
  const Inputs in = prepare(grad, fx, fy, mean, std, eps);
  const c10::cuda::CUDAGuard guard(fx.device());
  at::Tensor out = grad.defined() ? at::empty_like(in.x)
                                  : at::empty({in.l.N}, fx.options().dtype(in.mean.scalar_type()));  // acc_t
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_cuda", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor g = grad.defined() ? grad.to(in.mean.scalar_type()).contiguous() : at::Tensor();
    if (in.l.N == 0) return;  // (an empty grid is an invalid launch)
    rel_perc_l1_kernel<<<in.l.N, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.defined() ? g.const_data_ptr<A>() : nullptr, in.x.const_data_ptr<scalar_t>(),
        in.y.const_data_ptr<scalar_t>(), in.mean.const_data_ptr<A>(), in.inv.const_data_ptr<A>(), in.l,
        eps, grad.defined() ? nullptr : out.data_ptr<A>(), grad.defined() ? out.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad.defined() ? in.as_fx(out) : out;
}

at::Tensor rel_perc_l1_cuda(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                            const at::Tensor& std, double eps) {
  return launch({}, fx, fy, mean, std, eps);
}

at::Tensor rel_perc_l1_backward_cuda(const at::Tensor& grad, const at::Tensor& fx, const at::Tensor& fy,
                                     const at::Tensor& mean, const at::Tensor& std, double eps) {
  return launch(grad, fx, fy, mean, std, eps);
}

}  // namespace
}  // namespace piad

TORCH_LIBRARY_IMPL(piad, CUDA, m) {
  m.impl("rel_perc_l1", &piad::rel_perc_l1_cuda);
  m.impl("rel_perc_l1_backward", &piad::rel_perc_l1_backward_cuda);
}
