// Relative-perceptual-L1 loss (Tuluptceva et al. 2019, §3.1, eq. (3)-(4)): the op schema and the
// CPU kernels (maths and shared helpers: rel_perc_l1.h; CUDA kernels: rel_perc_l1_cuda.cu).
//
// Samples are independent tasks for at::parallel_for; each is summed in a fixed order
// (at::vec::Vectorized lanes in the accumulation dtype, flushed into double every kFlush
// elements), so the results do not depend on the thread count.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <type_traits>

#include "rel_perc_l1.h"

// `import piad_C` loads this library; its static initialisers (TORCH_LIBRARY) register the ops.
extern "C" PyObject* PyInit_piad_C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "piad_C", "torch.ops.piad: eq. (3)-(4)", -1, nullptr};
  return PyModule_Create(&def);
}

namespace piad {
namespace {

using at::vec::Vectorized;
constexpr int64_t kFlush = 1024;        // elements summed in the accumulation dtype per flush
constexpr int64_t kParallel = 1 << 19;  // calls with fewer elements run on one thread

template <typename T, typename V = Vectorized<acc_t<T>>>
V load(const T* p, int64_t n) {  // n <= V::size(); lanes past n are 0
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, n);
  } else {  // half, bfloat16: widened to float
    T buf[V::size()] = {};
    if (n < V::size()) std::copy(p, p + n, buf);  // a partial vector, zero-padded
    V v;
    at::vec::load_to_float(n < V::size() ? buf : p, v);
    return v;
  }
}

template <typename T, typename V = Vectorized<acc_t<T>>>
void store(T* p, const V& v, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    n == V::size() ? v.store(p) : v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);  // rounded to half, bfloat16
  }
}

// Calls f(i, n, mean, 1/std) for each vector of elements [i, i + n) of a sample, unit by unit:
// a planar unit is one channel (mean, std broadcast), an interleaved unit one pixel (mean, std
// loaded per channel). Lanes past n get 1/std = 0.
template <bool INTERLEAVED, typename A, typename F>
inline void for_each_vec(const Layout& l, const A* mean, const A* inv, const F& f) {
  using V = Vectorized<A>;
  const int64_t len = INTERLEAVED ? l.C : l.S, units = INTERLEAVED ? l.S : l.C;
  for (int64_t u = 0; u < units; ++u) {
    const V mb(INTERLEAVED ? A(0) : mean[u]), ib(INTERLEAVED ? A(0) : inv[u]);
    for (int64_t j = 0; j < len; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), len - j);
      const V m = INTERLEAVED ? load(mean + j, n) : mb;
      const V iv = INTERLEAVED ? load(inv + j, n) : (n == V::size() ? ib : V::set(V(0), ib, n));
      f(u * len + j, n, m, iv);
    }
  }
}

template <typename A, typename F>  // the layout as a compile-time constant in the loops
void for_each_vec(const Layout& l, const A* mean, const A* inv, const F& f) {
  l.interleaved ? for_each_vec<true>(l, mean, inv, f) : for_each_vec<false>(l, mean, inv, f);
}

// One sample's sums of |fx~ - fy~| (if NUM) and |fx~|, eq. (3)-(4), in a fixed order.
template <bool NUM, typename T, typename A = acc_t<T>>
std::pair<double, double> sample_sums(const T* x, const T* y, const A* mean, const A* inv,
                                      const Layout& l) {
  using V = Vectorized<A>;
  V num(0), den(0);
  double snum = 0, sden = 0;
  int64_t pending = 0;
  auto flush = [&] {  // lanes added in a fixed order
    snum += at::vec::vec_reduce_all(std::plus<V>(), num);
    sden += at::vec::vec_reduce_all(std::plus<V>(), den);
    num = den = V(0), pending = 0;
  };
  for_each_vec(l, mean, inv, [&](int64_t i, int64_t n, const V& m, const V& iv) {
    const V xv = load(x + i, n);
    if (NUM) num += (xv - load(y + i, n)).abs() * iv;
    den += (xv - m).abs() * iv;
    if ((pending += n) >= kFlush) flush();
  });
  flush();
  return {snum, sden};
}

// Runs f(n) for every sample n, on one thread when the whole call is small (below kParallel
// elements, thread start-up would cost more than it saves).
template <typename F>
void for_each_sample(const Layout& l, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kParallel / std::max<int64_t>(1, l.K));  // samples
  at::parallel_for(0, l.N, grain, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) f(n);
  });
}

at::Tensor rel_perc_l1_cpu(const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& mean,
                           const at::Tensor& std, double eps) {
  const Inputs in = prepare({}, fx, fy, mean, std, eps);
  const Layout& l = in.l;
  at::Tensor out = at::empty({l.N}, fx.options().dtype(in.mean.scalar_type()));  // acc_t (header)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *x = in.x.const_data_ptr<scalar_t>(), *y = in.y.const_data_ptr<scalar_t>();
    const A *mp = in.mean.const_data_ptr<A>(), *ip = in.inv.const_data_ptr<A>();
    A* o = out.data_ptr<A>();
    for_each_sample(l, [&](int64_t n) {
      const auto [num, den] = sample_sums<true>(x + n * l.K, y + n * l.K, mp, ip, l);
      o[n] = static_cast<A>(num / (den + eps));  // eq. (4)
    });
  });
  return out;
}

// grad_fx = g[n] / (den[n] + eps) * sign(fx - fy) / std; each task first sums its sample's
// denominator (as the forward does), which also brings the sample into cache for the write.
at::Tensor rel_perc_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& fx,
                                    const at::Tensor& fy, const at::Tensor& mean,
                                    const at::Tensor& std, double eps) {
  const Inputs in = prepare(grad, fx, fy, mean, std, eps);
  const Layout& l = in.l;
  at::Tensor out = at::empty_like(in.x);
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fx.scalar_type(), "rel_perc_l1_bw", [&] {
    using A = acc_t<scalar_t>;
    using V = Vectorized<A>;
    const A *mp = in.mean.const_data_ptr<A>(), *ip = in.inv.const_data_ptr<A>();
    for_each_sample(l, [&](int64_t n) {
      const scalar_t* x = in.x.const_data_ptr<scalar_t>() + n * l.K;
      const scalar_t* y = in.y.const_data_ptr<scalar_t>() + n * l.K;
      scalar_t* o = out.data_ptr<scalar_t>() + n * l.K;
      const V scale(g.const_data_ptr<double>()[n] / (sample_sums<false>(x, x, mp, ip, l).second + eps));
      for_each_vec(l, mp, ip, [&](int64_t i, int64_t k, const V&, const V& iv) {
        const V d = load(x + i, k) - load(y + i, k), w = iv * scale, zero(0);
        store(o + i, ((d > zero) & w) - ((d < zero) & w), k);  // sign_times of rel_perc_l1.h
      });
    });
  });
  return in.as_fx(out);
}

}  // namespace
}  // namespace piad

TORCH_LIBRARY(piad, m) {
  m.def("rel_perc_l1(Tensor fx, Tensor fy, Tensor mean, Tensor std, float eps) -> Tensor");
  m.def("rel_perc_l1_backward(Tensor grad, Tensor fx, Tensor fy, Tensor mean, Tensor std, float eps)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(piad, CPU, m) {
  m.impl("rel_perc_l1", &piad::rel_perc_l1_cpu);
  m.impl("rel_perc_l1_backward", &piad::rel_perc_l1_backward_cpu);
}
