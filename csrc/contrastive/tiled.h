// Tiled row/column log-sum-exp of S = scale * Q K^T and its backward, without ever holding S.
//
// Shared by the CPU kernels (tiles spread over threads with at::parallel_for) and the CUDA
// kernels (tiles issued in order on the current stream). Each tile is one GEMM through at::
// (MKL / cuBLAS on views of the inputs) followed by elementwise exp/reduce ATen ops, which are
// vectorised and dispatched at run time; only a few tile buffers live at once, so the memory
// beyond inputs and outputs is O(N + M + threads * tile).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.h"

namespace dgkernels::contrastive {

// The logit scale. On CUDA it stays in device memory (`dev`, a 0-d tensor of the accumulation
// dtype) and enters the tiles as a tensor operand, so no call copies it to the host (a
// device->host copy per call would synchronise the stream). On the CPU the value is read once
// (`host`, no synchronisation there) and folded into the GEMM's alpha.
struct Scale {
  at::Tensor dev;    // defined: the device path
  double host = 1;   // the value, when dev is undefined

  void mul(at::Tensor& x) const {
    if (dev.defined()) x.mul_(dev); else x.mul_(host);
  }
  void div(at::Tensor x) const {
    if (dev.defined()) x.div_(dev); else x.div_(host);
  }
};

// A one-element floating tensor holding the scale (checked, not read).
inline void check_scale(const at::Tensor& scale, const at::Tensor& q) {
  TORCH_CHECK(scale.numel() == 1, "scale must be a one-element tensor, got shape ", scale.sizes());
  DGK_CHECK_FLOAT(scale, "scale");
  TORCH_CHECK(scale.device() == q.device(), "scale must be on the inputs' device ", q.device(), ", got ",
              scale.device());
}

struct Tiling {
  int64_t bm;      // rows of Q per tile
  int64_t bn;      // rows of K per tile
  bool parallel;   // spread row blocks over at::parallel_for threads (CPU)
  bool half_gemm;  // fp16/bf16 inputs: tile GEMMs in the input dtype with fp32 output (tensor cores)
};

// C = A B in fp32. half: A, B in fp16/bf16, products exact in fp32 and fp32 accumulation (cuBLAS
// through aten::mm.dtype on CUDA; upcast operands elsewhere, the same numbers).
inline void gemm_f32(at::Tensor& C, const at::Tensor& A, const at::Tensor& B) {
  if (A.scalar_type() == C.scalar_type()) {
    at::mm_out(C, A, B);
  } else if (A.is_cuda()) {
    at::mm_out(C, A, B, C.scalar_type());
  } else {
    at::mm_out(C, A.to(C.scalar_type()), B.to(C.scalar_type()));
  }
}

// Exact powers of two 2^(15 - ceil(log2(max |x|))) along `dim` of an fp32 tile: x * scale has
// entries <= 2^15 (< fp16 max), so x of order w / N^2 keeps fp16's precision when cast (1 where a
// line is all zero). Applied before the cast to half, divided out after the GEMM: exact.
inline at::Tensor pow2_scale(const at::Tensor& x, int64_t dim) {
  at::Tensor m = at::amax(x.abs(), dim);
  at::Tensor e = at::ceil(at::log2(m)).clamp_(-110, 128);  // the scale stays a normal fp32
  return at::where(m > 0, at::exp2(15 - e), at::ones({}, m.options()));
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, bool exclude_diag) {
  DGK_CHECK_DIM(q, 2, "q");
  DGK_CHECK_DIM(k, 2, "k");
  DGK_CHECK_FLOAT(q, "q");
  DGK_CHECK_FLOAT(k, "k");
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same feature size, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must share a dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(q.device() == k.device(), "q and k must be on one device");
  TORCH_CHECK(!exclude_diag || q.size(0) == k.size(0), "exclude_diag needs N == M, got ", q.sizes(), " and ",
              k.sizes());
}

// S_tile = scale * qb kb^T (beta = 0: the buffer's old content is ignored), then -inf on i == j.
inline bool use_half_gemm(const at::Tensor& q, const Tiling& tiling) {
  return tiling.half_gemm && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
}

inline void tile_logits(at::Tensor& S, const at::Tensor& qb, const at::Tensor& kb, const Scale& scale,
                        bool exclude_diag, int64_t r0, int64_t c0) {
  if (qb.scalar_type() == S.scalar_type() && !scale.dev.defined()) {
    at::addmm_out(S, S, qb, kb.t(), /*beta=*/0, /*alpha=*/scale.host);
  } else {
    gemm_f32(S, qb, kb.t());  // then one rounding of scale * (q.k), as alpha * (q.k) in the GEMM
    scale.mul(S);
  }
  if (exclude_diag) {
    const int64_t lo = std::max(r0, c0), hi = std::min(r0 + S.size(0), c0 + S.size(1));
    // global (i, i) is local (i - r0, i - c0): the tile diagonal at offset r0 - c0
    if (lo < hi) S.diagonal(r0 - c0).fill_(-std::numeric_limits<double>::infinity());
  }
}

// A running max that is -inf (no entry yet) is replaced by 0 as the exp reference (avoids inf - inf).
inline at::Tensor safe_ref(const at::Tensor& m) {
  return at::where(at::isneginf(m), at::zeros({}, m.options()), m);
}

inline std::tuple<at::Tensor, at::Tensor> lse_forward(const at::Tensor& q_in, const at::Tensor& k_in, const Scale& scale,
                                                      bool exclude_diag, bool want_cols, const Tiling& tiling) {
  check_inputs(q_in, k_in, exclude_diag);
  // Pure kernels: the tile ops inside must never record autograd history.
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_type(q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t N = q.size(0), M = k.size(0);
  const auto fopt = q.options().dtype(acc);
  // operand dtype of the tile GEMMs: the input dtype on the half path, else the accumulation type
  const auto op_type = use_half_gemm(q, tiling) ? q.scalar_type() : acc;
  at::Tensor lse_r = at::empty({N}, fopt);
  const int64_t bm = std::max<int64_t>(1, std::min(tiling.bm, N)), bn = std::max<int64_t>(1, std::min(tiling.bn, M));
  const int64_t R = (N + bm - 1) / bm, C = (M + bn - 1) / bn;
  const int64_t T = tiling.parallel ? std::max(1, at::get_num_threads()) : 1;
  // Per-thread running column statistics (max, sum of exp below the max), merged at the end.
  at::Tensor cmax, csum;
  if (want_cols) {
    cmax = at::full({T, M}, -std::numeric_limits<double>::infinity(), fopt);
    csum = at::zeros({T, M}, fopt);
  }
  auto body = [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_in_worker;  // thread-local state: worker threads need their own guards
    at::AutoDispatchBelowADInplaceOrView below_autograd_in_worker;
    const int64_t tid = tiling.parallel ? at::get_thread_num() : 0;
    at::Tensor sbuf = at::empty({bm * bn}, fopt), ebuf = at::empty({bm * bn}, fopt);
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * bm, rn = std::min(bm, N - r0);
      const at::Tensor qb = q.narrow(0, r0, rn).to(op_type);
      at::Tensor m = at::full({rn}, -std::numeric_limits<double>::infinity(), fopt);
      at::Tensor l = at::zeros({rn}, fopt);
      for (int64_t cb = 0; cb < C; ++cb) {
        const int64_t c0 = cb * bn, cn = std::min(bn, M - c0);
        const at::Tensor kb = k.narrow(0, c0, cn).to(op_type);
        at::Tensor S = sbuf.narrow(0, 0, rn * cn).view({rn, cn});
        at::Tensor E = ebuf.narrow(0, 0, rn * cn).view({rn, cn});
        tile_logits(S, qb, kb, scale, exclude_diag, r0, c0);
        // rows: online log-sum-exp
        at::Tensor m_new = at::maximum(m, at::amax(S, 1));
        at::Tensor ref = safe_ref(m_new);
        at::sub_out(E, S, ref.unsqueeze(1)).exp_();
        l.mul_(at::exp(m - ref)).add_(E.sum(1));
        m = m_new;
        if (want_cols) {
          at::Tensor cm = cmax[tid].narrow(0, c0, cn), cs = csum[tid].narrow(0, c0, cn);
          at::Tensor cm_new = at::maximum(cm, at::amax(S, 0));
          at::Tensor cref = safe_ref(cm_new);
          at::sub_out(E, S, cref.unsqueeze(0)).exp_();
          cs.mul_(at::exp(cm - cref)).add_(E.sum(0));
          cm.copy_(cm_new);
        }
      }
      lse_r.narrow(0, r0, rn).copy_(at::log(l).add_(safe_ref(m)));
    }
  };
  if (tiling.parallel) {
    at::parallel_for(0, R, 1, body);
  } else {
    body(0, R);
  }
  at::Tensor lse_c;
  if (want_cols) {
    at::Tensor m = at::amax(cmax, 0);
    at::Tensor ref = safe_ref(m);
    at::Tensor l = (csum * at::exp(cmax - ref.unsqueeze(0))).sum(0);
    lse_c = at::log(l).add_(ref);
  } else {
    lse_c = at::empty({0}, fopt);
  }
  return {lse_r, lse_c};
}

// One tile of the backward with GEMMs in the input dtype (half_gemm): G = w_r P_row (+ w_c P_col)
// in fp32, dscale's share sum G S from the fp32 G and S (a sum with cancellation), then
// dQ += (c_r G) K / c_r and dK_tile = (c_c G)^T Q / c_c with pow2_scale factors per row / column:
// G is of order w / N and smaller, below fp16's normal range for large N or a scaled loss, so it is
// scaled to <= 2^15 before the cast to the input dtype; the factors leave the GEMMs exactly.
inline void half_tile_grads(at::Tensor& S, at::Tensor& G, at::Tensor F, at::Tensor dq_tile, at::Tensor dk_tile,
                            const at::Tensor& qb, const at::Tensor& kb, const at::Tensor& lr, const at::Tensor& wr,
                            bool cols, const at::Tensor& lse_c, const at::Tensor& w_c, int64_t c0, int64_t cn,
                            at::Tensor& dqb, at::Tensor ds_acc) {
  // masked entries (-inf) get G = 0; keep them out of G * S (0 * -inf)
  at::Tensor finite = at::where(at::isneginf(S), at::zeros({}, S.options()), S);
  at::sub_out(G, S, lr).exp_().mul_(wr);
  if (cols) {
    at::sub_out(F, S, lse_c.narrow(0, c0, cn).unsqueeze(0)).exp_().mul_(w_c.narrow(0, c0, cn).unsqueeze(0));
    G.add_(F);
  }
  ds_acc.add_((G * finite).sum().reshape({1}));
  const auto half = qb.scalar_type();
  at::Tensor cr = pow2_scale(G, 1).unsqueeze(1);
  gemm_f32(dq_tile, (G * cr).to(half), kb);
  dqb.add_(dq_tile.div_(cr));
  at::Tensor cc = pow2_scale(G, 0).unsqueeze(1);
  gemm_f32(dk_tile, (G.t() * cc).to(half), qb);
  dk_tile.div_(cc);
}

// Gradients of L = sum_i w_r[i] lse_r[i] + sum_j w_c[j] lse_c[j]:
//   G = w_r P_row + w_c P_col (P_row = exp(S - lse_r), P_col = exp(S - lse_c)),
//   dQ = scale G K, dK = scale G^T Q, dscale = sum_i q_i . (G K)_i.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward(
    const at::Tensor& q_in, const at::Tensor& k_in, const Scale& scale, bool exclude_diag, const at::Tensor& lse_r_in,
    const at::Tensor& lse_c_in, const at::Tensor& w_r_in, const c10::optional<at::Tensor>& w_c_opt,
    const Tiling& tiling) {
  check_inputs(q_in, k_in, exclude_diag);
  // Pure kernels: the tile ops inside must never record autograd history.
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_type(q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const bool cols = w_c_opt.has_value() && w_c_opt->defined();
  TORCH_CHECK(lse_r_in.dim() == 1 && lse_r_in.size(0) == N, "lse_r must have shape [", N, "], got ", lse_r_in.sizes());
  TORCH_CHECK(w_r_in.dim() == 1 && w_r_in.size(0) == N, "w_r must have shape [", N, "], got ", w_r_in.sizes());
  const at::Tensor lse_r = lse_r_in.to(acc).contiguous(), w_r = w_r_in.to(acc).contiguous();
  at::Tensor lse_c, w_c;
  if (cols) {
    TORCH_CHECK(lse_c_in.dim() == 1 && lse_c_in.size(0) == M, "lse_c must have shape [", M, "], got ", lse_c_in.sizes());
    TORCH_CHECK(w_c_opt->dim() == 1 && w_c_opt->size(0) == M, "w_c must have shape [", M, "], got ", w_c_opt->sizes());
    lse_c = lse_c_in.to(acc).contiguous();
    w_c = w_c_opt->to(acc).contiguous();
  }
  const auto fopt = q.options().dtype(acc);
  const bool half = use_half_gemm(q, tiling);
  const auto op_type = half ? q.scalar_type() : acc;
  at::Tensor dq = at::zeros({N, D}, fopt), dk = at::zeros({M, D}, fopt);
  const int64_t bm = std::max<int64_t>(1, std::min(tiling.bm, N)), bn = std::max<int64_t>(1, std::min(tiling.bn, M));
  const int64_t R = (N + bm - 1) / bm, C = (M + bn - 1) / bn;
  at::Tensor ds_part = at::zeros({R}, fopt);
  std::vector<std::mutex> col_locks(tiling.parallel ? C : 0);
  auto body = [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_in_worker;  // thread-local state: worker threads need their own guards
    at::AutoDispatchBelowADInplaceOrView below_autograd_in_worker;
    at::Tensor sbuf = at::empty({bm * bn}, fopt), ebuf = at::empty({bm * bn}, fopt);
    at::Tensor dkbuf = at::empty({bn * D}, fopt);
    at::Tensor fbuf, dqbuf;
    if (half) {
      fbuf = at::empty({bm * bn}, fopt);
      dqbuf = at::empty({bm * D}, fopt);
    }
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * bm, rn = std::min(bm, N - r0);
      const at::Tensor qb = q.narrow(0, r0, rn).to(op_type);
      const at::Tensor lr = lse_r.narrow(0, r0, rn).unsqueeze(1), wr = w_r.narrow(0, r0, rn).unsqueeze(1);
      at::Tensor dqb = dq.narrow(0, r0, rn);
      // Stagger the column order per row block so threads rarely wait on the same dK lock.
      for (int64_t step = 0; step < C; ++step) {
        const int64_t cb = (rb + step) % C;
        const int64_t c0 = cb * bn, cn = std::min(bn, M - c0);
        const at::Tensor kb = k.narrow(0, c0, cn).to(op_type);
        at::Tensor S = sbuf.narrow(0, 0, rn * cn).view({rn, cn});
        at::Tensor G = ebuf.narrow(0, 0, rn * cn).view({rn, cn});
        tile_logits(S, qb, kb, scale, exclude_diag, r0, c0);
        if (half) {
          half_tile_grads(S, G, fbuf.narrow(0, 0, rn * cn).view({rn, cn}), dqbuf.narrow(0, 0, rn * D).view({rn, D}),
                          dkbuf.narrow(0, 0, cn * D).view({cn, D}), qb, kb, lr, wr, cols, lse_c, w_c, c0, cn, dqb,
                          ds_part.narrow(0, rb, 1));
          if (tiling.parallel) {
            std::lock_guard<std::mutex> guard(col_locks[cb]);
            dk.narrow(0, c0, cn).add_(dkbuf.narrow(0, 0, cn * D).view({cn, D}));
          } else {
            dk.narrow(0, c0, cn).add_(dkbuf.narrow(0, 0, cn * D).view({cn, D}));
          }
          continue;
        }
        if (cols) {
          // G = w_r exp(S - lse_r) + w_c exp(S - lse_c); S is overwritten by the second term.
          at::sub_out(G, S, lr).exp_().mul_(wr);
          S.sub_(lse_c.narrow(0, c0, cn).unsqueeze(0)).exp_().mul_(w_c.narrow(0, c0, cn).unsqueeze(0));
          G.add_(S);
        } else {
          at::sub_out(G, S, lr).exp_().mul_(wr);
        }
        dqb.addmm_(G, kb);
        if (tiling.parallel) {
          at::Tensor dkt = dkbuf.narrow(0, 0, cn * D).view({cn, D});
          at::mm_out(dkt, G.t(), qb);
          std::lock_guard<std::mutex> guard(col_locks[cb]);
          dk.narrow(0, c0, cn).add_(dkt);
        } else {
          at::Tensor dkb = dk.narrow(0, c0, cn);
          dkb.addmm_(G.t(), qb);
        }
      }
      if (half) {
        scale.div(ds_part.narrow(0, rb, 1));  // sum G S / scale = sum_ij G_ij q_i.k_j
      } else {
        ds_part.narrow(0, rb, 1).copy_((qb * dqb).sum().reshape({1}));
      }
      scale.mul(dqb);
    }
  };
  if (tiling.parallel) {
    at::parallel_for(0, R, 1, body);
  } else {
    body(0, R);
  }
  scale.mul(dk);
  return {dq, dk, ds_part.sum()};
}

}  // namespace dgkernels::contrastive
