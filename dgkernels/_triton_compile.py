"""Ahead-of-time compile check of every Triton kernel for real GPU targets (no GPU needed).

Each Triton module registers CompileSpecs: a kernel, its signature, and one entry per launch
configuration it can use (each autotune config, each constexpr variant). `compile_all` compiles
each to PTX and cubin with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`.
The interpreter (TRITON_INTERPRET=1) accepts code that real compilation rejects, so both checks
run. Run as `python -m dgkernels._triton_compile` (TRITON_INTERPRET must be unset) for a JSON list.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
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


def register_module(module_name: str) -> None:
    if module_name not in TRITON_MODULES:
        TRITON_MODULES.append(module_name)


def compile_spec(spec: CompileSpec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ok = "cubin" in compiled.asm and "ptx" in compiled.asm
        return {"name": spec.name, "cc": cc, "ok": ok, "error": "" if ok else "no cubin produced"}
    except Exception as exc:  # noqa: BLE001 - reported per spec
        return {"name": spec.name, "cc": cc, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def all_specs() -> list[CompileSpec]:
    import dgkernels  # noqa: F401 - importing the package registers the Triton modules

    # Read the package's list: under `python -m` this file runs as __main__, a second copy whose
    # TRITON_MODULES nobody fills.
    registry = importlib.import_module("dgkernels._triton_compile").TRITON_MODULES
    specs = []
    for mod in registry:
        specs.extend(importlib.import_module(mod).COMPILE_SPECS)
    return specs


def compile_all(capabilities=(80, 90)) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    return [compile_spec(spec, cc) for spec in all_specs() for cc in capabilities]


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
