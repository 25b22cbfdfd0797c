// CPU kernels of the contrastive log-sum-exp primitive (schemas for CPU and CUDA live here).
// `scale` is a one-element tensor on the inputs' device (CUDA kernels read it from device memory).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "contrastive/tiled.h"

namespace dgkernels::contrastive {
namespace {

// Row blocks of 256 keep each thread's two fp32 tiles (256 x 1024) at 1 MiB apiece, in L2/L3,
// while the GEMM per tile (256 x 1024 x D) stays large enough for MKL to run near peak.
constexpr Tiling kCpuTiling{256, 1024, true, false};  // fp32 GEMMs: MKL has no fast half GEMM, and cpp stays the fp32-internal oracle

// On the CPU reading the scale is a plain memory read (no device to wait for): fold it into alpha.
Scale host_scale(const at::Tensor& scale, const at::Tensor& q) {
  check_scale(scale, q);
  return Scale{at::Tensor(), scale.item<double>()};
}

std::tuple<at::Tensor, at::Tensor> lse_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                               bool exclude_diag, bool want_cols) {
  DGK_CHECK_CPU(q, "q");
  DGK_CHECK_CPU(k, "k");
  return lse_forward(q, k, host_scale(scale, q), exclude_diag, want_cols, kCpuTiling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                                           bool exclude_diag, const at::Tensor& lse_r,
                                                           const at::Tensor& lse_c, const at::Tensor& w_r,
                                                           const c10::optional<at::Tensor>& w_c) {
  DGK_CHECK_CPU(q, "q");
  DGK_CHECK_CPU(k, "k");
  return lse_backward(q, k, host_scale(scale, q), exclude_diag, lse_r, lse_c, w_r, w_c, kCpuTiling);
}

}  // namespace
}  // namespace dgkernels::contrastive

TORCH_LIBRARY_FRAGMENT(dgkernels, m) {
  m.def("contrastive_lse_fwd(Tensor q, Tensor k, Tensor scale, bool exclude_diag, bool want_cols) -> (Tensor, Tensor)");
  m.def("contrastive_lse_bwd(Tensor q, Tensor k, Tensor scale, bool exclude_diag, Tensor lse_r, Tensor lse_c, "
        "Tensor w_r, Tensor? w_c) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dgkernels, CPU, m) {
  m.impl("contrastive_lse_fwd", &dgkernels::contrastive::lse_fwd_cpu);
  m.impl("contrastive_lse_bwd", &dgkernels::contrastive::lse_bwd_cpu);
}
