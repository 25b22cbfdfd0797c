// CUDA kernels of the contrastive log-sum-exp primitive (the compiled fallback when Triton is
// unavailable, and the float64 path of the Triton backend).
//
// Same tiled algorithm as the CPU kernels (tiled.h): each tile is one cuBLAS GEMM on views of the
// inputs followed by fused-by-ATen exp/reduce kernels, issued in order on the current stream, so
// only a few tile buffers (bm x bn, fp32) live at once beyond the O(N + M) statistics. fp16/bf16
// inputs run their GEMMs on the tensor cores in the input dtype with fp32 output (aten::mm.dtype);
// the backward's G is scaled by exact powers of two before its cast (tiled.h half_tile_grads).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "contrastive/tiled.h"

namespace dgkernels::contrastive {
namespace {

// 2048 x 4096 fp32 tiles (32 MiB each): large enough that each GEMM fills an H100; half inputs
// use half GEMMs (the last field).
constexpr Tiling kCudaTiling{2048, 4096, false, true};

// The scale stays on the device: a 0-d tensor of the accumulation dtype, a tensor operand of the
// tile ops (never copied to the host: that copy would synchronise the stream on every call).
Scale device_scale(const at::Tensor& scale, const at::Tensor& q) {
  check_scale(scale, q);
  return Scale{scale.reshape({}).to(acc_type(q))};
}

std::tuple<at::Tensor, at::Tensor> lse_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                                bool exclude_diag, bool want_cols) {
  DGK_CHECK_CUDA(q, "q");
  DGK_CHECK_CUDA(k, "k");
  const c10::cuda::CUDAGuard guard(q.device());
  return lse_forward(q, k, device_scale(scale, q), exclude_diag, want_cols, kCudaTiling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                                            bool exclude_diag, const at::Tensor& lse_r,
                                                            const at::Tensor& lse_c, const at::Tensor& w_r,
                                                            const c10::optional<at::Tensor>& w_c) {
  DGK_CHECK_CUDA(q, "q");
  DGK_CHECK_CUDA(k, "k");
  const c10::cuda::CUDAGuard guard(q.device());
  return lse_backward(q, k, device_scale(scale, q), exclude_diag, lse_r, lse_c, w_r, w_c, kCudaTiling);
}

}  // namespace
}  // namespace dgkernels::contrastive

TORCH_LIBRARY_IMPL(dgkernels, CUDA, m) {
  m.impl("contrastive_lse_fwd", &dgkernels::contrastive::lse_fwd_cuda);
  m.impl("contrastive_lse_bwd", &dgkernels::contrastive::lse_bwd_cuda);
}
