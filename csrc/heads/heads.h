// Head ops (issue 4): device-generic orchestration shared by the CPU and CUDA kernels.
//
// The GEMMs run through ATen (at::mm / addmm on row blocks: MKL/oneDNN on CPU, cuBLAS on CUDA);
// the per-row work that a composition would spread over many passes (log-sum-exp, cross-entropy
// value and gradient, head agreement, normalisation) is one fused pass per tile, supplied by a
// `Rows` policy: CpuRows (csrc/heads/cpu.cpp, at::parallel_for loops) or CudaRows (cuda.cu).
// Nothing of size [B, D, K] or [B, K] is allocated: logits live in tiles of at most kTileElems
// elements, recomputed by the backward. Arithmetic is float32 (float64 for float64 inputs).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"

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
  auto xa = to_acc(x), wa = to_acc(w);
  Tensor ba = b_in.has_value() ? to_acc(*b_in) : Tensor();
  auto opts = xa.options();
  auto tgt = target.to(at::kLong).contiguous();
  Tensor g = grad ? g_in.to(opts.dtype()).contiguous() : Tensor();
  Tensor per = at::empty({B}, opts);
  Tensor gx, gw = grad ? at::zeros_like(wa) : Tensor(), gb = grad ? at::zeros({D, K}, opts) : Tensor();
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
      auto z = b2.defined() ? at::addmm(b2, xb, w2.t()) : at::mm(xb, w2.t());
      auto zr = z.view({n * D, K});
      auto per_rows = at::empty({n * D}, opts);
      Rows::ce(zr, tgt_rep.narrow(0, r0 * D, n * D), grad ? g_rep.narrow(0, r0 * D, n * D) : Tensor(), ls,
               per_rows, Tensor());
      per.narrow(0, r0, n).copy_(per_rows.view({n, D}).mean(1));
      if (grad) {
        auto gxb = gx.narrow(0, r0, n);
        at::mm_out(gxb, z, w2);
        gw2.addmm_(z.t(), xb);
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
        auto z = ba.defined() ? at::addmm(ba[d], xb, wd.t()) : at::mm(xb, wd.t());
        auto pr = per_s.narrow(0, r0, n);
        Rows::ce(z, ts.narrow(0, r0, n), grad ? gs.narrow(0, r0, n) : Tensor(), ls, pr, Tensor());
        if (grad) {
          auto gxb = gxs.narrow(0, r0, n);
          at::mm_out(gxb, z, wd);
          gw[d].addmm_(z.t(), xb);
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
  auto xa = to_acc(x), wa = to_acc(w);
  auto opts = xa.options();
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
    auto z = b2.defined() ? at::addmm(b2, xb, w2.t()) : at::mm(xb, w2.t());
    auto z3 = z.view({n, D, K});
    auto pr = per.narrow(0, r0, n);
    Rows::agree(z3, kind, grad ? g.narrow(0, r0, n) : Tensor(), pr);
    if (grad) {
      auto gxb = gx.narrow(0, r0, n);
      at::mm_out(gxb, z, w2);
      gw2.addmm_(z.t(), xb);
      gb2.add_(z.sum(0));
    }
  }
  if (!grad) return {Tensor(), Tensor(), Tensor(), per};
  return {gx.to(x.scalar_type()), gw2.view({D, K, F}).to(w.scalar_type()), gb2.view({D, K}).to(w.scalar_type()), per};
}

// ---- mapper_project ------------------------------------------------------------------------------
// y = x W^T + b (W shared [E, F] or per domain [D, E, F]); computed into `y` (acc type).
inline Tensor mapper_linear(const Tensor& xa, const Tensor& wa, const Tensor& ba, const c10::optional<Tensor>& domain) {
  if (wa.dim() == 2) return ba.defined() ? at::addmm(ba, xa, wa.t()) : at::mm(xa, wa.t());
  const int64_t D = wa.size(0), E = wa.size(1);
  auto G = group_by_domain(*domain, D);
  auto xs = xa.index_select(0, G.order);
  auto ys = at::empty({xa.size(0), E}, xa.options());
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = G.offsets[d + 1] - G.offsets[d];
    if (n == 0) continue;
    auto yb = ys.narrow(0, G.offsets[d], n);
    auto xb = xs.narrow(0, G.offsets[d], n);
    if (ba.defined()) at::addmm_out(yb, ba[d], xb, wa[d].t());
    else at::mm_out(yb, xb, wa[d].t());
  }
  return at::empty_like(ys).index_copy_(0, G.order, ys);
}

template <class Rows>
std::tuple<Tensor, Tensor> mapper_forward(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                                          const c10::optional<Tensor>& domain, bool residual, bool normalize) {
  auto xa = to_acc(x), wa = to_acc(w);
  auto y = mapper_linear(xa, wa, b.has_value() ? to_acc(*b) : Tensor(), domain).contiguous();
  auto norm = at::empty({normalize ? x.size(0) : 0}, xa.options());
  Rows::mapper_rows(xa, y, residual, normalize, norm);  // y becomes the output
  return {y.to(x.scalar_type()), norm};
}

template <class Rows>
std::tuple<Tensor, Tensor, Tensor> mapper_backward(const Tensor& g, const Tensor& x, const Tensor& w,
                                                   const c10::optional<Tensor>& domain, const Tensor& out,
                                                   const Tensor& norm, bool residual, bool normalize) {
  auto xa = to_acc(x), wa = to_acc(w);
  auto ga = to_acc(g);
  auto gr = normalize ? Rows::normalize_grad(ga, to_acc(out), norm) : ga;  // dL/d(pre-normalisation)
  auto gy = residual ? gr.neg() : gr;                                        // dL/d(x W^T + b)
  Tensor gx, gw, gb;
  if (wa.dim() == 2) {
    gx = at::mm(gy, wa);
    gw = at::mm(gy.t(), xa);
    gb = gy.sum(0);
  } else {
    const int64_t D = wa.size(0), F = wa.size(2);
    auto G = group_by_domain(*domain, D);
    auto xs = xa.index_select(0, G.order);
    auto gys = gy.index_select(0, G.order);
    auto gxs = at::empty({xa.size(0), F}, xa.options());
    gw = at::zeros_like(wa);
    gb = at::zeros({D, wa.size(1)}, xa.options());
    for (int64_t d = 0; d < D; ++d) {
      const int64_t n = G.offsets[d + 1] - G.offsets[d];
      if (n == 0) continue;
      auto gyb = gys.narrow(0, G.offsets[d], n);
      auto gxb = gxs.narrow(0, G.offsets[d], n);
      at::mm_out(gxb, gyb, wa[d]);
      gw[d].copy_(at::mm(gyb.t(), xs.narrow(0, G.offsets[d], n)));
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
  auto per = at::empty({B}, opts);
  auto dot = grad ? at::empty({B}, opts) : Tensor();
  Tensor dxn = grad ? at::empty({B, E}, opts) : Tensor();
  Tensor dcn = grad ? at::zeros({K, E}, opts) : Tensor();
  const int64_t R = tile_rows(K, B);
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    auto xb = xn.narrow(0, r0, n);
    auto z = at::mm(xb, cn.t()).mul_(s);
    auto pr = per.narrow(0, r0, n);
    Rows::ce(z, tgt.narrow(0, r0, n), grad ? g.narrow(0, r0, n) : Tensor(), ls, pr,
             grad ? dot.narrow(0, r0, n) : Tensor());
    if (grad) {
      auto db = dxn.narrow(0, r0, n);
      at::mm_out(db, z, cn);
      dcn.addmm_(z.t(), xb);
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
