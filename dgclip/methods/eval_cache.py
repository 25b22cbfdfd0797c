"""Reuse image-independent class text features across the batches of one evaluation pass.

A method whose text features do not depend on the image (CoOp: one context for every image)
would otherwise run the text tower on all K class prompts for every evaluation batch. In eval
mode without gradients those features are a pure function of the method's tensors, so they can be
computed once and served to every batch of the pass.

A served value is never stale: it is keyed on every parameter and buffer of the module (identity,
storage, device, dtype and the in-place version counter that optimiser steps, `load_state_dict`
and `.to()` all change), and it is dropped whenever the module's mode is set (`train()` / `eval()`,
so each evaluation pass starts afresh). Outside eval mode, or with gradients enabled, the cache is
bypassed: training always recomputes through the autograd graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["EvalTextCache"]


def _state_key(module: nn.Module) -> tuple:
    # `_version` counts in-place writes to a tensor (optimizer.step, copy_ in load_state_dict);
    # data_ptr/device/dtype catch a replaced storage (`.to()`, a new Parameter object).
    return tuple((id(t), t.data_ptr(), t.device, t.dtype, t._version)
                 for t in list(module.parameters()) + list(module.buffers()))


class EvalTextCache:
    """One cached tensor for a module: `get(module, compute)` returns compute()'s value, computed
    at most once while the module is in eval mode, gradients are off and its tensors are unchanged."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._value: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self._key, self._value = None, None

    def get(self, module: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if module.training or torch.is_grad_enabled():
            self.clear()
            return compute()
        key = _state_key(module)
        if self._key != key:
            self._value = compute()
            self._key = key
        return self._value
