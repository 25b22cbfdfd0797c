// Head ops: CUDA kernels (the GPU fallback where Triton is missing). Orchestration is
// shared with the CPU (csrc/heads/heads.h: cuBLAS GEMMs on row tiles); here the fused per-row
// passes, one thread block per row. GEMMs: fp16/bf16 inputs stay in their dtype on the
// tensor cores with fp32 accumulation and output (CudaRows::kHalfGemm; gradient factors scaled by
// powers of two before their cast, heads.h grad_mm); domain_fanout's GEMMs were already cuBLAS in
// the input dtype (its output and gradients are in the input dtype, as torch's). The per-sample
// cosine CE (c of shape [B, K, E]) is a batched matrix-vector product, bound by reading c once:
// it stays the fused kernel below, reading c in its dtype with fp32 accumulation. (c10/cuda headers rather than ATen/cuda/CUDAContext.h: the
// latter pulls in cusparse.h, which the toolkit here does not ship under CUDA_HOME.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "heads/heads.h"

namespace dgkernels {
namespace heads {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide sum / max (every thread gets the result). sh: 32 values of shared memory.
template <typename T, bool IsMax>
__device__ T block_reduce(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  const T ident = IsMax ? -INFINITY : T(0);
  v = IsMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = threadIdx.x < nw ? sh[threadIdx.x] : ident;
  if (wid == 0) v = IsMax ? warp_max(v) : warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  const T r = sh[0];
  __syncthreads();
  return r;
}

// Label-smoothed cross-entropy of one row per block (see ce_rows_body in cpu.cpp for the formulas).
template <typename T>
__global__ void ce_rows_kernel(T* zp, const int64_t* tp, const T* gp, T* pp, T* dp, int64_t K, T ls) {
  __shared__ T sh[32];
  const int64_t r = blockIdx.x;
  T* z = zp + r * K;
  const int64_t t = tp[r];
  if (t < 0) {
    if (gp)
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) z[k] = 0;
    if (threadIdx.x == 0) {
      pp[r] = 0;
      if (dp) dp[r] = 0;
    }
    return;
  }
  T m = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = max(m, z[k]);
  m = block_reduce<T, true>(m, sh);
  T s = 0, zs = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    s += exp(z[k] - m);
    zs += z[k];
  }
  s = block_reduce<T, false>(s, sh);
  zs = block_reduce<T, false>(zs, sh);
  const T lse = m + log(s);
  const T smooth = ls / T(K);
  const T zt = z[t];
  if (threadIdx.x == 0) pp[r] = lse - (T(1) - ls) * zt - smooth * zs;
  if (!gp) return;
  __syncthreads();  // everyone has read z[t] before it is overwritten
  const T g = gp[r];
  T d = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T v = g * (exp(z[k] - lse) - smooth - (k == t ? T(1) - ls : T(0)));
    d += v * z[k];
    z[k] = v;
  }
  d = block_reduce<T, false>(d, sh);
  if (dp && threadIdx.x == 0) dp[r] = d;
}

// Head agreement of one row's [D, K] logits per block; scratch [R, 2K] for the column sums.
template <typename T>
__global__ void agree_rows_kernel(T* zp, const T* gp, T* pp, T* scratch, int64_t D, int64_t K, int64_t kind) {
  __shared__ T sh[32];
  const int64_t r = blockIdx.x;
  T* lp = zp + r * D * K;
  T* colA = scratch + r * 2 * K;  // sum_d p
  T* colB = colA + K;             // sum_d lp, or log m for kind 0
  for (int64_t d = 0; d < D; ++d) {
    T* row = lp + d * K;
    T m = -INFINITY;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = max(m, row[k]);
    m = block_reduce<T, true>(m, sh);
    T s = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s += exp(row[k] - m);
    const T lse = m + log(block_reduce<T, false>(s, sh));
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) row[k] -= lse;
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    T a = 0, b = 0;
    for (int64_t d = 0; d < D; ++d) {
      a += exp(lp[d * K + k]);
      b += lp[d * K + k];
    }
    colA[k] = a;
    colB[k] = kind == 0 ? log(a / T(D)) : b;
  }
  __syncthreads();
  const T g = gp ? gp[r] : T(0);
  if (kind == 0) {
    T total = 0;
    for (int64_t d = 0; d < D; ++d) {
      T* row = lp + d * K;
      T kl = 0;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) kl += exp(row[k]) * (row[k] - colB[k]);
      kl = block_reduce<T, false>(kl, sh);
      total += kl;
      if (gp)
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          const T p = exp(row[k]);
          row[k] = g / T(D) * p * (row[k] - colB[k] - kl);
        }
    }
    if (threadIdx.x == 0) pp[r] = total / T(D);
  } else {
    T plp = 0, cross = 0;
    for (int64_t i = threadIdx.x; i < D * K; i += blockDim.x) plp += exp(lp[i]) * lp[i];
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) cross += colA[k] * colB[k];
    plp = block_reduce<T, false>(plp, sh);
    cross = block_reduce<T, false>(cross, sh);
    const T norm = T(2) / (T(D) * T(D - 1));
    if (threadIdx.x == 0) pp[r] = (T(D) * plp - cross) * norm;
    if (!gp) return;
    const T c = g * norm;
    for (int64_t d = 0; d < D; ++d) {
      T* row = lp + d * K;
      T pa = 0;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) pa += exp(row[k]) * (T(D) * row[k] - colB[k]);
      pa = block_reduce<T, false>(pa, sh);
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const T p = exp(row[k]);
        row[k] = c * (p * (T(D) * row[k] - colB[k] - pa) + T(D) * p - colA[k]);
      }
    }
  }
}

template <typename T>
__global__ void mapper_rows_kernel(const T* xp, T* yp, T* np, int64_t E, bool residual, bool normalize) {
  __shared__ T sh[32];
  const int64_t r = blockIdx.x;
  T* y = yp + r * E;
  const T* x = xp + r * E;
  T ss = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const T v = residual ? x[e] - y[e] : y[e];
    y[e] = v;
    ss += v * v;
  }
  if (!normalize) return;
  const T n = sqrt(block_reduce<T, false>(ss, sh));
  if (threadIdx.x == 0) np[r] = n;
  const T inv = T(1) / max(n, T(kNormEps));
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) y[e] *= inv;
}

template <typename T>
__global__ void normalize_grad_kernel(const T* gp, const T* op, const T* np, T* rp, int64_t E) {
  __shared__ T sh[32];
  const int64_t r = blockIdx.x;
  T d = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) d += op[r * E + e] * gp[r * E + e];
  d = block_reduce<T, false>(d, sh);
  if (!(np[r] > T(kNormEps))) d = 0;
  const T inv = T(1) / max(np[r], T(kNormEps));
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) rp[r * E + e] = (gp[r * E + e] - op[r * E + e] * d) * inv;
}

// Per-sample cosine cross-entropy, one block per sample. Pass 1: a warp per class computes the
// cosine (logits and norms go to a [B, K] workspace: O(B K), against the O(B K E) input);
// pass 2: log-sum-exp; pass 3 (grad): a thread per feature streams the K classes (coalesced),
// writing dL/dc[b] and accumulating dL/dxn[b].
template <typename In, typename T>
__global__ void cos_ps_kernel(const In* cp, In* gcp, const T* xp, const T* gp, const int64_t* tp, T* pp, T* dp, T* dxp,
                              T* zw, T* denw, const T* scale, int64_t K, int64_t E, T ls, bool normalize) {
  __shared__ T sh[32];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const T sc = *scale;
  const T* x = xp + b * E;
  const In* cb = cp + b * K * E;
  T* z = zw + b * K;
  T* den = denw + b * K;
  for (int64_t k = wid; k < K; k += nw) {
    T dv = 0, ss = 0;
    for (int64_t e = lane; e < E; e += 32) {
      const T v = static_cast<T>(cb[k * E + e]);
      dv += x[e] * v;
      ss += v * v;
    }
    dv = warp_sum(dv);
    ss = warp_sum(ss);
    if (lane == 0) {
      const T dn = normalize ? max(sqrt(ss), T(kNormEps)) : T(1);
      den[k] = normalize && !(sqrt(ss) > T(kNormEps)) ? -dn : dn;  // sign marks an inactive clamp
      z[k] = sc * dv / dn;
    }
  }
  __syncthreads();
  const int64_t t = tp[b];
  T m = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = max(m, z[k]);
  m = block_reduce<T, true>(m, sh);
  T s = 0, zs = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    s += exp(z[k] - m);
    zs += z[k];
  }
  const bool valid = t >= 0;
  // z[t] into a register before the barriers of the reductions below: after them, other threads
  // overwrite z with the gradient weights while thread 0 would still be reading it.
  const T zt = valid ? z[t] : T(0);
  s = block_reduce<T, false>(s, sh);
  zs = block_reduce<T, false>(zs, sh);
  const T lse = m + log(s);
  const T smooth = ls / T(K);
  if (threadIdx.x == 0) pp[b] = valid ? lse - (T(1) - ls) * zt - smooth * zs : T(0);
  if (!gp) return;
  const T g = valid ? gp[b] : T(0);
  // z[k] <- dz_k / den_k (the weight of c_k) and den[k] <- the normalisation's projection factor
  // [active] cos_k / den_k, so that dc_k = s w_k (xn - c_k proj_k) and dxn = s sum_k w_k c_k.
  T d = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T zk = z[k];
    const T dz = g * (exp(zk - lse) - smooth - (k == t ? T(1) - ls : T(0)));
    d += dz * zk;
    const T dn = fabs(den[k]);
    const bool active = normalize && den[k] > T(0);
    z[k] = dz / dn;
    den[k] = active ? zk / sc / dn : T(0);
  }
  d = block_reduce<T, false>(d, sh);
  if (threadIdx.x == 0) dp[b] = d;
  __syncthreads();
  In* gcb = gcp + b * K * E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    T acc = 0;
    const T xe = x[e];
    for (int64_t k = 0; k < K; ++k) {
      const T cv = static_cast<T>(cb[k * E + e]);
      const T w = z[k];
      acc += w * cv;
      gcb[k * E + e] = static_cast<In>(sc * w * (xe - cv * den[k]));
    }
    dxp[b * E + e] = sc * acc;
  }
}

struct CudaRows {
  // fp16/bf16 GEMMs on tensor cores in the input dtype, fp32 accumulation (heads.h grad_mm)
  static constexpr bool kHalfGemm = true;
  static void ce(Tensor& z, const Tensor& tgt, const Tensor& g, double ls, Tensor& per, Tensor dot) {
    const int64_t R = z.size(0), K = z.size(1);
    if (R == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_ce_rows_cuda", [&] {
      ce_rows_kernel<scalar_t><<<R, kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), tgt.data_ptr<int64_t>(), g.defined() ? g.data_ptr<scalar_t>() : nullptr,
          per.data_ptr<scalar_t>(), dot.defined() ? dot.data_ptr<scalar_t>() : nullptr, K, scalar_t(ls));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void agree(Tensor& z, int64_t kind, const Tensor& g, Tensor& per) {
    const int64_t R = z.size(0), D = z.size(1), K = z.size(2);
    if (R == 0) return;
    auto scratch = at::empty({R, 2 * K}, z.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "heads_agree_rows_cuda", [&] {
      agree_rows_kernel<scalar_t><<<R, kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), g.defined() ? g.data_ptr<scalar_t>() : nullptr, per.data_ptr<scalar_t>(),
          scratch.data_ptr<scalar_t>(), D, K, kind);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void mapper_rows(const Tensor& x, Tensor& y, bool residual, bool normalize, Tensor& norm) {
    const int64_t R = y.size(0), E = y.size(1);
    if (R == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "heads_mapper_rows_cuda", [&] {
      mapper_rows_kernel<scalar_t><<<R, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                               normalize ? norm.data_ptr<scalar_t>() : nullptr, E,
                                                               residual, normalize);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static Tensor normalize_grad(const Tensor& g, const Tensor& out, const Tensor& norm) {
    auto res = at::empty_like(g);
    const int64_t R = g.size(0), E = g.size(1);
    if (R == 0) return res;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "heads_normalize_grad_cuda", [&] {
      normalize_grad_kernel<scalar_t><<<R, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(), E);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    auto zw = at::empty({B, K}, opts);
    auto denw = at::empty({B, K}, opts);
    auto sa = s.to(opts.dtype()).reshape({1}).contiguous();
    Tensor dxn = grad ? at::empty({B, E}, opts) : Tensor();
    Tensor gc = grad ? at::empty_like(c) : Tensor();
    if (B > 0) {
      auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "heads_cos_ps_cuda", [&] {
        using In = scalar_t;
        using T = at::opmath_type<In>;
        cos_ps_kernel<In, T><<<B, kThreads, 0, stream>>>(
            c.data_ptr<In>(), grad ? gc.data_ptr<In>() : nullptr, xn.data_ptr<T>(), grad ? g.data_ptr<T>() : nullptr,
            tgt.data_ptr<int64_t>(), per.data_ptr<T>(), dot.data_ptr<T>(), grad ? dxn.data_ptr<T>() : nullptr,
            zw.data_ptr<T>(), denw.data_ptr<T>(), sa.data_ptr<T>(), K, E, T(ls), normalize);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!grad) return {Tensor(), Tensor(), Tensor(), per};
    auto gs = dot.sum() / s;
    auto gx = normalize ? normalize_backward(dxn, xn, xden) : dxn;
    return {gx.to(x.scalar_type()), gc, gs, per};
  }
};

// ---- op entry points (CUDA) -----------------------------------------------------------------------
Tensor fanout_cuda(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  c10::cuda::CUDAGuard guard(x.device());
  return fanout_forward(x, w, b);
}
std::tuple<Tensor, Tensor, Tensor> fanout_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& w, bool hb) {
  c10::cuda::CUDAGuard guard(x.device());
  return fanout_backward(g, x, w, hb);
}
Tensor dce_forward_cuda(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                        const c10::optional<Tensor>& domain, const Tensor& target, bool all_heads, double ls) {
  c10::cuda::CUDAGuard guard(x.device());
  return std::get<3>(domain_ce<CudaRows>(Tensor(), x, w, b, domain, target, all_heads, ls));
}
Grads dce_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                        const c10::optional<Tensor>& domain, const Tensor& target, bool all_heads, double ls) {
  c10::cuda::CUDAGuard guard(x.device());
  return domain_ce<CudaRows>(g, x, w, b, domain, target, all_heads, ls);
}
Tensor agree_forward_cuda(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, int64_t kind) {
  c10::cuda::CUDAGuard guard(x.device());
  return std::get<3>(head_agreement<CudaRows>(Tensor(), x, w, b, kind));
}
Grads agree_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                          int64_t kind) {
  c10::cuda::CUDAGuard guard(x.device());
  return head_agreement<CudaRows>(g, x, w, b, kind);
}
std::tuple<Tensor, Tensor> mapper_forward_cuda(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                                               const c10::optional<Tensor>& domain, bool residual, bool normalize) {
  c10::cuda::CUDAGuard guard(x.device());
  return mapper_forward<CudaRows>(x, w, b, domain, residual, normalize);
}
std::tuple<Tensor, Tensor, Tensor> mapper_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& w,
                                                        const c10::optional<Tensor>& domain, const Tensor& out,
                                                        const Tensor& norm, bool residual, bool normalize) {
  c10::cuda::CUDAGuard guard(x.device());
  return mapper_backward<CudaRows>(g, x, w, domain, out, norm, residual, normalize);
}
Tensor cosce_forward_cuda(const Tensor& x, const Tensor& c, const Tensor& scale, const Tensor& target, bool normalize,
                          double ls, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(x.device());
  return std::get<3>(cosine_ce<CudaRows>(Tensor(), x, c, scale, target, normalize, ls, ignore_index));
}
Grads cosce_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& c, const Tensor& scale,
                          const Tensor& target, bool normalize, double ls, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(x.device());
  return cosine_ce<CudaRows>(g, x, c, scale, target, normalize, ls, ignore_index);
}

}  // namespace
}  // namespace heads
}  // namespace dgkernels

TORCH_LIBRARY_IMPL(dgkernels, CUDA, m) {
  using namespace dgkernels::heads;
  m.impl("heads_fanout", &fanout_cuda);
  m.impl("heads_fanout_backward", &fanout_backward_cuda);
  m.impl("heads_dce_forward", &dce_forward_cuda);
  m.impl("heads_dce_backward", &dce_backward_cuda);
  m.impl("heads_agree_forward", &agree_forward_cuda);
  m.impl("heads_agree_backward", &agree_backward_cuda);
  m.impl("heads_mapper_forward", &mapper_forward_cuda);
  m.impl("heads_mapper_backward", &mapper_backward_cuda);
  m.impl("heads_cosce_forward", &cosce_forward_cuda);
  m.impl("heads_cosce_backward", &cosce_backward_cuda);
}
