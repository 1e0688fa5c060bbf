// Relative-perceptual-L1 loss (Tuluptceva et al. 2019, §3.1, eq. (3)-(4)): CUDA kernels of
// torch.ops.piad.rel_perc_l1 / rel_perc_l1_backward (schema and CPU kernels: rel_perc_l1.cpp).
//
// Each sample (K = C * spatial elements, planar N,C,* or channels_last N,*,C) is split into
// B chunks, one block each, so that small batches still fill the GPU. A block reads its chunk
// once with 16-byte vector loads (coalesced), accumulates |fx - fy| / std and |fx - mean| / std
// in float (double for float64 inputs) and reduces with warp shuffles; the per-block partial
// sums are combined in a fixed order (deterministic, no atomics):
//   forward:  partial kernel -> finalize kernel (one warp per sample, eq. (4))
//   backward: partial kernel (denominators only) -> grad kernel (each block first reduces its
//             sample's partials, then writes g / (den + eps) * sign(fx - fy) / std).
// Only lightweight headers are included (no cuBLAS/cuSPARSE), so a bare CUDA toolkit suffices.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace piad {  // defined in rel_perc_l1.cpp
void check_inputs(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                  const at::Tensor& std, double eps, const char* op);
void check_backward_inputs(const at::Tensor& grad, const at::Tensor& fx, const at::Tensor& fy,
                           const at::Tensor& mean, const at::Tensor& std, double eps);
bool prepare_layout(const at::Tensor& fx, const at::Tensor& fy, at::Tensor& x, at::Tensor& y);
std::vector<int64_t> channels_last_perm(int64_t dim);
}  // namespace piad

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float absv(float v) { return fabsf(v); }
__device__ __forceinline__ double absv(double v) { return fabs(v); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of one sample's B partials (column `which`), fixed order; valid in lane 0 of the warp.
template <typename A>
__device__ __forceinline__ A sum_partials(const A* __restrict__ partial, int64_t n, int B, int which) {
  A s = 0;
  for (int b = threadIdx.x % 32; b < B; b += 32) s += partial[(n * B + b) * 2 + which];
  return warp_sum(s);
}

// Geometry shared by the kernels. Indices within a sample fit in 32 bits (checked on host).
struct Geo {
  uint32_t K, S, C;   // elements per sample, spatial size, channels
  uint32_t chunk;     // elements per block (multiple of the vector width)
  int B;              // blocks per sample
  bool interleaved;   // channels_last: channel = i % C, else channel = i / S
};

// Channel of element i and its position in the channel's run, advanced element by element so
// that one integer division serves a whole vector.
struct Chan {
  uint32_t c, r;
  __device__ __forceinline__ Chan(uint32_t i, const Geo& g) {
    if (g.interleaved) { c = i % g.C; r = 0; } else { c = i / g.S; r = i - c * g.S; }
  }
  __device__ __forceinline__ void next(const Geo& g) {
    if (g.interleaved) { if (++c == g.C) c = 0; }
    else if (++r == g.S) { r = 0; ++c; }
  }
};

// Per-block partial sums of |fx - fy| / std (NUM) and |fx - mean| / std over one chunk.
template <typename T, typename A, int VEC, bool NUM>
__global__ void __launch_bounds__(kThreads) partial_kernel(
    const T* __restrict__ x, const T* __restrict__ y, const A* __restrict__ mean,
    const A* __restrict__ inv, Geo g, A* __restrict__ partial) {
  const int64_t n = blockIdx.x / g.B;
  const uint32_t b = blockIdx.x % g.B;
  const T* xs = x + n * g.K;
  const T* ys = y + n * g.K;
  const uint32_t end = min(g.K, (b + 1) * g.chunk);
  A sn = 0, sd = 0;
  for (uint32_t i = b * g.chunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    const Pack<T, VEC> px = *reinterpret_cast<const Pack<T, VEC>*>(xs + i);
    Pack<T, VEC> py;
    if (NUM) py = *reinterpret_cast<const Pack<T, VEC>*>(ys + i);
    Chan ch(i, g);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A xv = static_cast<A>(px.v[v]);
      const A iv = __ldg(inv + ch.c);
      if (NUM) sn += absv(xv - static_cast<A>(py.v[v])) * iv;  // |fx~ - fy~|
      sd += absv(xv - __ldg(mean + ch.c)) * iv;                // |fx~|, eq. (3)
      ch.next(g);
    }
  }
  // Block reduction: warp shuffles, then one warp over the per-warp sums.
  __shared__ A sh[2][kWarps];
  sn = warp_sum(sn);
  sd = warp_sum(sd);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) sh[0][w] = sn, sh[1][w] = sd;
  __syncthreads();
  if (w == 0) {
    sn = warp_sum(l < kWarps ? sh[0][l] : A(0));
    sd = warp_sum(l < kWarps ? sh[1][l] : A(0));
    if (l == 0) {
      partial[(n * g.B + b) * 2 + 0] = sn;
      partial[(n * g.B + b) * 2 + 1] = sd;
    }
  }
}

// loss[n] = num / (den + eps), one warp per sample.
template <typename T, typename A>
__global__ void finalize_kernel(const A* __restrict__ partial, int64_t N, int B, double eps,
                                T* __restrict__ out) {
  const int64_t n = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (n >= N) return;  // whole warps exit together
  const A num = sum_partials(partial, n, B, 0);
  const A den = sum_partials(partial, n, B, 1);
  if (threadIdx.x % 32 == 0) out[n] = static_cast<T>(num / (den + static_cast<A>(eps)));  // eq. (4)
}

// grad_fx = g[n] / (den[n] + eps) * sign(fx - fy) / std[c]; den from the backward's partials.
template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads) grad_kernel(
    const T* __restrict__ x, const T* __restrict__ y, const A* __restrict__ inv,
    const A* __restrict__ grad, const A* __restrict__ partial, double eps, Geo g,
    T* __restrict__ out) {
  const int64_t n = blockIdx.x / g.B;
  const uint32_t b = blockIdx.x % g.B;
  __shared__ A s_scale;
  if (threadIdx.x < 32) {
    const A den = sum_partials(partial, n, g.B, 1);  // same order as the forward's finalize
    if (threadIdx.x == 0) s_scale = grad[n] / (den + static_cast<A>(eps));
  }
  __syncthreads();
  const A scale = s_scale;
  const T* xs = x + n * g.K;
  const T* ys = y + n * g.K;
  T* os = out + n * g.K;
  const uint32_t end = min(g.K, (b + 1) * g.chunk);
  for (uint32_t i = b * g.chunk + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    const Pack<T, VEC> px = *reinterpret_cast<const Pack<T, VEC>*>(xs + i);
    const Pack<T, VEC> py = *reinterpret_cast<const Pack<T, VEC>*>(ys + i);
    Pack<T, VEC> po;
    Chan ch(i, g);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A d = static_cast<A>(px.v[v]) - static_cast<A>(py.v[v]);
      const A w = scale * __ldg(inv + ch.c);
      po.v[v] = static_cast<T>(d > A(0) ? w : (d < A(0) ? -w : A(0)));
      ch.next(g);
    }
    *reinterpret_cast<Pack<T, VEC>*>(os + i) = po;
  }
}

int sm_count(int device) {
  static int cache[256] = {};
  if (device < 0 || device >= 256) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(v, 1);
  }
  return cache[device];
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks per sample: ~8 blocks per SM over the whole grid, at least 1 vector per thread, at
// most 64 vectors per thread (short float accumulations).
Geo plan(const at::Tensor& x, bool interleaved, int vec) {
  const int64_t N = x.size(0), K = N ? x.numel() / N : 0;
  TORCH_CHECK(K < (int64_t(1) << 31), "piad::rel_perc_l1 (CUDA): a sample has ", K,
              " elements; at most 2^31 - 1 are supported");
  const int64_t C = interleaved ? x.size(-1) : x.size(1);
  Geo g;
  g.K = uint32_t(K);
  g.C = uint32_t(std::max<int64_t>(C, 1));
  g.S = uint32_t(C ? std::max<int64_t>(K / C, 1) : 1);
  g.interleaved = interleaved;
  const int64_t packs = K / vec;
  const int64_t target = 8LL * sm_count(x.get_device());
  int64_t B = std::max<int64_t>(1, (target + N - 1) / std::max<int64_t>(N, 1));
  B = std::min<int64_t>(B, std::max<int64_t>(1, packs / kThreads));
  B = std::max<int64_t>(B, (packs + 64 * kThreads - 1) / (64 * kThreads));
  B = std::min<int64_t>(B, std::max<int64_t>(1, INT32_MAX / std::max<int64_t>(N, 1)));
  const int64_t chunk_packs = std::max<int64_t>(1, (packs + B - 1) / B);
  g.B = int(std::max<int64_t>(1, (packs + chunk_packs - 1) / chunk_packs));
  g.chunk = uint32_t(chunk_packs * vec);
  return g;
}

at::Tensor rel_perc_l1_cuda(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                            const at::Tensor& std, double eps) {
  piad::check_inputs(fx, fy, mean, std, eps, "piad::rel_perc_l1");
  const c10::cuda::CUDAGuard guard(fx.device());
  at::Tensor x, y;
  const bool interleaved = piad::prepare_layout(fx, fy, x, y);
  const int64_t N = fx.size(0);
  at::Tensor out = at::empty({N}, fx.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_cuda", [&] {
    using A = typename AccT<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor m = mean.to(acc).contiguous(), iv = std.to(acc).reciprocal().contiguous();
    const int64_t K = x.numel() / N;
    const bool vec = K % V == 0 && aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr());
    const Geo g = plan(x, interleaved, vec ? V : 1);
    at::Tensor partial = at::empty({N, g.B, 2}, fx.options().dtype(acc));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(unsigned(N * g.B));
    auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.const_data_ptr<scalar_t>();
    if (vec)
      partial_kernel<scalar_t, A, V, true><<<grid, kThreads, 0, stream>>>(
          xp, yp, m.const_data_ptr<A>(), iv.const_data_ptr<A>(), g, partial.data_ptr<A>());
    else
      partial_kernel<scalar_t, A, 1, true><<<grid, kThreads, 0, stream>>>(
          xp, yp, m.const_data_ptr<A>(), iv.const_data_ptr<A>(), g, partial.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<scalar_t, A><<<unsigned((N + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        partial.const_data_ptr<A>(), N, g.B, eps, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rel_perc_l1_backward_cuda(const at::Tensor& grad, const at::Tensor& fx,
                                     const at::Tensor& fy, const at::Tensor& mean,
                                     const at::Tensor& std, double eps) {
  piad::check_backward_inputs(grad, fx, fy, mean, std, eps);
  const c10::cuda::CUDAGuard guard(fx.device());
  at::Tensor x, y;
  const bool interleaved = piad::prepare_layout(fx, fy, x, y);
  const int64_t N = fx.size(0);
  at::Tensor out = at::empty_like(fx);  // same strides as the fake (meta) implementation
  if (out.numel() == 0) return out;
  at::Tensor view = interleaved ? out.permute(piad::channels_last_perm(fx.dim())) : out;
  at::Tensor dst = view.is_contiguous() ? view : at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_backward_cuda", [&] {
    using A = typename AccT<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor m = mean.to(acc).contiguous(), iv = std.to(acc).reciprocal().contiguous();
    const at::Tensor gr = grad.to(acc).contiguous();
    const int64_t K = x.numel() / N;
    const bool vec = K % V == 0 && aligned16(x.const_data_ptr()) &&
                     aligned16(y.const_data_ptr()) && aligned16(dst.const_data_ptr());
    const Geo g = plan(x, interleaved, vec ? V : 1);
    at::Tensor partial = at::empty({N, g.B, 2}, fx.options().dtype(acc));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(unsigned(N * g.B));
    auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.const_data_ptr<scalar_t>();
    auto* op = dst.data_ptr<scalar_t>();
    if (vec) {
      partial_kernel<scalar_t, A, V, false><<<grid, kThreads, 0, stream>>>(
          xp, xp, m.const_data_ptr<A>(), iv.const_data_ptr<A>(), g, partial.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_kernel<scalar_t, A, V><<<grid, kThreads, 0, stream>>>(
          xp, yp, iv.const_data_ptr<A>(), gr.const_data_ptr<A>(), partial.const_data_ptr<A>(),
          eps, g, op);
    } else {
      partial_kernel<scalar_t, A, 1, false><<<grid, kThreads, 0, stream>>>(
          xp, xp, m.const_data_ptr<A>(), iv.const_data_ptr<A>(), g, partial.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_kernel<scalar_t, A, 1><<<grid, kThreads, 0, stream>>>(
          xp, yp, iv.const_data_ptr<A>(), gr.const_data_ptr<A>(), partial.const_data_ptr<A>(),
          eps, g, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dst.is_same(view)) view.copy_(dst);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(piad, CUDA, m) {
  m.impl("rel_perc_l1", &rel_perc_l1_cuda);
  m.impl("rel_perc_l1_backward", &rel_perc_l1_backward_cuda);
}
