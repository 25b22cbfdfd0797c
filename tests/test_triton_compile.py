"""Every registered Triton kernel, at every launch configuration listed in its module's
COMPILE_SPECS, compiles to PTX and cubin for sm_80 and sm_90 (no GPU needed).

The compile runs once per session in a subprocess without TRITON_INTERPRET (the interpreter,
which the test suite uses on machines without a GPU, accepts code that real compilation rejects).
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from dgkernels import _triton_compile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPABILITIES = (80, 90)
# `python -m dgkernels._triton_compile` would run the module as __main__, a second copy whose
# registry the package never fills; calling compile_all from the imported module avoids that.
_SCRIPT = "import json, sys; from dgkernels._triton_compile import compile_all; json.dump(compile_all(), sys.stdout)"


def _spec_names():
    return [spec.name for spec in _triton_compile.all_specs()]


SPEC_NAMES = _spec_names()


@pytest.fixture(scope="session")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"compile run failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout)
    by_name = {}
    for r in results:
        by_name.setdefault(r["name"], {})[r["cc"]] = r
    return by_name


def test_spec_list_is_not_empty_once_a_module_registers(compiled):
    assert _triton_compile.TRITON_MODULES, "no Triton module registered with dgkernels._triton_compile"
    assert SPEC_NAMES, f"Triton modules {_triton_compile.TRITON_MODULES} registered but list no COMPILE_SPECS"
    assert sorted(compiled) == sorted(SPEC_NAMES), "the subprocess compiled a different spec list"
    assert len(set(SPEC_NAMES)) == len(SPEC_NAMES), "spec names must be unique"


@pytest.mark.parametrize("name", SPEC_NAMES or ["<no specs registered>"])
def test_spec_compiles_for_sm80_and_sm90(compiled, name):
    assert name in compiled, f"{name} was not compiled (spec list empty or changed)"
    for cc in CAPABILITIES:
        r = compiled[name].get(cc)
        assert r is not None, f"{name}: no result for sm_{cc}"
        assert r["ok"], f"{name} sm_{cc}: {r['error']}"
