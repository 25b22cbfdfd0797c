"""The GPU check runs here: benchmarks/gpu_bench.py in its CPU smoke mode (the same code at tiny
sizes) writes every section with measured rows, and scripts/gpu_check.sh parses and dry-runs."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["## Ceilings", "## Contrastive", "## Largest N", "## Head ops", "## Prompt encoding"]


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
    assert "FAILED" not in text, text
    # each section measured something: a row with a number in its ms column
    for chunk in text.split("\n## ")[1:]:
        rows = [r for r in chunk.splitlines() if r.startswith("| ") and "skipped" not in r and "---" not in r]
        assert len(rows) >= 2, f"no measured row in section:\n{chunk[:2000]}"
    assert "Total" in text.splitlines()[-1]


def test_gpu_check_script_dry_run():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("(build,", "(tests,", "(bench,"):
        assert step in proc.stdout, proc.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in proc.stdout
    bad = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_check.sh"), "--no-such-flag"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_gpu_check_script_is_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([sc, os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
