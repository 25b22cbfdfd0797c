"""Every registered Triton kernel, at every launch configuration listed in its module's COMPILE_SPECS,
compiles to PTX and cubin for sm_80 and sm_90 within the shared memory a block may use, and what
ptxas reports for sm_90 (spills, wgmma) matches the known defect lists below (no GPU needed).

The compile runs once per session in a subprocess without TRITON_INTERPRET (the interpreter, which
the test suite uses on machines without a GPU, accepts code that real compilation rejects), in up to
two processes (DGKERNELS_COMPILE_WORKERS overrides), started right after collection (see
start_compile) and cached: Triton's cache and the ptxas results beside it (TRITON_CACHE_DIR). The same data is the committed table
benchmarks/results/triton_sm90_resources.md (`python tools/triton_resources.py --report`), written by the
resource tool tools/triton_resources.py, which lives outside the installed package.
"""
import atexit
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest

triton = pytest.importorskip("triton")
# one xdist worker for the whole file: the compile fixture is per worker and costs minutes
pytestmark = pytest.mark.xdist_group("triton_compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
import triton_resources as resources  # noqa: E402
CAPABILITIES = resources.CAPABILITIES
_SCRIPT = (f"import json, sys; sys.path.insert(0, {TOOLS!r}); from triton_resources import compile_all; "
           "json.dump(compile_all(resources=True), sys.stdout)")

# Known sm_90 defects, by spec name. Each set must EQUAL what the compile finds: a new defect fails,
# and so does a fixed one that is still listed (delete it), so these lists only shrink (the
# goal: zero spills, every half-precision GEMM kernel on wgmma).
# Register allocation depends on the toolchain: the lists were read with this Triton (and the
# ptxas in its wheel); under another one a new defect still fails, a vanished one is only reported.
KNOWN_TOOLCHAIN = "3.8.0"
KNOWN_SPILLING = frozenset()
KNOWN_NO_WGMMA = frozenset()
# sm_80 (A100: 163 KiB per block): configurations that compile but could not launch there.
KNOWN_SM80_OVER_SHARED = frozenset()
# Modules that launch kernels through triton.autotune without declaring autotune_launches() (see
# tools/triton_resources.py): their autotune configs cannot be checked against COMPILE_SPECS.
AUTOTUNED_WITHOUT_HOOK = frozenset()


def _spec_names():
    return [spec.name for spec in resources.all_specs()]


SPEC_NAMES = _spec_names()


_RUN: dict = {}


def start_compile() -> subprocess.Popen:
    """Start the compile subprocess once. tests/conftest.py calls this right after collection when
    these tests are selected, so the minutes of compiling run beside the rest of the suite (which
    leaves a core of a CI machine idle) instead of after it; the fixture then only waits."""
    if "proc" not in _RUN:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: no pipe to fill up
        _RUN.update(out=out, err=err, proc=subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                                                            stdout=out, stderr=err, text=True,
                                                            start_new_session=True))
        atexit.register(_stop_compile)
    return _RUN["proc"]


def _stop_compile() -> None:
    # a session that ends before the fixture ran (-x, a deselection) leaves no compile behind
    proc = _RUN.get("proc")
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def compiled():
    proc = start_compile()
    try:
        proc.wait(timeout=3600)
    finally:
        _stop_compile()
    _RUN["out"].seek(0)
    _RUN["err"].seek(0)
    assert proc.returncode == 0, f"compile run failed:\n{_RUN['err'].read()[-4000:]}"
    results = json.loads(_RUN["out"].read())
    by_name = {}
    for r in results:
        by_name.setdefault(r["name"], {})[r["cc"]] = r
    return by_name


def _sm90(compiled):
    return [ccs[resources.RESOURCE_CC] for ccs in compiled.values() if resources.RESOURCE_CC in ccs]


def _exact(found: set, known: frozenset, what: str, toolchain_bound: bool = False) -> None:
    new, fixed = sorted(found - known), sorted(known - found)
    if toolchain_bound and triton.__version__ != KNOWN_TOOLCHAIN:
        assert not new, f"{what}: new under triton {triton.__version__}: {new}"
        if fixed:
            warnings.warn(f"{what}: listed (triton {KNOWN_TOOLCHAIN}) but not found under triton "
                          f"{triton.__version__}: {fixed}")
        return
    assert not new and not fixed, (f"{what}: new (fix the kernel, or the config must not ship): {new}; "
                                   f"fixed (delete from the known list): {fixed}")


def test_spec_list_is_not_empty_once_a_module_registers(compiled):
    assert resources.TRITON_MODULES, "no Triton module registered in dgkernels._triton_signature"
    assert SPEC_NAMES, f"Triton modules {resources.TRITON_MODULES} registered but list no COMPILE_SPECS"
    assert sorted(compiled) == sorted(SPEC_NAMES), "the subprocess compiled a different spec list"
    assert len(set(SPEC_NAMES)) == len(SPEC_NAMES), "spec names must be unique"


@pytest.mark.parametrize("name", SPEC_NAMES or ["<no specs registered>"])
def test_spec_compiles_for_sm80_and_sm90_within_hopper_shared_memory(compiled, name):
    assert name in compiled, f"{name} was not compiled (spec list empty or changed)"
    for cc in CAPABILITIES:
        r = compiled[name].get(cc)
        assert r is not None, f"{name}: no result for sm_{cc}"
        assert r["ok"], f"{name} sm_{cc}: {r['error']}"
    r90 = compiled[name][resources.RESOURCE_CC]
    assert not resources.problems(r90), f"{name} sm_90: {resources.problems(r90)}"


def test_sm80_shared_memory_overruns_are_exactly_the_known_ones(compiled):
    found = {name for name, ccs in compiled.items()
             if 80 in ccs and ccs[80]["ok"] and resources.problems(ccs[80])}
    _exact(found, KNOWN_SM80_OVER_SHARED, "configurations over sm_80's 163 KiB of shared memory per block",
           toolchain_bound=True)


def test_spilling_configs_are_exactly_the_known_ones(compiled):
    found = {r["name"] for r in _sm90(compiled) if r["ok"] and (r["spill_stores"] or r["spill_loads"])}
    _exact(found, KNOWN_SPILLING, "sm_90 configurations that spill registers (ptxas -v)", toolchain_bound=True)


def test_half_precision_gemm_kernels_use_wgmma_except_the_known_ones(compiled):
    half = [r for r in _sm90(compiled) if r["ok"] and r["half_gemm"]]
    assert half, "no half-precision tt.dot found in any kernel: the TTIR parsing is broken"
    found = {r["name"] for r in half if r["mma"] != "wgmma"}
    _exact(found, KNOWN_NO_WGMMA, "sm_90 half-precision GEMM kernels without wgmma.mma_async", toolchain_bound=True)


def test_autotune_configs_are_compile_specs():
    unhooked = set()
    for mod_name in resources.TRITON_MODULES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, "autotune_launches"):
            expected, kernels = resources.expected_autotune_specs(mod)
            listed = resources.listed_specs(mod, kernels)
            assert expected == listed, (f"{mod_name}: autotune configs not in COMPILE_SPECS: "
                                        f"{sorted(expected - listed)[:5]}; specs no autotuner launches: "
                                        f"{sorted(listed - expected)[:5]}")
        elif "triton.autotune" in inspect.getsource(mod):
            unhooked.add(mod_name)
    _exact(unhooked, AUTOTUNED_WITHOUT_HOOK, "modules using triton.autotune without autotune_launches()")


def test_parse_ptxas_reads_registers_and_spills():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_k' for 'sm_90a'
        ptxas info    : Function properties for _k
            536 bytes stack frame, 610 bytes spill stores, 704 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 536 bytes cumulative stack size
        """)
    assert resources.parse_ptxas(log) == {"stack": 536, "spill_stores": 610, "spill_loads": 704,
                                                "registers": 255}
    with pytest.raises(ValueError):
        resources.parse_ptxas("ptxas info    : 0 bytes gmem\n")


_PROBE = '''
import json, sys
import triton
import triton.language as tl
from triton_resources import CompileSpec, compile_spec, problems


@triton.jit
def _probe_dot(A, B, C, BLOCK: tl.constexpr, KSTEPS: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(KSTEPS):
        a = tl.load(A + r[:, None] * (BLOCK * KSTEPS) + k * BLOCK + r[None, :])
        b = tl.load(B + (k * BLOCK + r[:, None]) * BLOCK + r[None, :])
        acc += tl.dot(a, b)
    tl.store(C + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def _probe_broken(A, BLOCK: tl.constexpr):
    tl.store(A + tl.arange(0, BLOCK), undefined_name)  # noqa: F821 - must fail to compile


sig = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "BLOCK": "constexpr", "KSTEPS": "constexpr"}
specs = [CompileSpec("small", _probe_dot, sig, {"BLOCK": 64, "KSTEPS": 4}, 4, 2),
         CompileSpec("huge_smem", _probe_dot, sig, {"BLOCK": 256, "KSTEPS": 2}, 8, 2),
         CompileSpec("broken", _probe_broken, {"A": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 64})]
results = {s.name: compile_spec(s, 90, resources=True) for s in specs}
json.dump({name: [problems(r), r] for name, r in results.items()}, sys.stdout)
'''


def test_a_config_that_fails_to_compile_or_exceeds_shared_memory_is_flagged(tmp_path):
    (tmp_path / "probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TOOLS, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    small = out["small"][1]
    assert out["small"][0] == [], out["small"]
    # a 64 x 64 fp16 dot with 4 warps is Hopper's wgmma; ptxas reports its registers
    assert small["half_gemm"] and small["dot_types"] == ["f16"] and small["mma"] == "wgmma", small
    assert 0 < small["registers"] <= 255 and small["spill_stores"] == 0, small
    assert out["huge_smem"][1]["shared"] > resources.SHARED_LIMIT[90]
    assert any("shared memory" in p for p in out["huge_smem"][0]), out["huge_smem"]
    assert any("compile failed" in p for p in out["broken"][0]), out["broken"]
