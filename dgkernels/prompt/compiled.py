"""The compiled backend (cpp on CPU tensors, cuda on CUDA tensors): torch.ops.dgkernels.prompt_*.

Fake (meta) kernels are registered when the extension is loaded, so torch.compile can trace.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import _extension
from .autograd import backend_ops


def _op(name):
    return getattr(torch.ops.dgkernels, name)


PRIMS = SimpleNamespace(
    assemble=lambda *a: _op("prompt_assemble")(*a),
    index_add_rows=lambda *a: _op("prompt_index_add_rows")(*a),
    attention=lambda *a: _op("prompt_prefix_attention")(*a),
    attention_backward=lambda *a: _op("prompt_prefix_attention_backward")(*a),
    head=lambda *a: _op("prompt_eot_head")(*a),
    head_backward=lambda *a: _op("prompt_eot_head_backward")(*a),
)

OPS = backend_ops(PRIMS)
assemble, prefix_attention, eot_head = OPS.assemble, OPS.prefix_attention, OPS.eot_head

_CUDA_F64_TOKENS = 128  # csrc/prompt/cuda.cu check_attention: the float64 kernel's score buffer


def refusal(op: str, call) -> str:
    """csrc/prompt runs every floating dtype and head size; the float64 CUDA attention takes
    prefixes and suffixes of at most 128 tokens (call.dtypes[0] is the activation dtype)."""
    if op == "prompt_prefix_attention" and call.device == "cuda" and call.dtypes[:1] == (torch.float64,):
        longest = max(call.size("prefix_len", 0), call.size("suffix_len", 0))
        if longest > _CUDA_F64_TOKENS:
            return (f"the float64 CUDA prompt attention takes prefixes and suffixes of at most {_CUDA_F64_TOKENS} "
                    f"tokens, got {longest}")
    return ""


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def register_fakes() -> None:
    # A _C built before this family existed (stale in-place build) lacks its ops: nothing to register.
    if not _extension.load()[0] or not hasattr(torch.ops.dgkernels, "prompt_assemble"):
        return
    reg = torch.library.register_fake

    @reg("dgkernels::prompt_assemble")
    def _(src, src_index, pos, pos_index, dtype):
        return src.new_empty((src_index.shape[0], src.shape[1]), dtype=dtype)

    @reg("dgkernels::prompt_index_add_rows")
    def _(grad, index, rows):
        return grad.new_empty((rows, grad.shape[1]), dtype=_acc(grad))

    @reg("dgkernels::prompt_prefix_attention")
    def _(q, k, v, kp, vp, seq_start, seq_len, seq_group, max_len, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)

    @reg("dgkernels::prompt_prefix_attention_backward")
    def _(grad_out, q, k, v, kp, vp, out, lse, seq_start, seq_len, seq_group, max_len, scale):
        return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), kp.new_empty(kp.shape),
                kp.new_empty(kp.shape))

    @reg("dgkernels::prompt_eot_head")
    def _(x, rows, ln_weight, ln_bias, eps, proj, proj_bias, normalize):
        n, w = rows.shape[0], x.shape[1]
        e = w if proj is None else proj.shape[1]
        acc = _acc(x)
        return (x.new_empty((n, e)), x.new_empty((n, w), dtype=acc), x.new_empty((n, e), dtype=acc),
                x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc))

    @reg("dgkernels::prompt_eot_head_backward")
    def _(grad_out, x, rows, ln_weight, eps, proj, y, z, mean, rstd, normalize):
        w = x.shape[1]
        acc = _acc(x)
        dproj = x.new_empty((0,), dtype=acc) if proj is None else x.new_empty(proj.shape, dtype=acc)
        return (x.new_empty(x.shape), x.new_empty((w,), dtype=acc), x.new_empty((w,), dtype=acc), dproj,
                x.new_empty((z.shape[1],), dtype=acc))
