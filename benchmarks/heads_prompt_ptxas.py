"""Registers, spills, shared memory and wgmma use of every heads/prompt Triton launch
configuration (their COMPILE_SPECS), compiled for sm_90a; no GPU needed (DESIGN section 4).

    python benchmarks/heads_prompt_ptxas.py [--out benchmarks/results/heads_prompt_ptxas_sm90.md] [REGEX]

TRITON_INTERPRET must be unset. Writes a markdown table as it goes (slow: seconds per config).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

MODULES = ("dgkernels.heads.triton", "dgkernels.prompt.triton")


def ptxas_path():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def measure(spec, ptxas):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spill = max((int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)),
                default=0)
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
    return regs, spill, k.metadata.shared, mma


def main():
    import importlib

    ap = argparse.ArgumentParser()
    ap.add_argument("pattern", nargs="?", default="")
    ap.add_argument("--out", default="benchmarks/results/heads_prompt_ptxas_sm90.md")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET")
    ptxas = ptxas_path()
    with open(args.out, "w") as out:
        out.write("# heads / prompt Triton configurations on sm_90a (ptxas -v)\n\n"
                  "spill = spill store + load bytes; smem from the compiled metadata (limit 227 KiB); "
                  "mma = the tensor-core instruction in the PTX.\n\n"
                  "| config | warps | stages | registers | spill B | smem B | mma |\n|---|---|---|---|---|---|---|\n")
        for mod in MODULES:
            for spec in importlib.import_module(mod).COMPILE_SPECS:
                if args.pattern and not re.search(args.pattern, spec.name):
                    continue
                try:
                    regs, spill, smem, mma = measure(spec, ptxas)
                    row = f"| {spec.name} | {spec.num_warps} | {spec.num_stages} | {regs} | {spill} | {smem} | {mma} |"
                except Exception as exc:  # noqa: BLE001 - reported per config
                    row = f"| {spec.name} | {spec.num_warps} | {spec.num_stages} | compile error: " \
                          f"{type(exc).__name__} | | | |"
                out.write(row + "\n")
                out.flush()
                print(row, flush=True)


if __name__ == "__main__":
    main()
