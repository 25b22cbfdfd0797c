"""Every primitive of every op family as one torch.library custom op, `torch.ops.dgkernels.<name>`.

`define(name, schema, fake)` creates the op from its schema, whose last argument is `str backend`:
the op runs `_dispatch.impl_of(name, backend).primitive(name)` on the remaining arguments. The
backend is chosen before the call (`_dispatch.select_name`, a constant while torch.compile
traces), so eager and compiled code call the same op, dynamo and AOTAutograd see one opaque call
with the shapes of its one fake, and its autograd (`register_autograd`) calls the backward
primitive, itself a custom op. The compiled extension's own kernels (`dgkernels._C`) run inside
these ops, never traced, so they need no fakes of their own.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _dispatch

NAMESPACE = "dgkernels"
# name -> the custom op (torch._library.custom_ops.CustomOpDef); every entry is opchecked by the tests
CUSTOM_OPS: dict[str, object] = {}


def define(name: str, schema: str, fake: Callable, *, backward: Callable | None = None,
           setup_context: Callable | None = None, compute: Callable | None = None):
    """The custom op dgkernels::<name> running the selected backend's primitive `name`, or with
    `compute`, computing that function of other primitives (e.g. the fused forward + backward of a
    reduced loss), registered here for the same checks."""

    def run(*args):
        *args, backend = args
        out = _dispatch.impl_of(name, backend).primitive(name)(*args)
        return tuple(_fresh(out, args)) if isinstance(out, (tuple, list)) else _fresh((out,), args)[0]

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", compute or run, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    CUSTOM_OPS[name] = op
    return op


def _fresh(outputs, inputs) -> list:
    """Outputs as a custom op must return them: contiguous, as the fakes promise (a kernel may
    return a view of a padded buffer), and aliasing neither an input nor another output (a kernel
    may return one buffer twice, e.g. an identity projection's input as its output)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    fresh = []
    for t in outputs:
        if isinstance(t, torch.Tensor):
            t = t.contiguous()
            if t.numel():
                if t.untyped_storage().data_ptr() in taken:
                    t = t.clone()
                taken.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh
