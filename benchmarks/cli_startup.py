"""How fast `dgclip` answers: `--help`, a verb's `--help` and an argument error, each in a fresh
Python process (what a user waits for), against `python -c pass` and `import torch` measured in the
same rounds on the same machine.

    python benchmarks/cli_startup.py [--rounds 7] [--markdown benchmarks/results/cli_startup_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
    "dgclip --help": [sys.executable, "-m", "dgclip", "--help"],
    "dgclip train --help": [sys.executable, "-m", "dgclip", "train", "--help"],
    "dgclip train --steps 0 (argument error)": [sys.executable, "-m", "dgclip", "train", "--method", "coop",
                                                "--dataset", "pacs", "--steps", "0"],
    "python -c 'import torch' (what --help used to pay)": [sys.executable, "-c", "import torch"],
}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = {name: [] for name in CASES}
    for _ in range(args.rounds):  # interleaved rounds: load changes hit every case alike
        for name, argv in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"CLI start-up, fresh process each, {args.rounds} interleaved rounds; {_cpu()}, {os.cpu_count()} "
             f"cores, load average {load:.1f} at the end; Python {platform.python_version()}", "",
             "| command | median s | min s | max s |", "|---|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
