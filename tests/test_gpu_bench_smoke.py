"""The GPU check runs here: benchmarks/gpu_bench.py in its CPU smoke mode (the same code at tiny
sizes) writes every section with measured rows, and scripts/gpu_check.sh parses, prints its plan and
runs end to end in its dry mode (CPU, TRITON_INTERPRET=1)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["## Ceilings", "## Contrastive losses: ", "## Head ops", "## Prompt encoding",
            "## Contrastive losses at the largest N", "## Largest N"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_gpu_bench_smoke_writes_every_section(tmp_path):
    pytest.importorskip("open_clip")
    out = tmp_path / "smoke.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--smoke", "--out",
                           str(out), "--budget-s", "120"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "SMOKE" in text
    for title in SECTIONS:
        assert title in text, f"section {title!r} missing:\n{text[-3000:]}"
    # small and medium rows of every op before the largest-N rows (a cut loses only those)
    at = [text.index(title) for title in SECTIONS]
    assert at == sorted(at), at
    assert "FAILED" not in text, text
    # each section measured something: a row with a number in its ms column
    for chunk in text.split("\n## ")[1:]:
        rows = [r for r in chunk.splitlines() if r.startswith("| ") and "skipped" not in r and "---" not in r]
        assert len(rows) >= 2, f"no measured row in section:\n{chunk[:2000]}"
    assert "Total" in text.splitlines()[-1]


def test_gpu_check_script_prints_its_plan():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_check.sh"), "--print"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("(build, <= 110s)", "(tests, <= 150s)", "(bench, <= 140s)"):
        assert step in proc.stdout, proc.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in proc.stdout
    # the test step: the GPU selection only, verbose, a limit per test, fixed launch configurations
    tests = next(line for line in proc.stdout.splitlines() if "(tests," in line)
    for part in ("-p gpu_test_select", " -v ", "DGKERNELS_TRITON_FIXED_CONFIG=1"):
        assert part in tests, tests
    bad = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_check.sh"), "--no-such-flag"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_step(tmp_path):
    """--dry: the GPU run's own commands on this CPU (interpreter, tiny sizes), a summary line per
    step and the benchmark table's skeleton with every section."""
    pytest.importorskip("open_clip")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = dict(_env(), LOGDIR=str(tmp_path))
    proc = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for row in ("| build | skipped (dry)", "| tests | ok", "| bench | ok", "exit status 0"):
        assert row in summary, summary
    log = (tmp_path / "tests.log").read_text()
    if importlib.util.find_spec("pytest_timeout") is not None:
        assert "timeout: 60.0s" in log and "timeout method: signal" in log, log[:3000]
    assert " PASSED" in log and " FAILED" not in log, log[-3000:]
    table = (tmp_path / "gpu_dry.md").read_text()
    for title in SECTIONS:
        assert title in table, table[-3000:]


def test_roofline_covers_every_benchmark_row_and_the_grids(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "roofline.md"
    # in a subprocess: the benchmark modules put benchmarks/ on sys.path, whose test_*.py files
    # would shadow the test modules of the same name
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"), "--out", str(out)],
                          cwd=tmp_path, env=dict(_env(), TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    probe = ("import sys, json; sys.path.insert(0, 'benchmarks'); import gpu_bench; "
             "print(json.dumps([gpu_bench.sizes(False), gpu_bench.CONTRASTIVE_OPS, gpu_bench.HEAD_OPS]))")
    sizes = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert sizes.returncode == 0, sizes.stderr[-3000:]
    s, contrastive_ops, head_ops = json.loads(sizes.stdout)
    for n in s["ns"] + s["large_ns"]:
        for d in s["ds"]:
            for dtype in s["dtypes"]:
                for op in contrastive_ops:
                    assert f"| {op} | {n} | {d} | {dtype} |" in text, (op, n, d, dtype)
    for op in head_ops:
        assert f"| {op} |" in text, op
    for n in (1024, 4096, 65536):
        for kernel in ("fwd", "bwd"):
            assert f"| {n} | {kernel} |" in text, (n, kernel)
    assert "| dc | 12 | 264 |" in text


def test_gpu_check_script_is_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([sc, os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
