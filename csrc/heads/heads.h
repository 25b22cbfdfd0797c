// Head ops: device-generic orchestration shared by the CPU and CUDA kernels.
//
// The GEMMs run through ATen (at::mm / addmm on row blocks: MKL/oneDNN on CPU, cuBLAS on CUDA);
// the per-row work that a composition would spread over many passes (log-sum-exp, cross-entropy
// value and gradient, head agreement, normalisation) is one fused pass per tile, supplied by a
// `Rows` policy: CpuRows (csrc/heads/cpu.cpp, at::parallel_for loops) or CudaRows (cuda.cu).
// Nothing of size [B, D, K] or [B, K] is allocated: logits live in tiles of at most kTileElems
// elements, recomputed by the backward. Arithmetic is float32 (float64 for float64 inputs).
//
// GEMM precision: a Rows policy with kHalfGemm (CUDA) keeps fp16/bf16 operands in the input dtype
// and runs the GEMMs on tensor cores with fp32 accumulation and fp32 output (aten::mm.dtype); the
// gradient factors (fp32, of order g / rows, below fp16's normal range in the small-gradient regime,
// DESIGN 5.4) are scaled by exact powers of two per row before their cast (grad_mm). Elsewhere the
// operands are upcast and every GEMM runs in the accumulation type (the CPU path: fp32 inside).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"
#include "contrastive/tiled.h"  // pow2_scale

namespace dgkernels {
namespace heads {

using at::Tensor;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// Logit tiles: about 2**20 elements (4 MiB in float32) but at least kMinTileRows rows, since
// thinner GEMMs run far below peak (measured on the 2-core dev box: 8 GF/s at 150 rows, 23 at 1024).
constexpr int64_t kTileElems = int64_t(1) << 20;
constexpr int64_t kMinTileRows = 1024;
constexpr double kNormEps = 1e-12;                 // F.normalize's eps

inline at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline Tensor to_acc(const Tensor& t) { return t.to(acc_type(t)).contiguous(); }
inline int64_t tile_rows(int64_t per_row, int64_t rows) {
  const int64_t want = std::max<int64_t>(kMinTileRows, kTileElems / std::max<int64_t>(per_row, 1));
  return std::max<int64_t>(1, std::min<int64_t>(rows, want));
}

// ---- GEMMs in the operand dtype with accumulation-type output -------------------------------------
// The half path: on, and x and w (the GEMM operands) share an fp16/bf16 dtype.
inline bool half_gemm(bool enabled, const Tensor& x, const Tensor& w) {
  const auto t = x.scalar_type();
  return enabled && (t == at::kHalf || t == at::kBFloat16) && w.scalar_type() == t;
}
// GEMM operand: the input itself on the half path, else upcast to the accumulation type.
inline Tensor to_op(const Tensor& t, bool half) { return half ? t.contiguous() : to_acc(t); }

// A B in `acc` of operands in their own dtype: cuBLAS with fp32 accumulation and output for half
// operands on CUDA; upcast operands elsewhere (products of halves are exact in fp32: same numbers).
inline Tensor mm_acc(const Tensor& A, const Tensor& B, at::ScalarType acc) {
  if (A.scalar_type() == acc) return at::mm(A, B);
  if (A.is_cuda()) return at::mm(A, B, acc);
  return at::mm(A.to(acc), B.to(acc));
}
// x w^T (+ b) in `acc`: the logits of a row tile.
inline Tensor linear_acc(const Tensor& x, const Tensor& w, const Tensor& b, at::ScalarType acc) {
  if (x.scalar_type() == acc) return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
  auto y = mm_acc(x, w.t(), acc);
  return b.defined() ? y.add_(b) : y;
}
// A B for a gradient factor A (acc type) and an operand B (op dtype). Half B: each row of A is
// multiplied by c = 2^(15 - ceil(log2 max|row|)) (exact, entries <= 2^15) before the cast, so a row
// of order 1e-9 keeps fp16's 11 bits instead of flushing to subnormals; (c A) B / c = A B exactly
// up to the cast's rounding.
inline Tensor grad_mm(const Tensor& A, const Tensor& B) {
  const auto acc = A.scalar_type();
  if (B.scalar_type() == acc) return at::mm(A, B);
  auto c = contrastive::pow2_scale(A, 1).unsqueeze(1);
  return mm_acc((A * c).to(B.scalar_type()), B, acc).div_(c);
}
inline void grad_mm_out(Tensor& out, const Tensor& A, const Tensor& B) {
  if (B.scalar_type() == A.scalar_type()) at::mm_out(out, A, B);
  else out.copy_(grad_mm(A, B));
}
inline void grad_addmm_(Tensor& C, const Tensor& A, const Tensor& B) {
  if (B.scalar_type() == A.scalar_type()) C.addmm_(A, B);
  else C.add_(grad_mm(A, B));
}

// Samples grouped by domain: order[i] = original row of sorted row i; offsets on the host (one
// device->host copy of D counts).
struct Groups {
  Tensor order;
  std::vector<int64_t> offsets;
};
inline Groups group_by_domain(const Tensor& domain, int64_t D) {
  auto d = domain.to(at::kLong);
  Groups g;
  g.order = std::get<1>(d.sort(/*stable=*/true, 0, false));
  auto counts = at::bincount(d, {}, D).cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  g.offsets.assign(D + 1, 0);
  for (int64_t i = 0; i < D; ++i) g.offsets[i + 1] = g.offsets[i] + c[i];
  return g;
}

// Rows of x / max(||x||, eps) and the divisor.
inline std::pair<Tensor, Tensor> normalize_rows(const Tensor& x) {
  auto den = x.norm(2, {-1}, true).clamp_min(kNormEps);
  return {x / den, den};
}
// Gradient through y = x / max(||x||, eps) given y, the divisor and dL/dy.
inline Tensor normalize_backward(const Tensor& gy, const Tensor& y, const Tensor& den) {
  auto active = (den > kNormEps).to(y.scalar_type());  // the clamp cuts the projection term
  return (gy - y * (y * gy).sum(-1, true) * active) / den;
}

// ---- domain_fanout: a plain GEMM with the heads stacked as D*K output rows -----------------------
inline Tensor fanout_forward(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  const int64_t B = x.size(0), D = w.size(0), K = w.size(1), F = w.size(2);
  auto w2 = w.reshape({D * K, F});
  auto out = b.has_value() ? at::addmm(b->reshape({D * K}), x, w2.t()) : at::mm(x, w2.t());
  return out.view({B, D, K});
}
inline std::tuple<Tensor, Tensor, Tensor> fanout_backward(const Tensor& g, const Tensor& x, const Tensor& w, bool) {
  const int64_t B = x.size(0), D = w.size(0), K = w.size(1), F = w.size(2);
  auto g2 = g.reshape({B, D * K});
  auto gx = at::mm(g2, w.reshape({D * K, F}));
  auto gw = at::mm(g2.t(), x).view({D, K, F});
  auto gb = g2.sum(0).view({D, K});
  return {gx, gw, gb};
}

// ---- domain_cross_entropy ------------------------------------------------------------------------
// g undefined: forward only (per-sample losses). g defined: per-sample losses and gradients.
template <class Rows>
Grads domain_ce(const Tensor& g_in, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b_in,
                const c10::optional<Tensor>& domain, const Tensor& target, bool all_heads, double ls) {
  const int64_t B = x.size(0), D = w.size(0), K = w.size(1), F = w.size(2);
  const bool grad = g_in.defined();
  const bool half = half_gemm(Rows::kHalfGemm, x, w);
  const auto acc = acc_type(x);
  auto xa = to_op(x, half), wa = to_op(w, half);  // GEMM operands
  Tensor ba = b_in.has_value() ? to_acc(*b_in) : Tensor();
  auto opts = x.options().dtype(acc);
  auto tgt = target.to(at::kLong).contiguous();
  Tensor g = grad ? g_in.to(opts.dtype()).contiguous() : Tensor();
  Tensor per = at::empty({B}, opts);
  Tensor gx, gw = grad ? at::zeros(w.sizes(), opts) : Tensor(), gb = grad ? at::zeros({D, K}, opts) : Tensor();
  if (all_heads || D == 1) {
    auto w2 = wa.view({D * K, F});
    auto tgt_rep = tgt.repeat_interleave(D);
    Tensor g_rep = grad ? (g / double(D)).repeat_interleave(D) : Tensor();
    if (grad) gx = at::empty({B, F}, opts);
    auto gw2 = grad ? gw.view({D * K, F}) : Tensor();
    auto gb2 = grad ? gb.view({D * K}) : Tensor();
    auto b2 = ba.defined() ? ba.view({D * K}) : Tensor();
    const int64_t R = tile_rows(D * K, B);
    for (int64_t r0 = 0; r0 < B; r0 += R) {
      const int64_t n = std::min(R, B - r0);
      auto xb = xa.narrow(0, r0, n);
      auto z = linear_acc(xb, w2, b2, acc);
      auto zr = z.view({n * D, K});
      auto per_rows = at::empty({n * D}, opts);
      Rows::ce(zr, tgt_rep.narrow(0, r0 * D, n * D), grad ? g_rep.narrow(0, r0 * D, n * D) : Tensor(), ls,
               per_rows, Tensor());
      per.narrow(0, r0, n).copy_(per_rows.view({n, D}).mean(1));
      if (grad) {
        auto gxb = gx.narrow(0, r0, n);
        grad_mm_out(gxb, z, w2);
        grad_addmm_(gw2, z.t(), xb);
        gb2.add_(z.sum(0));
      }
    }
  } else {
    // Own head only: sort samples by domain, one GEMM per (domain, row block).
    auto G = group_by_domain(*domain, D);
    auto xs = xa.index_select(0, G.order);
    auto ts = tgt.index_select(0, G.order);
    Tensor gs = grad ? g.index_select(0, G.order) : Tensor();
    auto per_s = at::empty({B}, opts);
    Tensor gxs = grad ? at::empty({B, F}, opts) : Tensor();
    const int64_t R = tile_rows(K, B);
    for (int64_t d = 0; d < D; ++d) {
      auto wd = wa[d];
      for (int64_t r0 = G.offsets[d]; r0 < G.offsets[d + 1]; r0 += R) {
        const int64_t n = std::min(R, G.offsets[d + 1] - r0);
        auto xb = xs.narrow(0, r0, n);
        auto z = linear_acc(xb, wd, ba.defined() ? ba[d] : Tensor(), acc);
        auto pr = per_s.narrow(0, r0, n);
        Rows::ce(z, ts.narrow(0, r0, n), grad ? gs.narrow(0, r0, n) : Tensor(), ls, pr, Tensor());
        if (grad) {
          auto gxb = gxs.narrow(0, r0, n);
          grad_mm_out(gxb, z, wd);
          auto gwd = gw[d];
          grad_addmm_(gwd, z.t(), xb);
          gb[d].add_(z.sum(0));
        }
      }
    }
    per.index_copy_(0, G.order, per_s);
    if (grad) gx = at::empty_like(gxs).index_copy_(0, G.order, gxs);
  }
  if (!grad) return {Tensor(), Tensor(), Tensor(), per};
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type()), gb.to(w.scalar_type()), per};
}

// ---- head_agreement ------------------------------------------------------------------------------
template <class Rows>
Grads head_agreement(const Tensor& g_in, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b_in,
                     int64_t kind) {
  const int64_t B = x.size(0), D = w.size(0), K = w.size(1), F = w.size(2);
  TORCH_CHECK(kind == 0 || kind == 1, "head_agreement: kind must be 0 (kl) or 1 (sym_kl), got ", kind);
  TORCH_CHECK(kind == 0 || D >= 2, "head_agreement: sym_kl needs at least 2 heads, got D = ", D);
  const bool grad = g_in.defined();
  const bool half = half_gemm(Rows::kHalfGemm, x, w);
  const auto acc = acc_type(x);
  auto xa = to_op(x, half), wa = to_op(w, half);  // GEMM operands
  auto opts = x.options().dtype(acc);
  auto w2 = wa.view({D * K, F});
  Tensor b2 = b_in.has_value() ? to_acc(*b_in).view({D * K}) : Tensor();
  Tensor g = grad ? g_in.to(opts.dtype()).contiguous() : Tensor();
  auto per = at::empty({B}, opts);
  Tensor gx = grad ? at::empty({B, F}, opts) : Tensor();
  Tensor gw2 = grad ? at::zeros({D * K, F}, opts) : Tensor();
  Tensor gb2 = grad ? at::zeros({D * K}, opts) : Tensor();
  const int64_t R = tile_rows(D * K, B);
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    auto xb = xa.narrow(0, r0, n);
    auto z = linear_acc(xb, w2, b2, acc);
    auto z3 = z.view({n, D, K});
    auto pr = per.narrow(0, r0, n);
    Rows::agree(z3, kind, grad ? g.narrow(0, r0, n) : Tensor(), pr);
    if (grad) {
      auto gxb = gx.narrow(0, r0, n);
      grad_mm_out(gxb, z, w2);
      grad_addmm_(gw2, z.t(), xb);
      gb2.add_(z.sum(0));
    }
  }
  if (!grad) return {Tensor(), Tensor(), Tensor(), per};
  return {gx.to(x.scalar_type()), gw2.view({D, K, F}).to(w.scalar_type()), gb2.view({D, K}).to(w.scalar_type()), per};
}

// ---- mapper_project ------------------------------------------------------------------------------
// y = x W^T + b (W shared [E, F] or per domain [D, E, F]) in `acc` from operands xa, wa.
inline Tensor mapper_linear(const Tensor& xa, const Tensor& wa, const Tensor& ba, const c10::optional<Tensor>& domain,
                            at::ScalarType acc) {
  if (wa.dim() == 2) return linear_acc(xa, wa, ba, acc);
  const int64_t D = wa.size(0), E = wa.size(1);
  auto G = group_by_domain(*domain, D);
  auto xs = xa.index_select(0, G.order);
  auto ys = at::empty({xa.size(0), E}, xa.options().dtype(acc));
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = G.offsets[d + 1] - G.offsets[d];
    if (n == 0) continue;
    auto yb = ys.narrow(0, G.offsets[d], n);
    auto xb = xs.narrow(0, G.offsets[d], n);
    yb.copy_(linear_acc(xb, wa[d], ba.defined() ? ba[d] : Tensor(), acc));
  }
  return at::empty_like(ys).index_copy_(0, G.order, ys);
}

template <class Rows>
std::tuple<Tensor, Tensor> mapper_forward(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                                          const c10::optional<Tensor>& domain, bool residual, bool normalize) {
  const bool half = half_gemm(Rows::kHalfGemm, x, w);
  const auto acc = acc_type(x);
  auto xa = to_op(x, half), wa = to_op(w, half);
  auto y = mapper_linear(xa, wa, b.has_value() ? to_acc(*b) : Tensor(), domain, acc).contiguous();
  auto norm = at::empty({normalize ? x.size(0) : 0}, y.options());
  Rows::mapper_rows(half ? to_acc(x) : xa, y, residual, normalize, norm);  // y becomes the output
  return {y.to(x.scalar_type()), norm};
}

template <class Rows>
std::tuple<Tensor, Tensor, Tensor> mapper_backward(const Tensor& g, const Tensor& x, const Tensor& w,
                                                   const c10::optional<Tensor>& domain, const Tensor& out,
                                                   const Tensor& norm, bool residual, bool normalize) {
  const bool half = half_gemm(Rows::kHalfGemm, x, w);
  auto xa = to_op(x, half), wa = to_op(w, half);
  auto ga = to_acc(g);
  auto opts = ga.options();
  auto gr = normalize ? Rows::normalize_grad(ga, to_acc(out), norm) : ga;  // dL/d(pre-normalisation)
  auto gy = residual ? gr.neg() : gr;                                        // dL/d(x W^T + b)
  Tensor gx, gw, gb;
  if (wa.dim() == 2) {
    gx = grad_mm(gy, wa);
    gw = grad_mm(gy.t(), xa);
    gb = gy.sum(0);
  } else {
    const int64_t D = wa.size(0), F = wa.size(2);
    auto G = group_by_domain(*domain, D);
    auto xs = xa.index_select(0, G.order);
    auto gys = gy.index_select(0, G.order);
    auto gxs = at::empty({xa.size(0), F}, opts);
    gw = at::zeros(wa.sizes(), opts);
    gb = at::zeros({D, wa.size(1)}, opts);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t n = G.offsets[d + 1] - G.offsets[d];
      if (n == 0) continue;
      auto gyb = gys.narrow(0, G.offsets[d], n);
      auto gxb = gxs.narrow(0, G.offsets[d], n);
      grad_mm_out(gxb, gyb, wa[d]);
      gw[d].copy_(grad_mm(gyb.t(), xs.narrow(0, G.offsets[d], n)));
      gb[d].copy_(gyb.sum(0));
    }
    gx = at::empty_like(gxs).index_copy_(0, G.order, gxs);
  }
  if (residual) gx.add_(gr);
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type()), gb.to(w.scalar_type())};
}

// ---- cosine_cross_entropy ------------------------------------------------------------------------
template <class Rows>
Grads cosine_ce(const Tensor& g_in, const Tensor& x, const Tensor& c, const Tensor& scale, const Tensor& target,
                bool normalize, double ls, int64_t ignore_index) {
  const int64_t B = x.size(0), E = x.size(1);
  const bool grad = g_in.defined();
  auto acc = acc_type(x);
  auto opts = x.options().dtype(acc);
  auto s = scale.to(acc).reshape({});
  auto tgt = at::where(target == ignore_index, at::full({}, -1, target.options()), target).to(at::kLong).contiguous();
  Tensor g = grad ? g_in.to(acc).contiguous() : Tensor();
  if (c.dim() == 3) {
    auto res = Rows::cosine_per_sample(g, x, c, s, tgt, normalize, ls);
    if (grad) std::get<2>(res) = std::get<2>(res).to(scale.scalar_type()).reshape(scale.sizes());
    return res;
  }

  const int64_t K = c.size(0);
  auto xa = to_acc(x), ca = to_acc(c);
  Tensor xn = xa, xden, cn = ca, cden;
  if (normalize) {
    std::tie(xn, xden) = normalize_rows(xa);
    std::tie(cn, cden) = normalize_rows(ca);
  }
  // Half path: the GEMMs take the raw rows (exact in the input dtype) and fp32 reciprocal norms
  // scale the products, cos = (x . c) / (|x| |c|): rounding x / |x| to half instead would cost
  // dscale = sum dz cos / s its accuracy (the sum cancels). dxn = s dz cn = s (dz / |c|^T) c and
  // dcn = s dz^T xn = s (dz / |x|)^T x likewise.
  const bool half = half_gemm(Rows::kHalfGemm, x, c), raw = half && normalize;
  const Tensor xo = half ? x.contiguous() : xn, co = half ? c.contiguous() : cn;
  const Tensor rx = raw ? xden.reciprocal() : Tensor(), rc = raw ? cden.reciprocal().t() : Tensor();  // [B,1], [1,K]
  auto per = at::empty({B}, opts);
  auto dot = grad ? at::empty({B}, opts) : Tensor();
  Tensor dxn = grad ? at::empty({B, E}, opts) : Tensor();
  Tensor dcn = grad ? at::zeros({K, E}, opts) : Tensor();
  const int64_t R = tile_rows(K, B);
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    auto xb = xo.narrow(0, r0, n);
    auto z = mm_acc(xb, co.t(), acc);
    if (raw) z.mul_(rx.narrow(0, r0, n)).mul_(rc);
    z.mul_(s);
    auto pr = per.narrow(0, r0, n);
    Rows::ce(z, tgt.narrow(0, r0, n), grad ? g.narrow(0, r0, n) : Tensor(), ls, pr,
             grad ? dot.narrow(0, r0, n) : Tensor());
    if (grad) {
      auto db = dxn.narrow(0, r0, n);
      if (raw) {
        grad_mm_out(db, z * rc, co);
        grad_addmm_(dcn, (z * rx.narrow(0, r0, n)).t(), xb);
      } else {
        grad_mm_out(db, z, co);
        grad_addmm_(dcn, z.t(), xb);
      }
    }
  }
  if (!grad) return {Tensor(), Tensor(), Tensor(), per};
  dxn.mul_(s);
  dcn.mul_(s);
  auto gs = dot.sum() / s;  // sum dz * z = s * sum dz * cos
  auto gx = normalize ? normalize_backward(dxn, xn, xden) : dxn;
  auto gc = normalize ? normalize_backward(dcn, cn, cden) : dcn;
  return {gx.to(x.scalar_type()), gc.to(c.scalar_type()), gs.to(scale.scalar_type()).reshape(scale.sizes()), per};
}

}  // namespace heads
}  // namespace dgkernels
