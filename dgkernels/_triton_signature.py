"""What the Triton resource tool (tools/triton_resources.py) compiles: CompileSpecs and the
modules listing them, with compile signatures read off a kernel's own parameter list.

A hand-typed signature drifts from the kernel it describes; here only the types that cannot be
read off the parameters are written down: pointers (their element type) and float scalars. Every
other runtime parameter is a size or stride ("i32": Triton passes values >= 2**31 as i64 at
launch; the kernels cast offsets to int64 themselves), every constexpr parameter "constexpr".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# Modules holding Triton kernels; each defines COMPILE_SPECS (a list of CompileSpec) at import.
TRITON_MODULES: list[str] = []


@dataclass
class CompileSpec:
    name: str
    kernel: object  # triton.runtime.JITFunction
    signature: dict[str, str]  # argument -> triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # Specialisation the JIT applies at launch, e.g. {(i,): [["tt.divisibility", 16]]} for argument i
    # (16-byte aligned pointers, sizes and strides divisible by 16): compile what will run.
    attrs: dict | None = None


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def register_module(module_name: str) -> None:
    if module_name not in TRITON_MODULES:
        TRITON_MODULES.append(module_name)


def _params(kernel):
    """(name, is_constexpr) of a @triton.jit kernel (compiled or interpreted) in order."""
    import inspect

    import triton.language as tl

    fn = kernel.fn
    out = []
    for name, param in inspect.signature(fn).parameters.items():
        ann = param.annotation
        out.append((name, ann is tl.constexpr or (isinstance(ann, str) and ann.split(".")[-1] == "constexpr")))
    return out


def signature(kernel, **types: str) -> dict[str, str]:
    """{parameter: type} in the kernel's parameter order; `types` names the non-integer ones."""
    sig = {}
    for name, is_constexpr in _params(kernel):
        sig[name] = "constexpr" if is_constexpr else types.pop(name, "i32")
    if types:
        raise KeyError(f"{kernel.fn.__name__} has no parameters {sorted(types)}")
    return sig


def param_names(kernel) -> set[str]:
    return {name for name, _ in _params(kernel)}
