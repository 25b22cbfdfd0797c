// Head ops (issue 4): schemas and CPU kernels. Orchestration (row blocks, GEMMs) in heads.h; here
// the fused per-row passes, parallel over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "heads/heads.h"

namespace dgkernels {
namespace heads {
namespace {

// exp for the fused loops: float32 Cephes-style range reduction + polynomial (about 1 ulp),
// written branch-free so the compiler vectorises the loops; float64 keeps std::exp.
inline float fexp(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t + std::copysign(0.5f, t)));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double fexp(double x) { return std::exp(x); }

// One row of cross-entropy with label smoothing (F.cross_entropy's definition):
//   loss = lse - (1 - ls) z_t - ls/K sum_k z_k;  dL/dz_k = g (softmax_k - ls/K - (1 - ls)[k == t]).
// t < 0: ignored row (loss 0, gradient 0). With grad, z is overwritten by dL/dz and *dot gets
// sum_k dL/dz_k * z_k (for the logit scale's gradient).
template <typename T>
inline void ce_row(T* z, int64_t K, int64_t t, T ls, bool grad, T g, T* per, T* dot) {
  if (t < 0) {
    *per = 0;
    if (grad) {
      std::fill(z, z + K, T(0));
      if (dot) *dot = 0;
    }
    return;
  }
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) m = std::max(m, z[k]);
  T sum = 0, zsum = 0;
  for (int64_t k = 0; k < K; ++k) {
    sum += fexp(z[k] - m);
    zsum += z[k];
  }
  const T lse = m + std::log(sum);
  const T smooth = ls / T(K);
  *per = lse - (T(1) - ls) * z[t] - smooth * zsum;
  if (!grad) return;
  T d = 0;
  const T zt = z[t];
  for (int64_t k = 0; k < K; ++k) {
    const T v = g * (fexp(z[k] - lse) - smooth);
    d += v * z[k];
    z[k] = v;
  }
  z[t] -= g * (T(1) - ls);
  d -= g * (T(1) - ls) * zt;
  if (dot) *dot = d;
}

struct CpuRows {
  static void ce(Tensor& z, const Tensor& tgt, const Tensor& g, double ls, Tensor& per, Tensor dot) {
    const int64_t R = z.size(0), K = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_ce_rows", [&] {
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = tgt.data_ptr<int64_t>();
      const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = per.data_ptr<scalar_t>();
      scalar_t* dp = dot.defined() ? dot.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          ce_row<scalar_t>(zp + r * K, K, tp[r], scalar_t(ls), gp != nullptr, gp ? gp[r] : scalar_t(0), pp + r,
                           dp ? dp + r : nullptr);
      });
    });
  }

  // z [R, D, K] logits of D heads per row. kind 0: mean_d KL(p_d || m), m = mean_d p_d.
  // kind 1: mean over unordered pairs of symmetric KL = S / (D (D - 1) / 2) with
  //   S = sum_{d != e} KL(p_d || p_e) = D sum_{d,k} p lp - sum_k P_k L_k, P = sum_d p, L = sum_d lp.
  static void agree(Tensor& z, int64_t kind, const Tensor& g, Tensor& per) {
    const int64_t R = z.size(0), D = z.size(1), K = z.size(2);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_agree_rows", [&] {
      using T = scalar_t;
      T* zp = z.data_ptr<T>();
      const T* gp = g.defined() ? g.data_ptr<T>() : nullptr;
      T* pp = per.data_ptr<T>();
      at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(D * K, 1)), [&](int64_t r0, int64_t r1) {
        std::vector<T> p(D * K), colA(K), colB(K);
        for (int64_t r = r0; r < r1; ++r) {
          T* lp = zp + r * D * K;  // becomes log-probabilities, then dL/dz
          for (int64_t d = 0; d < D; ++d) {
            T* row = lp + d * K;
            T m = -std::numeric_limits<T>::infinity();
            for (int64_t k = 0; k < K; ++k) m = std::max(m, row[k]);
            T s = 0;
            for (int64_t k = 0; k < K; ++k) s += fexp(row[k] - m);
            const T lse = m + std::log(s);
            for (int64_t k = 0; k < K; ++k) {
              row[k] -= lse;
              p[d * K + k] = fexp(row[k]);
            }
          }
          std::fill(colA.begin(), colA.end(), T(0));  // sum_d p
          std::fill(colB.begin(), colB.end(), T(0));  // kind 0: unused; kind 1: sum_d lp
          for (int64_t d = 0; d < D; ++d)
            for (int64_t k = 0; k < K; ++k) {
              colA[k] += p[d * K + k];
              colB[k] += lp[d * K + k];
            }
          const T g_r = gp ? gp[r] : T(0);
          if (kind == 0) {
            // log m_k = log(sum_d p_dk / D); the per-head KL_d = sum_k p_dk (lp_dk - log m_k)
            for (int64_t k = 0; k < K; ++k) colB[k] = std::log(colA[k] / T(D));
            T total = 0;
            for (int64_t d = 0; d < D; ++d) {
              T kl = 0;
              for (int64_t k = 0; k < K; ++k) kl += p[d * K + k] * (lp[d * K + k] - colB[k]);
              total += kl;
              if (gp) {
                const T c = g_r / T(D);
                for (int64_t k = 0; k < K; ++k)
                  lp[d * K + k] = c * p[d * K + k] * (lp[d * K + k] - colB[k] - kl);
              }
            }
            pp[r] = total / T(D);
          } else {
            T plp = 0, cross = 0;
            for (int64_t i = 0; i < D * K; ++i) plp += p[i] * lp[i];
            for (int64_t k = 0; k < K; ++k) cross += colA[k] * colB[k];
            const T norm = T(2) / (T(D) * T(D - 1));
            pp[r] = (T(D) * plp - cross) * norm;
            if (gp) {
              // a_dk = D lp_dk - L_k; dS/dz_dj = p_dj (a_dj - <p_d, a_d>) + D p_dj - P_j
              const T c = g_r * norm;
              for (int64_t d = 0; d < D; ++d) {
                T pa = 0;
                for (int64_t k = 0; k < K; ++k) pa += p[d * K + k] * (T(D) * lp[d * K + k] - colB[k]);
                for (int64_t k = 0; k < K; ++k) {
                  const T pk = p[d * K + k];
                  lp[d * K + k] = c * (pk * (T(D) * lp[d * K + k] - colB[k] - pa) + T(D) * pk - colA[k]);
                }
              }
            }
          }
        }
      });
    });
  }

  // y <- (residual ? x - y : y), then optionally divided by max(||.||, eps) (norm gets ||.||).
  static void mapper_rows(const Tensor& x, Tensor& y, bool residual, bool normalize, Tensor& norm) {
    const int64_t R = y.size(0), E = y.size(1);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "heads_mapper_rows", [&] {
      using T = scalar_t;
      const T* xp = x.data_ptr<T>();
      T* yp = y.data_ptr<T>();
      T* np = normalize ? norm.data_ptr<T>() : nullptr;
      at::parallel_for(0, R, std::max<int64_t>(1, 8192 / std::max<int64_t>(E, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* row = yp + r * E;
          const T* xr = xp + r * E;
          T ss = 0;
          for (int64_t e = 0; e < E; ++e) {
            const T v = residual ? xr[e] - row[e] : row[e];
            row[e] = v;
            ss += v * v;
          }
          if (normalize) {
            const T n = std::sqrt(ss);
            np[r] = n;
            const T inv = T(1) / std::max(n, T(kNormEps));
            for (int64_t e = 0; e < E; ++e) row[e] *= inv;
          }
        }
      });
    });
  }

  // dL/dr from dL/d(out) for out = r / max(||r||, eps): (g - out <out, g> [||r|| > eps]) / max(||r||, eps).
  static Tensor normalize_grad(const Tensor& g, const Tensor& out, const Tensor& norm) {
    auto res = at::empty_like(g);
    const int64_t R = g.size(0), E = g.size(1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "heads_normalize_grad", [&] {
      using T = scalar_t;
      const T *gp = g.data_ptr<T>(), *op = out.data_ptr<T>(), *np = norm.data_ptr<T>();
      T* rp = res.data_ptr<T>();
      at::parallel_for(0, R, std::max<int64_t>(1, 8192 / std::max<int64_t>(E, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* gr = gp + r * E;
          const T* orow = op + r * E;
          T dotv = 0;
          for (int64_t e = 0; e < E; ++e) dotv += orow[e] * gr[e];
          if (!(np[r] > T(kNormEps))) dotv = 0;
          const T inv = T(1) / std::max(np[r], T(kNormEps));
          for (int64_t e = 0; e < E; ++e) rp[r * E + e] = (gr[e] - orow[e] * dotv) * inv;
        }
      });
    });
    return res;
  }

  // Per-sample class embeddings c [B, K, E]: each sample streams its own K x E block twice (logits,
  // then gradients), reading c in its own dtype; only O(K) scratch per thread.
  static Grads cosine_per_sample(const Tensor& g, const Tensor& x, const Tensor& c_in, const Tensor& s,
                                 const Tensor& tgt, bool normalize, double ls) {
    const int64_t B = x.size(0), E = x.size(1), K = c_in.size(1);
    const bool grad = g.defined();
    auto c = c_in.contiguous();
    auto xa = to_acc(x);
    Tensor xn = xa, xden;
    if (normalize) std::tie(xn, xden) = normalize_rows(xa);
    auto opts = xa.options();
    auto per = at::empty({B}, opts);
    auto dot = at::zeros({B}, opts);
    Tensor dxn = grad ? at::empty({B, E}, opts) : Tensor();
    Tensor gc = grad ? at::empty_like(c) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "heads_cosine_per_sample", [&] {
      using In = scalar_t;
      using T = at::opmath_type<In>;
      const In* cp = c.data_ptr<In>();
      In* gcp = grad ? gc.data_ptr<In>() : nullptr;
      const T* xp = xn.data_ptr<T>();
      const T* gp = grad ? g.data_ptr<T>() : nullptr;
      const int64_t* tp = tgt.data_ptr<int64_t>();
      T* pp = per.data_ptr<T>();
      T* dp = dot.data_ptr<T>();
      T* dxp = grad ? dxn.data_ptr<T>() : nullptr;
      const T sc = s.item<T>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> z(K), cos(K), den(K), acc(E);
        for (int64_t b = b0; b < b1; ++b) {
          const T* xb = xp + b * E;
          const In* cb = cp + b * K * E;
          for (int64_t k = 0; k < K; ++k) {
            const In* ck = cb + k * E;
            T dv = 0, ss = 0;
            for (int64_t e = 0; e < E; ++e) {
              const T v = static_cast<T>(ck[e]);
              dv += xb[e] * v;
              ss += v * v;
            }
            den[k] = normalize ? std::max(std::sqrt(ss), T(kNormEps)) : T(1);
            cos[k] = dv / den[k];
            z[k] = sc * cos[k];
          }
          ce_row<T>(z.data(), K, tp[b], T(ls), grad, grad ? gp[b] : T(0), pp + b, dp + b);
          if (!grad) continue;
          // z now holds dL/dz. dxn = s sum_k dz_k cn_k; dc_k = s dz_k (xn - [active] cn_k cos_k) / den_k
          std::fill(acc.begin(), acc.end(), T(0));
          In* gcb = gcp + b * K * E;
          for (int64_t k = 0; k < K; ++k) {
            const In* ck = cb + k * E;
            In* gk = gcb + k * E;
            const T dzk = z[k];
            const T inv = T(1) / den[k];
            const T a = sc * dzk * inv;
            const bool active = normalize && den[k] > T(kNormEps);
            const T proj = active ? cos[k] * inv : T(0);
            for (int64_t e = 0; e < E; ++e) {
              const T cv = static_cast<T>(ck[e]);
              acc[e] += dzk * cv * inv;
              gk[e] = static_cast<In>(a * (xb[e] - cv * proj));
            }
          }
          for (int64_t e = 0; e < E; ++e) dxp[b * E + e] = sc * acc[e];
        }
      });
    });
    if (!grad) return {Tensor(), Tensor(), Tensor(), per};
    auto gs = dot.sum() / s;
    auto gx = normalize ? normalize_backward(dxn, xn, xden) : dxn;
    return {gx.to(x.scalar_type()), gc, gs, per};
  }
};

// ---- op entry points (CPU) ------------------------------------------------------------------------
Tensor fanout_cpu(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) { return fanout_forward(x, w, b); }
std::tuple<Tensor, Tensor, Tensor> fanout_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& w, bool hb) {
  return fanout_backward(g, x, w, hb);
}
Tensor dce_forward_cpu(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                       const c10::optional<Tensor>& domain, const Tensor& target, bool all_heads, double ls) {
  return std::get<3>(domain_ce<CpuRows>(Tensor(), x, w, b, domain, target, all_heads, ls));
}
Grads dce_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                       const c10::optional<Tensor>& domain, const Tensor& target, bool all_heads, double ls) {
  return domain_ce<CpuRows>(g, x, w, b, domain, target, all_heads, ls);
}
Tensor agree_forward_cpu(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, int64_t kind) {
  return std::get<3>(head_agreement<CpuRows>(Tensor(), x, w, b, kind));
}
Grads agree_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                         int64_t kind) {
  return head_agreement<CpuRows>(g, x, w, b, kind);
}
std::tuple<Tensor, Tensor> mapper_forward_cpu(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                                              const c10::optional<Tensor>& domain, bool residual, bool normalize) {
  return mapper_forward<CpuRows>(x, w, b, domain, residual, normalize);
}
std::tuple<Tensor, Tensor, Tensor> mapper_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& w,
                                                       const c10::optional<Tensor>& domain, const Tensor& out,
                                                       const Tensor& norm, bool residual, bool normalize) {
  return mapper_backward<CpuRows>(g, x, w, domain, out, norm, residual, normalize);
}
Tensor cosce_forward_cpu(const Tensor& x, const Tensor& c, const Tensor& scale, const Tensor& target, bool normalize,
                         double ls, int64_t ignore_index) {
  return std::get<3>(cosine_ce<CpuRows>(Tensor(), x, c, scale, target, normalize, ls, ignore_index));
}
Grads cosce_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& c, const Tensor& scale, const Tensor& target,
                         bool normalize, double ls, int64_t ignore_index) {
  return cosine_ce<CpuRows>(g, x, c, scale, target, normalize, ls, ignore_index);
}

}  // namespace
}  // namespace heads
}  // namespace dgkernels

TORCH_LIBRARY_FRAGMENT(dgkernels, m) {
  m.def("heads_fanout(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("heads_fanout_backward(Tensor g, Tensor x, Tensor w, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("heads_dce_forward(Tensor x, Tensor w, Tensor? b, Tensor? domain, Tensor target, bool all_heads, "
        "float label_smoothing) -> Tensor");
  m.def("heads_dce_backward(Tensor g, Tensor x, Tensor w, Tensor? b, Tensor? domain, Tensor target, bool all_heads, "
        "float label_smoothing) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("heads_agree_forward(Tensor x, Tensor w, Tensor? b, int kind) -> Tensor");
  m.def("heads_agree_backward(Tensor g, Tensor x, Tensor w, Tensor? b, int kind) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("heads_mapper_forward(Tensor x, Tensor w, Tensor? b, Tensor? domain, bool residual, bool normalize) "
        "-> (Tensor, Tensor)");
  m.def("heads_mapper_backward(Tensor g, Tensor x, Tensor w, Tensor? domain, Tensor out, Tensor norm, bool residual, "
        "bool normalize) -> (Tensor, Tensor, Tensor)");
  m.def("heads_cosce_forward(Tensor x, Tensor c, Tensor scale, Tensor target, bool normalize, float label_smoothing, "
        "int ignore_index) -> Tensor");
  m.def("heads_cosce_backward(Tensor g, Tensor x, Tensor c, Tensor scale, Tensor target, bool normalize, "
        "float label_smoothing, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dgkernels, CPU, m) {
  using namespace dgkernels::heads;
  m.impl("heads_fanout", &fanout_cpu);
  m.impl("heads_fanout_backward", &fanout_backward_cpu);
  m.impl("heads_dce_forward", &dce_forward_cpu);
  m.impl("heads_dce_backward", &dce_backward_cpu);
  m.impl("heads_agree_forward", &agree_forward_cpu);
  m.impl("heads_agree_backward", &agree_backward_cpu);
  m.impl("heads_mapper_forward", &mapper_forward_cpu);
  m.impl("heads_mapper_backward", &mapper_backward_cpu);
  m.impl("heads_cosce_forward", &cosce_forward_cpu);
  m.impl("heads_cosce_backward", &cosce_backward_cpu);
}
