// Shared helpers for the C++/CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

// Argument checks that raise a ValueError-like c10::Error naming the argument.
#define DGK_CHECK_FLOAT(t, name)                                                          \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), name " must be a floating tensor, got ", \
              (t).scalar_type())
#define DGK_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), name " must have ", d, " dimensions, got shape ", (t).sizes())
#define DGK_CHECK_CPU(t, name) TORCH_CHECK((t).device().is_cpu(), name " must be a CPU tensor")
#define DGK_CHECK_CUDA(t, name) TORCH_CHECK((t).device().is_cuda(), name " must be a CUDA tensor")
