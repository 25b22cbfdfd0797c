"""SIGINT / SIGTERM during training: a checkpoint at the current step, one line on how to resume,
exit 130 / 143, and the resumed run ends exactly where an uninterrupted one does."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgclip.engine import read_records
from tests.own_data_fixtures import COOP, TINY, make_tree

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 400, 50


def _argv(own, out, cache):
    return [sys.executable, "-m", "dgclip", "train", "--method", "coop", "--dataset", str(own), "--test-domain",
            "night", *TINY, "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--hparams", COOP,
            "--output-dir", str(out), "--cache-dir", str(cache)]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _result(out):
    rec = read_records(Path(out) / "results.jsonl")[-1]
    return {k: rec[k] for k in ("test_acc", "val_acc", "selected_step", "loss_last", "history")}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, signum):
    import torch

    own, cache = make_tree(tmp_path / "MyDG"), tmp_path / "cache"
    full = subprocess.run(_argv(own, tmp_path / "full", cache), env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    argv = _argv(own, cut, cache)
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt_dir = cut / "checkpoints"
    deadline = time.time() + 300
    while not (ckpt_dir.exists() and any(ckpt_dir.glob("*.pt"))):  # the first evaluation is behind us
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    saved = torch.load(next(ckpt_dir.glob("*.pt")), map_location="cpu", weights_only=False)["step"]
    assert EVAL_EVERY <= saved < STEPS and f"step {saved}" in lines[0]
    assert not (cut / "results.jsonl").exists()
    resumed = subprocess.run(argv + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _result(cut) == _result(tmp_path / "full")
