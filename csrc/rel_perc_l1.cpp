// Relative-perceptual-L1 loss of "Perceptual Image Anomaly Detection" (Tuluptceva et al.
// 2019), §3.1, eq. (3)-(4), as a fused PyTorch custom op: schema, input checks and the CPU
// kernels. The CUDA kernels live in rel_perc_l1_cuda.cu.
//
//   fx~ = (fx - mean) / std,  fy~ = (fy - mean) / std                       eq. (3)
//   loss[n] = sum |fx~ - fy~| / (sum |fx~| + eps)   (sums over C and spatial)   eq. (4)
//
// The denominator depends on fx only and is a constant in backward (as in the authors' code):
//   d loss[n] / d fx = sign(fx - fy) / std[c] / (den[n] + eps),   d loss / d fy = -(that).
//
// Features are read in one pass: either planar (contiguous N, C, *) or interleaved
// (channels_last / channels_last_3d, i.e. N, *, C dense in memory) without a copy; any other
// layout is made contiguous first. Work is split into fixed parts (by size only, so results
// do not depend on the thread count) and run with at::parallel_for over samples x parts.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Importing the Python module `piad_C` loads this shared library; the static initialisers of
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL below then register torch.ops.piad.*.
extern "C" PyObject* PyInit_piad_C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "piad_C", "Fused relative-perceptual-L1 ops (torch.ops.piad).", -1,
      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace piad {

// Shared with the CUDA file (declared there): argument checks and layout selection.
void check_inputs(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                  const at::Tensor& std, double eps, const char* op) {
  TORCH_CHECK(fx.dim() >= 2, op, ": features must have shape (N, C, *), got fx.shape=",
              fx.sizes());
  TORCH_CHECK(fx.sizes() == fy.sizes(), op, ": fx and fy must have the same shape, got ",
              fx.sizes(), " and ", fy.sizes());
  TORCH_CHECK(fx.scalar_type() == fy.scalar_type(), op,
              ": fx and fy must have the same dtype, got ", fx.scalar_type(), " and ",
              fy.scalar_type());
  TORCH_CHECK(at::isFloatingType(fx.scalar_type()), op,
              ": features must be floating point, got ", fx.scalar_type());
  TORCH_CHECK(fx.device() == fy.device(), op, ": fx and fy must be on the same device, got ",
              fx.device(), " and ", fy.device());
  const int64_t C = fx.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                                {"std", std}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name,
                " must be 1-D with one entry per channel (C=", C, "), got shape ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.device() == fx.device(), op, ": ", name, " is on ", t.device(),
                " but the features are on ", fx.device());
  }
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// check_inputs plus the upstream gradient of shape (N,) on the features' device.
void check_backward_inputs(const at::Tensor& grad, const at::Tensor& fx, const at::Tensor& fy,
                           const at::Tensor& mean, const at::Tensor& std, double eps) {
  const char* op = "piad::rel_perc_l1_backward";
  check_inputs(fx, fy, mean, std, eps, op);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == fx.size(0), op,
              ": grad must have shape (N,) = (", fx.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(grad.device() == fx.device(), op, ": grad is on ", grad.device(),
              " but the features are on ", fx.device());
}

// (0, 2, ..., dim-1, 1): the permutation that makes channels_last features contiguous.
std::vector<int64_t> channels_last_perm(int64_t dim) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < dim; ++d) perm.push_back(d);
  perm.push_back(1);
  return perm;
}

// Chooses the memory layout the kernels read. Returns true for "interleaved" (x, y are dense
// N, *, C views: channels_last), false for "planar" (x, y contiguous N, C, *).
bool prepare_layout(const at::Tensor& fx, const at::Tensor& fy, at::Tensor& x, at::Tensor& y) {
  if (!fx.is_contiguous() && fx.dim() >= 3) {
    const std::vector<int64_t> perm = channels_last_perm(fx.dim());
    at::Tensor xp = fx.permute(perm);
    if (xp.is_contiguous()) {  // channels_last (NHWC) features: read in place
      x = xp;
      y = fy.permute(perm).contiguous();
      return true;
    }
  }
  x = fx.contiguous();
  y = fy.contiguous();
  return false;
}

}  // namespace piad

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kPart = 32768;   // elements per parallel work item (sample part)
constexpr int64_t kFlush = 4096;   // float lane accumulators are flushed to double this often
constexpr int64_t kFlushRows = 256;

struct Sums {
  double num = 0, den = 0;
};

// Geometry of one sample: `units` blocks of `len` contiguous elements. Planar: unit = channel
// (len = spatial size). Interleaved: unit = pixel (len = C, element j has channel j).
struct Geo {
  int64_t N, C, K, units, len, parts, upp;  // upp: units per part
  bool interleaved;
};

Geo make_geo(const at::Tensor& x, bool interleaved) {
  Geo g;
  g.N = x.size(0);
  g.interleaved = interleaved;
  g.C = interleaved ? x.size(-1) : x.size(1);
  g.K = g.N ? x.numel() / g.N : 0;
  g.len = interleaved ? g.C : (g.C ? g.K / g.C : 0);
  g.units = interleaved ? (g.C ? g.K / g.C : 0) : g.C;
  if (!interleaved && g.len == 1) {  // (N, C) features: same memory as one channels_last pixel
    g.interleaved = true, g.len = g.C, g.units = 1;
  }
  g.parts = std::max<int64_t>(1, std::min<int64_t>(g.units, g.K / kPart));
  g.upp = (g.units + g.parts - 1) / std::max<int64_t>(g.parts, 1);
  g.parts = g.upp ? (g.units + g.upp - 1) / g.upp : 1;
  return g;
}

// Kernels use GCC/Clang vector extensions: V holds one 512-bit register worth of lanes (16
// floats or 8 doubles; the compiler splits it into 2 x AVX2 or 4 x SSE registers as needed)
// and each entry point is compiled for x86-64-v4 (AVX-512), -v3 (AVX2) and baseline, chosen
// at load time (target_clones), so no -march flag is needed at build time.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && __GNUC__ >= 12))
#define PIAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PIAD_CLONES
#endif
#define PIAD_INLINE inline __attribute__((always_inline))

template <typename A> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t M __attribute__((vector_size(64)));
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t M __attribute__((vector_size(64)));
};
constexpr int64_t kChunk = 1024;  // float lane sums cover at most kChunk / 16 elements each

template <typename A, typename T>
PIAD_INLINE typename Vec<A>::V vload(const T* p) {
  typename Vec<A>::V v;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof v);  // unaligned vector load
  } else {
    for (int l = 0; l < int(64 / sizeof(A)); ++l) v[l] = static_cast<A>(p[l]);
  }
  return v;
}

template <typename A, typename T>
PIAD_INLINE void vstore(T* p, typename Vec<A>::V v) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int l = 0; l < int(64 / sizeof(A)); ++l) p[l] = static_cast<T>(v[l]);
  }
}

template <typename V, typename M = typename Vec<std::remove_reference_t<decltype(V{}[0])>>::M>
PIAD_INLINE V vabs(V v) {  // clear the sign bits
  using I = std::remove_reference_t<decltype(M{}[0])>;
  return (V)((M)v & std::numeric_limits<I>::max());
}

template <typename V, typename M = typename Vec<std::remove_reference_t<decltype(V{}[0])>>::M>
PIAD_INLINE V vsign_times(V d, V w) {  // sign(d) * w with sign(0) = 0
  return (V)(((M)w & (M)(d > 0)) | ((M)(-w) & (M)(d < 0)));
}

// Sums of units [u0, u1) of one sample: num = sum |x - y| / std, den = sum |x - mean| / std.
// Lanes accumulate in the accumulation dtype in a fixed order and are flushed to double.
template <typename T, bool NUM>
PIAD_INLINE Sums sums_impl(const T* __restrict x, const T* __restrict y,
                           const acc_t<T>* __restrict mean, const acc_t<T>* __restrict inv,
                           const Geo& g, int64_t u0, int64_t u1) {
  using A = acc_t<T>;
  using V = typename Vec<A>::V;
  constexpr int64_t W = 64 / sizeof(A);
  Sums s;
  if (!g.interleaved) {  // planar: unit = channel c, a contiguous spatial run of g.len
    V an{}, ad{};
    int64_t pending = 0;
    for (int64_t c = u0; c < u1; ++c) {
      const T* xc = x + c * g.len;
      const T* yc = y + c * g.len;
      const A m = mean[c], iv = inv[c];
      for (int64_t b = 0; b < g.len; b += kChunk) {
        const int64_t e = std::min(g.len, b + kChunk), ev = b + (e - b) / W * W;
        V cn{}, cd{};
        for (int64_t i = b; i < ev; i += W) {
          const V xv = vload<A>(xc + i);
          if (NUM) cn += vabs(xv - vload<A>(yc + i));  // |fx - fy|
          cd += vabs(xv - m);                           // |fx - mean|
        }
        for (int64_t i = ev, l = 0; i < e; ++i, ++l) {  // tail: l < W
          const A xv = static_cast<A>(xc[i]);
          if (NUM) cn[l] += std::abs(xv - static_cast<A>(yc[i]));
          cd[l] += std::abs(xv - m);
        }
        an += cn * iv;  // |fx~ - fy~| = |fx - fy| / std
        ad += cd * iv;  // |fx~| = |fx - mean| / std, eq. (3)
        if ((pending += e - b) >= kFlush) {
          for (int l = 0; l < W; ++l) s.num += an[l], s.den += ad[l];
          an = V{}, ad = V{}, pending = 0;
        }
      }
    }
    for (int l = 0; l < W; ++l) s.num += an[l], s.den += ad[l];
  } else {  // interleaved: unit = pixel, channels contiguous; per-channel accumulators
    const int64_t C = g.C, Cv = C / W * W;
    std::vector<A> acc(2 * C, A(0));  // (not std::vector<V>: alignment attributes are dropped)
    A* __restrict an = acc.data();
    A* __restrict ad = an + C;
    auto flush = [&] {
      for (int64_t c = 0; c < C; ++c)  // / std, eq. (3)
        s.num += double(an[c]) * inv[c], s.den += double(ad[c]) * inv[c], an[c] = ad[c] = 0;
    };
    for (int64_t r = u0; r < u1; ++r) {
      const T* xr = x + r * C;
      const T* yr = y + r * C;
      for (int64_t c = 0; c < Cv; c += W) {
        const V xv = vload<A>(xr + c);
        if (NUM) vstore<A>(an + c, vload<A>(an + c) + vabs(xv - vload<A>(yr + c)));  // |fx - fy|
        vstore<A>(ad + c, vload<A>(ad + c) + vabs(xv - vload<A>(mean + c)));         // |fx - mean|
      }
      for (int64_t c = Cv; c < C; ++c) {
        const A xv = static_cast<A>(xr[c]);
        if (NUM) an[c] += std::abs(xv - static_cast<A>(yr[c]));
        ad[c] += std::abs(xv - mean[c]);
      }
      if ((r - u0 + 1) % kFlushRows == 0) flush();
    }
    flush();
  }
  return s;
}

// grad[n, units u0..u1) = scale * sign(x - y) / std[c], scale = g[n] / (den[n] + eps).
template <typename T>
PIAD_INLINE void grad_impl(const T* __restrict x, const T* __restrict y,
                           const acc_t<T>* __restrict inv, T* __restrict out, const Geo& g,
                           int64_t u0, int64_t u1, double scale) {
  using A = acc_t<T>;
  using V = typename Vec<A>::V;
  constexpr int64_t W = 64 / sizeof(A);
  const A sc = static_cast<A>(scale);
  auto sgn = [](A d, A w) { return d > A(0) ? w : (d < A(0) ? -w : A(0)); };
  if (!g.interleaved) {
    const int64_t ev = g.len / W * W;
    for (int64_t c = u0; c < u1; ++c) {
      const A w = sc * inv[c];
      const V wv = V{} + w;
      const int64_t o = c * g.len;
      for (int64_t i = o; i < o + ev; i += W)
        vstore<A>(out + i, vsign_times(vload<A>(x + i) - vload<A>(y + i), wv));
      for (int64_t i = o + ev; i < o + g.len; ++i)
        out[i] = static_cast<T>(sgn(static_cast<A>(x[i]) - static_cast<A>(y[i]), w));
    }
  } else {
    const int64_t C = g.C, Cv = C / W * W;
    std::vector<A> w(C);
    for (int64_t c = 0; c < C; ++c) w[c] = sc * inv[c];
    const A* __restrict wp = w.data();
    for (int64_t r = u0; r < u1; ++r) {
      const int64_t o = r * C;
      for (int64_t c = 0; c < Cv; c += W)
        vstore<A>(out + o + c, vsign_times(vload<A>(x + o + c) - vload<A>(y + o + c), vload<A>(wp + c)));
      for (int64_t c = Cv; c < C; ++c)
        out[o + c] = static_cast<T>(sgn(static_cast<A>(x[o + c]) - static_cast<A>(y[o + c]), wp[c]));
    }
  }
}

// Entry points, one multi-versioned function per dtype, and overloads used by the dispatch.
#define PIAD_KERNELS(T, NAME)                                                                  \
  PIAD_CLONES Sums sums_##NAME(const T* x, const T* y, const acc_t<T>* mean,                  \
                               const acc_t<T>* inv, const Geo& g, int64_t u0, int64_t u1,     \
                               bool num) {                                                     \
    return num ? sums_impl<T, true>(x, y, mean, inv, g, u0, u1)                               \
               : sums_impl<T, false>(x, y, mean, inv, g, u0, u1);                             \
  }                                                                                            \
  PIAD_CLONES void grad_##NAME(const T* x, const T* y, const acc_t<T>* inv, T* out,            \
                               const Geo& g, int64_t u0, int64_t u1, double scale) {           \
    grad_impl<T>(x, y, inv, out, g, u0, u1, scale);                                           \
  }                                                                                            \
  inline Sums part_sums(const T* x, const T* y, const acc_t<T>* mean, const acc_t<T>* inv,    \
                        const Geo& g, int64_t u0, int64_t u1, bool num) {                      \
    return sums_##NAME(x, y, mean, inv, g, u0, u1, num);                                      \
  }                                                                                            \
  inline void part_grad(const T* x, const T* y, const acc_t<T>* inv, T* out, const Geo& g,    \
                        int64_t u0, int64_t u1, double scale) {                                \
    grad_##NAME(x, y, inv, out, g, u0, u1, scale);                                            \
  }
PIAD_KERNELS(float, f32)
PIAD_KERNELS(double, f64)
PIAD_KERNELS(c10::Half, f16)
PIAD_KERNELS(c10::BFloat16, bf16)
#undef PIAD_KERNELS

// Denominator of one whole sample, combining its parts in a fixed order.
template <typename T>
double sample_den(const T* x, const acc_t<T>* mean, const acc_t<T>* inv, const Geo& g) {
  double den = 0;
  for (int64_t p = 0; p < g.parts; ++p)
    den += part_sums(x, x, mean, inv, g, p * g.upp, std::min(g.units, (p + 1) * g.upp), false).den;
  return den;
}

// mean and 1/std in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> stats(const at::Tensor& mean, const at::Tensor& std,
                                        at::ScalarType acc) {
  return {mean.to(acc).contiguous(), std.to(acc).reciprocal().contiguous()};
}

int64_t grain_for(const Geo& g) {  // at least ~kPart elements per parallel task
  const int64_t per_task = std::max<int64_t>(1, g.K / g.parts);
  return std::max<int64_t>(1, kPart / per_task);
}

at::Tensor rel_perc_l1_cpu(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                           const at::Tensor& std, double eps) {
  piad::check_inputs(fx, fy, mean, std, eps, "piad::rel_perc_l1");
  at::Tensor x, y;
  const bool interleaved = piad::prepare_layout(fx, fy, x, y);
  const Geo g = make_geo(x, interleaved);
  at::Tensor out = at::empty({g.N}, fx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_cpu", [&] {
    using A = acc_t<scalar_t>;
    auto [m, iv] = stats(mean, std, c10::CppTypeToScalarType<A>::value);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const A* mp = m.const_data_ptr<A>();
    const A* ip = iv.const_data_ptr<A>();
    std::vector<Sums> partial(g.N * g.parts);
    at::parallel_for(0, g.N * g.parts, grain_for(g), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / g.parts, p = t % g.parts;
        partial[t] = part_sums(xp + n * g.K, yp + n * g.K, mp, ip, g, p * g.upp,
                               std::min(g.units, (p + 1) * g.upp), true);
      }
    });
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t n = 0; n < g.N; ++n) {
      Sums s;  // parts in a fixed order (the backward sums its denominators the same way)
      for (const Sums* q = &partial[n * g.parts]; q != &partial[n * g.parts] + g.parts; ++q)
        s.num += q->num, s.den += q->den;
      op[n] = static_cast<scalar_t>(s.num / (s.den + eps));  // eq. (4)
    }
  });
  return out;
}

at::Tensor rel_perc_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& fx,
                                    const at::Tensor& fy, const at::Tensor& mean,
                                    const at::Tensor& std, double eps) {
  piad::check_backward_inputs(grad, fx, fy, mean, std, eps);
  at::Tensor x, y;
  const bool interleaved = piad::prepare_layout(fx, fy, x, y);
  const Geo g = make_geo(x, interleaved);
  at::Tensor out = at::empty_like(fx);  // same strides as the fake (meta) implementation
  // `view` orders `out` like x; write into it directly when that is dense, else into a buffer.
  at::Tensor view = interleaved ? out.permute(piad::channels_last_perm(fx.dim())) : out;
  at::Tensor dst = view.is_contiguous() ? view : at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    auto [m, iv] = stats(mean, std, c10::CppTypeToScalarType<A>::value);
    const at::Tensor gd = grad.to(at::kDouble).contiguous();
    const double* gp = gd.const_data_ptr<double>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const A* mp = m.const_data_ptr<A>();
    const A* ip = iv.const_data_ptr<A>();
    scalar_t* op = dst.data_ptr<scalar_t>();
    auto part = [&](int64_t n, int64_t p, double scale) {
      part_grad(xp + n * g.K, yp + n * g.K, ip, op + n * g.K, g, p * g.upp,
                std::min(g.units, (p + 1) * g.upp), scale);
    };
    if (g.N >= at::get_num_threads() || g.parts == 1) {
      // One task per sample: its denominator pass leaves the sample in cache for the write.
      const int64_t grain = std::max<int64_t>(1, grain_for(g) / g.parts);
      at::parallel_for(0, g.N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const double scale = gp[n] / (sample_den<scalar_t>(xp + n * g.K, mp, ip, g) + eps);
          for (int64_t p = 0; p < g.parts; ++p) part(n, p, scale);
        }
      });
    } else {  // few large samples: parallel denominators, then a parallel write
      std::vector<double> den(g.N * g.parts);
      at::parallel_for(0, g.N * g.parts, grain_for(g), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t n = t / g.parts, p = t % g.parts;
          den[t] = part_sums(xp + n * g.K, xp + n * g.K, mp, ip, g, p * g.upp,
                             std::min(g.units, (p + 1) * g.upp), false).den;
        }
      });
      std::vector<double> scale(g.N);
      for (int64_t n = 0; n < g.N; ++n) {
        double d = 0;
        for (int64_t p = 0; p < g.parts; ++p) d += den[n * g.parts + p];  // same order as forward
        scale[n] = gp[n] / (d + eps);
      }
      at::parallel_for(0, g.N * g.parts, grain_for(g), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) part(t / g.parts, t % g.parts, scale[t / g.parts]);
      });
    }
  });
  if (!dst.is_same(view)) view.copy_(dst);
  return out;
}

}  // namespace

TORCH_LIBRARY(piad, m) {
  m.def("rel_perc_l1(Tensor fx, Tensor fy, Tensor mean, Tensor std, float eps) -> Tensor");
  m.def("rel_perc_l1_backward(Tensor grad, Tensor fx, Tensor fy, Tensor mean, Tensor std, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(piad, CPU, m) {
  m.impl("rel_perc_l1", &rel_perc_l1_cpu);
  m.impl("rel_perc_l1_backward", &rel_perc_l1_backward_cpu);
}
