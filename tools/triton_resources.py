"""Ahead-of-time compile check and resource report of every Triton kernel (no GPU needed).

Each Triton module lists CompileSpecs (dgkernels._triton_signature): a kernel, its signature, and
one entry per launch configuration it can use (each autotune config, each constexpr variant). `compile_all` compiles
each to PTX and cubin with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`.
The interpreter (TRITON_INTERPRET=1) accepts code that real compilation rejects, so both checks
run. With `resources=True` each sm_90 result also carries what a launch would meet on Hopper:
registers and spill bytes (`ptxas -v` on the PTX, with the register-allocation flags Triton itself
passes), shared memory (the compiled metadata) and the kind of matrix instruction the dots became
(`wgmma.mma_async` = Hopper tensor cores, `mma.sync` = the Ampere path, none = FMA loops).

Command line (TRITON_INTERPRET must be unset):
  python tools/triton_resources.py                      JSON compile results, sm_80 and sm_90
  python tools/triton_resources.py --report [--markdown FILE] [--json FILE] [--workers N] [--only REGEX]
(--only: the specs whose name matches REGEX, e.g. while tuning one kernel's configurations.)
The kernel modules list their CompileSpecs and register themselves in dgkernels._triton_signature
(TRITON_MODULES) when the package is imported; this tool is not part of the installed package.

Autotuned kernels: a module that launches a kernel through `triton.autotune` also defines
`autotune_launches()`, yielding `(autotuner, signature, constexprs)` for every way its launchers
may call it (constexprs = those the launcher fixes, e.g. BLOCK_D and PREC). `expected_autotune_specs`
expands these over the autotuner's configs; tests/test_triton_compile.py checks they equal the
module's COMPILE_SPECS of those kernels, so the report covers every config the autotuner may pick.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from dgkernels._triton_signature import TRITON_MODULES, CompileSpec

# Shared memory a block may opt into (bytes): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CAPABILITIES = (80, 90)
RESOURCE_CC = 90


# ---- reading the compiled artefacts ---------------------------------------------------------

_PTXAS_RE = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}
# `tt.dot %a, %b, %c ... : tensor<64x32xbf16...> * tensor<...>` in the TTIR: the operand element type.
_DOT_RE = re.compile(r"tt\.dot(?:_scaled)?\s[^\n]*?:\s*tensor<[0-9x]+x(\w+?)[,>]")
HALF_TYPES = ("bf16", "f16")


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and stack frame of the one kernel in a `ptxas -v` log."""
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise ValueError(f"ptxas -v log has no '{rx.pattern}':\n{log[-2000:]}")
        out[key] = int(m.group(1))
    return out


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def dot_operand_types(ttir: str) -> list[str]:
    return sorted(set(_DOT_RE.findall(ttir)))


def _ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(RESOURCE_CC).path


def _ptxas_cache_dir() -> str:
    # Beside Triton's own cache (clearing that clears this); keyed by PTX, flags and ptxas version.
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "dgkernels_ptxas")


def run_ptxas(ptx: str, cc: int, fp_fusion: bool = True) -> dict:
    """`ptxas -v` with the flags Triton's make_cubin passes that change register allocation."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    flags = ["-v", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={arch}"]
    key = hashlib.sha256("\0".join([_ptxas_version(), *flags, ptx]).encode()).hexdigest()
    cached = os.path.join(_ptxas_cache_dir(), key + ".json")
    try:
        with open(cached) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(), *flags, src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = parse_ptxas(proc.stderr + proc.stdout)
    try:  # best effort: a read-only cache only costs time
        os.makedirs(_ptxas_cache_dir(), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=_ptxas_cache_dir(), delete=False, suffix=".tmp") as f:
            json.dump(out, f)
        os.replace(f.name, cached)
    except OSError:
        pass
    return out


# ---- compiling ------------------------------------------------------------------------------

def compile_spec(spec: CompileSpec, cc: int, resources: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    base = {"name": spec.name, "cc": cc, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    src = ASTSource(spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # noqa: BLE001 - reported per spec
        return {**base, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ok = "cubin" in compiled.asm and "ptx" in compiled.asm
    out = {**base, "ok": ok, "error": "" if ok else "no cubin produced", "shared": int(compiled.metadata.shared),
           "shared_limit": SHARED_LIMIT.get(cc)}
    if ok and resources:
        ptx = compiled.asm["ptx"]
        dots = dot_operand_types(compiled.asm.get("ttir", ""))
        out.update(mma=mma_kind(ptx), wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                   dot_types=dots, half_gemm=any(t in HALF_TYPES for t in dots))
        try:
            out.update(run_ptxas(ptx, cc, bool(compiled.metadata.enable_fp_fusion)))
        except (RuntimeError, ValueError) as exc:
            out.update(ok=False, error=f"ptxas -v: {exc}"[:2000])
    return out


def problems(result: dict) -> list[str]:
    """What would stop this configuration from launching: a failed compile, too much shared memory."""
    if not result["ok"]:
        return [f"compile failed: {result['error']}"]
    limit = result.get("shared_limit")
    if limit is not None and result["shared"] > limit:
        return [f"needs {result['shared']} B of shared memory, sm_{result['cc']} allows {limit} B per block"]
    return []


def all_specs() -> list[CompileSpec]:
    import dgkernels  # noqa: F401 - importing the package registers the Triton modules

    specs = []
    for mod in TRITON_MODULES:
        specs.extend(importlib.import_module(mod).COMPILE_SPECS)
    return specs


_WORKER_SPECS: list[CompileSpec] | None = None


def _compile_job(job: tuple[int, int, bool]) -> dict:
    """One (spec index, cc) compile in a pool worker; each worker builds the spec list once."""
    global _WORKER_SPECS
    if _WORKER_SPECS is None:
        _WORKER_SPECS = all_specs()
    idx, cc, resources = job
    return compile_spec(_WORKER_SPECS[idx], cc, resources)


def default_workers() -> int:
    env = os.environ.get("DGKERNELS_COMPILE_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def compile_all(capabilities=CAPABILITIES, resources: bool = False, workers: int | None = None,
                only: str | None = None) -> list[dict]:
    """Compile every spec (or those whose name matches the regex `only`) for every capability;
    `resources` adds the sm_90 report fields."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    specs = all_specs()
    picked = [i for i, s in enumerate(specs) if only is None or re.search(only, s.name)]
    jobs = [(i, cc, resources and cc == RESOURCE_CC) for i in picked for cc in capabilities]
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) <= 1:
        return [compile_spec(specs[i], cc, res) for i, cc, res in jobs]
    import concurrent.futures
    import multiprocessing

    # spawn: a forked child would inherit torch's and Triton's threads and locks mid-state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=4))


# ---- autotune coverage ----------------------------------------------------------------------

def spec_key(kernel_name: str, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    return (kernel_name, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            int(num_warps), int(num_stages))


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', repr(fn))}"


def expected_autotune_specs(module) -> tuple[set, set[str]]:
    """(spec keys the autotuners of `module` may launch, names of the kernels they wrap)."""
    keys, kernels = set(), set()
    for tuner, signature, constexprs in module.autotune_launches():
        name = _kernel_name(tuner.fn)
        kernels.add(name)
        for cfg in tuner.configs:
            keys.add(spec_key(name, signature, {**constexprs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages))
    return keys, kernels


def listed_specs(module, kernels: set[str]) -> set:
    return {spec_key(_kernel_name(s.kernel), s.signature, s.constexprs, s.num_warps, s.num_stages)
            for s in module.COMPILE_SPECS if _kernel_name(s.kernel) in kernels}


# ---- the report -----------------------------------------------------------------------------

def coverage() -> str:
    """Whether each module's COMPILE_SPECS cover every config its autotuners may pick."""
    import inspect

    notes = []
    for mod_name in TRITON_MODULES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, "autotune_launches"):
            expected, kernels = expected_autotune_specs(mod)
            missing = len(expected - listed_specs(mod, kernels))
            notes.append(f"`{mod_name}` {'complete' if not missing else f'misses {missing} autotune configs'}")
        elif "triton.autotune" in inspect.getsource(mod):
            notes.append(f"`{mod_name}` declares no autotune_launches(), unchecked")
        else:
            notes.append(f"`{mod_name}` fixed configs")
    return "; ".join(notes) or "no modules"


def _fmt_kib(b) -> str:
    return f"{b / 1024:.1f}"


def summary(results: list[dict]) -> dict:
    res = [r for r in results if r["cc"] == RESOURCE_CC]
    return {
        "configs": len(res),
        "failed": sorted(r["name"] for r in res if problems(r)),
        "failed_other": sorted(f"{r['name']} (sm_{r['cc']})" for r in results
                               if r["cc"] != RESOURCE_CC and problems(r)),
        "spilling": sorted(r["name"] for r in res if r["ok"] and (r["spill_stores"] or r["spill_loads"])),
        "half_gemm_no_wgmma": sorted(r["name"] for r in res if r["ok"] and r["half_gemm"] and r["mma"] != "wgmma"),
    }


def markdown(results: list[dict], command: str) -> str:
    import triton

    s = summary(results)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Triton launch configurations compiled for sm_90 (H100/H200): registers, spills, shared memory, MMA",
        "",
        f"Generated {now} without a GPU by `{command}` (triton {triton.__version__}, "
        f"ptxas {_ptxas_version()} from the triton wheel, `-v --regAllocOptLevel=2 --gpu-name=sm_90a`).",
        "One row per CompileSpec, the launch configurations each Triton module lists (coverage of its",
        f"autotuners: {coverage()}).",
        "Registers and spill bytes from `ptxas -v` on the PTX; shared memory from the compiled metadata",
        f"(limit {_fmt_kib(SHARED_LIMIT[90])} KiB per block); MMA = the instruction the dots became",
        "(`wgmma` = Hopper's asynchronous tensor-core path, `mma.sync` = Ampere's, `none` = no tensor cores);",
        "dot = element type of the `tt.dot` operands (fp32 dots with PREC=ieee run as FMA loops).",
        "",
        f"**sm_90: {s['configs']} configurations; {len(s['failed'])} fail to compile or exceed shared memory; "
        f"{len(s['spilling'])} spill; {len(s['half_gemm_no_wgmma'])} half-precision GEMM kernels without wgmma. "
        f"Other targets: {len(s['failed_other'])} with problems (listed at the end).**",
        "",
        "| spec | warps | stages | regs | spill st/ld B | stack B | smem KiB | dot | MMA (count) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        if r["cc"] != RESOURCE_CC:
            continue
        if not r["ok"]:
            lines.append(f"| `{r['name']}` | {r['num_warps']} | {r['num_stages']} | | | | | | | "
                         f"FAILS: {r['error'][:120].replace('|', '/').splitlines()[0] if r['error'] else ''} |")
            continue
        flags = problems(r)
        if r["spill_stores"] or r["spill_loads"]:
            flags.append("spills")
        if r["half_gemm"] and r["mma"] != "wgmma":
            flags.append("no wgmma")
        mma = {"wgmma": f"wgmma ({r['wgmma']})", "mma.sync": f"mma.sync ({r['mma_sync']})"}.get(r["mma"], "none")
        lines.append(f"| `{r['name']}` | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {_fmt_kib(r['shared'])} | "
                     f"{','.join(r['dot_types']) or '-'} | {mma} | {'; '.join(flags) or 'ok'} |")
    other = [r for r in results if r["cc"] != RESOURCE_CC and problems(r)]
    if other:
        lines += ["", "Other targets with problems:", ""]
        lines += [f"- `{r['name']}` sm_{r['cc']}: {'; '.join(problems(r))}" for r in other]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def _ptxas_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(RESOURCE_CC).version)
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/triton_resources.py", description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="sm_90 registers/spills/shared memory/MMA per config")
    ap.add_argument("--markdown", metavar="FILE", help="write the report table here (implies --report)")
    ap.add_argument("--json", metavar="FILE", help="write the raw results here")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default min(2, cores))")
    ap.add_argument("--cc", type=int, action="append", help="capabilities (default 80 and 90)")
    ap.add_argument("--only", metavar="REGEX", help="only the specs whose name matches (a partial report)")
    args = ap.parse_args(argv)
    # as tests/conftest.py sets it: the same compile options (and Triton cache entries) as the tests
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = args.report or bool(args.markdown)
    caps = tuple(args.cc) if args.cc else CAPABILITIES
    if report and RESOURCE_CC not in caps:
        caps = caps + (RESOURCE_CC,)
    results = compile_all(caps, resources=report, workers=args.workers, only=args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not report:
        json.dump(results, sys.stdout)
        return 0 if not any(problems(r) for r in results) else 1
    shown = argv if argv is not None else sys.argv[1:]
    text = markdown(results, " ".join(["python tools/triton_resources.py", *shown]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0 if not summary(results)["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
