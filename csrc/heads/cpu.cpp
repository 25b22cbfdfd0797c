// Head ops: schemas and CPU kernels. Orchestration (row blocks, GEMMs) in heads.h; here
// the fused per-row passes, parallel over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "heads/heads.h"

namespace dgkernels {
namespace heads {
namespace {

// Multiversioned hot loops: GCC clones each for AVX-512, AVX2+FMA and baseline x86-64 and picks one
// at load time (the extension is compiled without -march flags; on the dev box the AVX-512 clone
// of the cross-entropy row loop runs ~10x faster than the SSE2 one).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DGK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DGK_INLINE __attribute__((always_inline)) inline
#else
#define DGK_CLONES
#define DGK_INLINE inline
#endif

// exp/log for the fused loops: float32 Cephes-style range reduction + polynomial (about 1 ulp),
// branch-free so the loops vectorise; float64 keeps libm.
DGK_INLINE float fexp(float x) {
  x = std::max(x, -87.0f);
  x = std::min(x, 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const int32_t ni = static_cast<int32_t>(n);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
DGK_INLINE double fexp(double x) { return std::exp(x); }

DGK_INLINE float flog(float x) {  // x > 0 and normal (probabilities here are >= exp(-87))
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126);  // x = m 2^e, m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  const float fe = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}
DGK_INLINE double flog(double x) { return std::log(x); }

// Rows of cross-entropy with label smoothing (F.cross_entropy's definition):
//   loss = lse - (1 - ls) z_t - ls/K sum_k z_k;  dL/dz_k = g (softmax_k - ls/K - (1 - ls)[k == t]).
// t < 0: ignored row (loss 0, gradient 0). With g, z is overwritten by dL/dz and dot (if given)
// gets sum_k dL/dz_k z_k (for the logit scale's gradient).
template <typename T>
DGK_INLINE void ce_rows_body(T* zp, const int64_t* tp, const T* gp, T* pp, T* dp, int64_t n, int64_t K, T ls) {
  const T smooth = ls / T(K);
  for (int64_t r = 0; r < n; ++r) {
    T* z = zp + r * K;
    const int64_t t = tp[r];
    if (t < 0) {
      pp[r] = 0;
      if (gp) {
        for (int64_t k = 0; k < K; ++k) z[k] = 0;
        if (dp) dp[r] = 0;
      }
      continue;
    }
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) m = std::max(m, z[k]);
    T sum = 0, zsum = 0;
#pragma omp simd reduction(+ : sum, zsum)
    for (int64_t k = 0; k < K; ++k) {
      sum += fexp(z[k] - m);
      zsum += z[k];
    }
    const T lse = m + flog(sum);
    const T zt = z[t];
    pp[r] = lse - (T(1) - ls) * zt - smooth * zsum;
    if (!gp) continue;
    const T g = gp[r];
    T d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t k = 0; k < K; ++k) {
      const T v = g * (fexp(z[k] - lse) - smooth);
      d += v * z[k];
      z[k] = v;
    }
    z[t] -= g * (T(1) - ls);
    if (dp) dp[r] = d - g * (T(1) - ls) * zt;
  }
}
DGK_CLONES void ce_rows_f32(float* z, const int64_t* t, const float* g, float* per, float* dot, int64_t n, int64_t K,
                            float ls) {
  ce_rows_body<float>(z, t, g, per, dot, n, K, ls);
}
void ce_rows_f64(double* z, const int64_t* t, const double* g, double* per, double* dot, int64_t n, int64_t K,
                 double ls) {
  ce_rows_body<double>(z, t, g, per, dot, n, K, ls);
}

// Head agreement rows: z [n, D, K] logits of D heads per row; scratch holds (D + 2) K values.
// kind 0: mean_d KL(p_d || m), m = mean_d p_d;  dJ/dz_dk = g/D p_dk (lp_dk - log m_k - KL_d).
// kind 1: mean over unordered pairs of symmetric KL = S / (D (D - 1) / 2) with
//   S = sum_{d != e} KL(p_d || p_e) = D sum_{d,k} p lp - sum_k P_k L_k  (P = sum_d p, L = sum_d lp);
//   dS/dz_dk = p_dk (a_dk - <p_d, a_d>) + D p_dk - P_k with a_dk = D lp_dk - L_k.
template <typename T>
DGK_INLINE void agree_rows_body(T* zp, const T* gp, T* pp, int64_t n, int64_t D, int64_t K, int64_t kind, T* scratch) {
  T* p = scratch;
  T* colA = scratch + D * K;
  T* colB = colA + K;
  for (int64_t r = 0; r < n; ++r) {
    T* lp = zp + r * D * K;  // becomes log-probabilities, then dJ/dz
    for (int64_t d = 0; d < D; ++d) {
      T* row = lp + d * K;
      T* prow = p + d * K;
      T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < K; ++k) m = std::max(m, row[k]);
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += fexp(row[k] - m);
      const T lse = m + flog(s);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        row[k] -= lse;
        prow[k] = fexp(row[k]);
      }
    }
    for (int64_t k = 0; k < K; ++k) colA[k] = colB[k] = 0;
    for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        colA[k] += p[d * K + k];
        colB[k] += lp[d * K + k];
      }
    }
    const T g = gp ? gp[r] : T(0);
    if (kind == 0) {
      const T logD = flog(T(D));
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) colB[k] = flog(colA[k]) - logD;  // log m_k
      T total = 0;
      for (int64_t d = 0; d < D; ++d) {
        T* lrow = lp + d * K;
        const T* prow = p + d * K;
        T kl = 0;
#pragma omp simd reduction(+ : kl)
        for (int64_t k = 0; k < K; ++k) kl += prow[k] * (lrow[k] - colB[k]);
        total += kl;
        if (gp) {
          const T c = g / T(D);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) lrow[k] = c * prow[k] * (lrow[k] - colB[k] - kl);
        }
      }
      pp[r] = total / T(D);
    } else {
      T plp = 0, cross = 0;
#pragma omp simd reduction(+ : plp)
      for (int64_t i = 0; i < D * K; ++i) plp += p[i] * lp[i];
#pragma omp simd reduction(+ : cross)
      for (int64_t k = 0; k < K; ++k) cross += colA[k] * colB[k];
      const T norm = T(2) / (T(D) * T(D - 1));
      pp[r] = (T(D) * plp - cross) * norm;
      if (gp) {
        const T c = g * norm;
        for (int64_t d = 0; d < D; ++d) {
          T* lrow = lp + d * K;
          const T* prow = p + d * K;
          T pa = 0;
#pragma omp simd reduction(+ : pa)
          for (int64_t k = 0; k < K; ++k) pa += prow[k] * (T(D) * lrow[k] - colB[k]);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k)
            lrow[k] = c * (prow[k] * (T(D) * lrow[k] - colB[k] - pa) + T(D) * prow[k] - colA[k]);
        }
      }
    }
  }
}
DGK_CLONES void agree_rows_f32(float* z, const float* g, float* per, int64_t n, int64_t D, int64_t K, int64_t kind,
                               float* scratch) {
  agree_rows_body<float>(z, g, per, n, D, K, kind, scratch);
}
void agree_rows_f64(double* z, const double* g, double* per, int64_t n, int64_t D, int64_t K, int64_t kind,
                    double* scratch) {
  agree_rows_body<double>(z, g, per, n, D, K, kind, scratch);
}

inline void ce_rows(float* z, const int64_t* t, const float* g, float* per, float* dot, int64_t n, int64_t K, float ls) {
  ce_rows_f32(z, t, g, per, dot, n, K, ls);
}
inline void ce_rows(double* z, const int64_t* t, const double* g, double* per, double* dot, int64_t n, int64_t K,
                    double ls) {
  ce_rows_f64(z, t, g, per, dot, n, K, ls);
}
inline void agree_rows(float* z, const float* g, float* per, int64_t n, int64_t D, int64_t K, int64_t kind, float* s) {
  agree_rows_f32(z, g, per, n, D, K, kind, s);
}
inline void agree_rows(double* z, const double* g, double* per, int64_t n, int64_t D, int64_t K, int64_t kind,
                       double* s) {
  agree_rows_f64(z, g, per, n, D, K, kind, s);
}

// Per-sample class embeddings, samples [b0, b1): each streams its own K x E block of c twice
// (logits, then gradients), reading c in its own dtype. Scratch: 3 K + E values of T.
template <typename In, typename T>
DGK_INLINE void cos_ps_body(const In* cp, In* gcp, const T* xp, const T* gp, const int64_t* tp, T* pp, T* dp, T* dxp,
                            int64_t b0, int64_t b1, int64_t K, int64_t E, T sc, T ls, bool normalize, T* scratch) {
  T* z = scratch;
  T* cos = z + K;
  T* den = cos + K;
  T* acc = den + K;
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = xp + b * E;
    const In* cb = cp + b * K * E;
    for (int64_t k = 0; k < K; ++k) {
      const In* ck = cb + k * E;
      T dv = 0, ss = 0;
#pragma omp simd reduction(+ : dv, ss)
      for (int64_t e = 0; e < E; ++e) {
        const T v = static_cast<T>(ck[e]);
        dv += xb[e] * v;
        ss += v * v;
      }
      den[k] = normalize ? std::max(std::sqrt(ss), T(kNormEps)) : T(1);
      cos[k] = dv / den[k];
      z[k] = sc * cos[k];
    }
    ce_rows_body<T>(z, tp + b, gp ? gp + b : nullptr, pp + b, dp ? dp + b : nullptr, 1, K, ls);
    if (!gp) continue;
    // z holds dL/dz. dxn = s sum_k dz_k c_k / den_k; dc_k = s dz_k / den_k (xn - [active] c_k cos_k / den_k)
    for (int64_t e = 0; e < E; ++e) acc[e] = 0;
    In* gcb = gcp + b * K * E;
    for (int64_t k = 0; k < K; ++k) {
      const In* ck = cb + k * E;
      In* gk = gcb + k * E;
      const T inv = T(1) / den[k];
      const T w = z[k] * inv;
      const T a = sc * w;
      const T proj = (normalize && den[k] > T(kNormEps)) ? cos[k] * inv : T(0);
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        const T cv = static_cast<T>(ck[e]);
        acc[e] += w * cv;
        gk[e] = static_cast<In>(a * (xb[e] - cv * proj));
      }
    }
    for (int64_t e = 0; e < E; ++e) dxp[b * E + e] = sc * acc[e];
  }
}
#define DGK_COS_PS(NAME, IN, T, ATTR)                                                                              \
  ATTR void NAME(const IN* cp, IN* gcp, const T* xp, const T* gp, const int64_t* tp, T* pp, T* dp, T* dxp, int64_t b0, \
                 int64_t b1, int64_t K, int64_t E, T sc, T ls, bool normalize, T* scratch) {                          \
    cos_ps_body<IN, T>(cp, gcp, xp, gp, tp, pp, dp, dxp, b0, b1, K, E, sc, ls, normalize, scratch);                 \
  }
DGK_COS_PS(cos_ps_f32, float, float, DGK_CLONES)
DGK_COS_PS(cos_ps_bf16, c10::BFloat16, float, DGK_CLONES)
DGK_COS_PS(cos_ps_f16, c10::Half, float, DGK_CLONES)
DGK_COS_PS(cos_ps_f64, double, double, )
inline void cos_ps(const float* c, float* gc, const float* x, const float* g, const int64_t* t, float* p, float* d,
                   float* dx, int64_t b0, int64_t b1, int64_t K, int64_t E, float sc, float ls, bool nz, float* s) {
  cos_ps_f32(c, gc, x, g, t, p, d, dx, b0, b1, K, E, sc, ls, nz, s);
}
inline void cos_ps(const c10::BFloat16* c, c10::BFloat16* gc, const float* x, const float* g, const int64_t* t,
                   float* p, float* d, float* dx, int64_t b0, int64_t b1, int64_t K, int64_t E, float sc, float ls,
                   bool nz, float* s) {
  cos_ps_bf16(c, gc, x, g, t, p, d, dx, b0, b1, K, E, sc, ls, nz, s);
}
inline void cos_ps(const c10::Half* c, c10::Half* gc, const float* x, const float* g, const int64_t* t, float* p,
                   float* d, float* dx, int64_t b0, int64_t b1, int64_t K, int64_t E, float sc, float ls, bool nz,
                   float* s) {
  cos_ps_f16(c, gc, x, g, t, p, d, dx, b0, b1, K, E, sc, ls, nz, s);
}
inline void cos_ps(const double* c, double* gc, const double* x, const double* g, const int64_t* t, double* p,
                   double* d, double* dx, int64_t b0, int64_t b1, int64_t K, int64_t E, double sc, double ls, bool nz,
                   double* s) {
  cos_ps_f64(c, gc, x, g, t, p, d, dx, b0, b1, K, E, sc, ls, nz, s);
}

struct CpuRows {
  static constexpr bool kHalfGemm = false;  // fp32 inside (upcast operands)
  static void ce(Tensor& z, const Tensor& tgt, const Tensor& g, double ls, Tensor& per, Tensor dot) {
    const int64_t R = z.size(0), K = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_ce_rows", [&] {
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = tgt.data_ptr<int64_t>();
      const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = per.data_ptr<scalar_t>();
      scalar_t* dp = dot.defined() ? dot.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
        ce_rows(zp + r0 * K, tp + r0, gp ? gp + r0 : nullptr, pp + r0, dp ? dp + r0 : nullptr, r1 - r0, K,
                scalar_t(ls));
      });
    });
  }

  static void agree(Tensor& z, int64_t kind, const Tensor& g, Tensor& per) {
    const int64_t R = z.size(0), D = z.size(1), K = z.size(2);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_agree_rows", [&] {
      scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = per.data_ptr<scalar_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D * K, 1)), [&](int64_t r0, int64_t r1) {
        std::vector<scalar_t> scratch((D + 2) * K);
        agree_rows(zp + r0 * D * K, gp ? gp + r0 : nullptr, pp + r0, r1 - r0, D, K, kind, scratch.data());
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

  static Grads cosine_per_sample(const Tensor& g, const Tensor& x, const Tensor& c_in, const Tensor& s,
                                 const Tensor& tgt, bool normalize, double ls) {
    const int64_t B = x.size(0), E = x.size(1), K = c_in.size(1);
    const bool grad = g.defined();
    auto c = c_in.contiguous();
    auto xa = to_acc(x);
    Tensor xn = xa, xden;
    if (normalize) std::tie(xn, xden) = normalize_rows(xa);
    xn = xn.contiguous();
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
      T* dp = grad ? dot.data_ptr<T>() : nullptr;
      T* dxp = grad ? dxn.data_ptr<T>() : nullptr;
      const T sc = s.item<T>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> scratch(3 * K + E);
        cos_ps(cp, gcp, xp, gp, tp, pp, dp, dxp, b0, b1, K, E, sc, T(ls), normalize, scratch.data());
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
