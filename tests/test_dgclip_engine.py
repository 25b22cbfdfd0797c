import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgclip.cli import main
from dgclip.engine import TrainConfig, read_records, run_training
from tests.dgclip_fixtures import cache_dir, data_root  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _cfg(data_root, cache_dir, out, **kw):
    base = dict(method="coop", dataset="rotated-digits", root=str(data_root), test_domains=["rot75"], seed=0,
                output_dir=str(out), backbone="tiny-digits", pretrained="none", cache_dir=str(cache_dir),
                steps=6, eval_every=3, hparams={"batch_size": 8, "n_ctx": 4}, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_deterministic_given_seed(data_root, cache_dir, tmp_path):
    hp = {"batch_size": 8, "n_ctx": 4}
    a = run_training(_cfg(data_root, cache_dir, tmp_path / "a", method="dpl", hparams=hp))
    b = run_training(_cfg(data_root, cache_dir, tmp_path / "b", method="dpl", hparams=hp))
    assert a["history"] == b["history"] and a["test_acc"] == b["test_acc"]
    c = run_training(_cfg(data_root, cache_dir, tmp_path / "c", method="dpl", hparams=hp, seed=1))
    assert c["history"] != a["history"]


def test_resume_from_checkpoint_matches(data_root, cache_dir, tmp_path, monkeypatch):
    full = run_training(_cfg(data_root, cache_dir, tmp_path / "full", steps=6, eval_every=2))
    # interrupt after step 4 by failing inside the 5th update
    from dgclip.methods.coop import CoOp

    calls = {"n": 0}
    orig = CoOp.update

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(CoOp, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2))
    assert not (tmp_path / "cut" / "results.jsonl").exists()  # nothing half-written
    monkeypatch.setattr(CoOp, "update", orig)
    res = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2, resume=True))
    assert res["history"] == full["history"] and res["test_acc"] == full["test_acc"]
    assert len(read_records(tmp_path / "cut" / "results.jsonl")) == 1
    # a finished run is skipped on --resume
    again = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2, resume=True))
    assert again["run_key"] == res["run_key"] and len(read_records(tmp_path / "cut" / "results.jsonl")) == 1


def test_record_fields_and_open_set(data_root, cache_dir, tmp_path):
    rec = run_training(_cfg(data_root, cache_dir, tmp_path, method="zero-shot", dataset="rotated-digits-open",
                            test_domains=["rot30"], hparams={}))
    for k in ("method", "dataset", "test_domain", "seed", "selection", "test_acc", "config", "versions",
              "protocol", "closed_acc", "known_acc", "unknown_recall", "h_score", "h_score_swept_oracle",
              "auroc", "oscr"):
        assert k in rec, k
    assert rec["selection"] == "training-domain validation" and rec["protocol"]["num_known"] == 6
    orc = run_training(_cfg(data_root, cache_dir, tmp_path, selection="oracle"))
    assert orc["selection"].startswith("oracle") and "oracle_acc" in orc["history"][0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_two_gloo_ranks_match_single_process(data_root, cache_dir, tmp_path):
    common = ["train", "--method", "coop", "--dataset", "rotated-digits", "--root", str(data_root),
              "--test-domain", "rot75", "--pretrained", "none", "--cache-dir", str(cache_dir), "--steps", "4",
              "--eval-every", "4", "--hparams", json.dumps({"batch_size": 8, "n_ctx": 4}), "--no-progress",
              "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), "-m", "dgclip", *common, "--output-dir",
                    str(tmp_path / "ddp")], check=True, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert main(common + ["--output-dir", str(tmp_path / "single")]) == 0
    ddp = read_records(tmp_path / "ddp" / "results.jsonl")
    single = read_records(tmp_path / "single" / "results.jsonl")
    assert len(ddp) == 1 and ddp[0]["world_size"] == 2  # only rank 0 writes
    # same global batch, gradients averaged over ranks = single-process gradient
    assert ddp[0]["test_acc"] == pytest.approx(single[0]["test_acc"], abs=1e-6)
    assert ddp[0]["history"][0]["val_acc"] == pytest.approx(single[0]["history"][0]["val_acc"], abs=1e-6)


def test_cli_errors(data_root, tmp_path, capsys):
    base = ["--root", str(data_root), "--output-dir", str(tmp_path), "--pretrained", "none", "--no-progress"]
    assert main(["train", "--method", "nope", "--dataset", "rotated-digits", *base]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["train", "--method", "coop", "--dataset", "imagenet-z", *base]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["train", "--method", "coop", "--dataset", "pacs", "--root", str(tmp_path / "missing"),
                 "--pretrained", "none", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--method", "coop", "--dataset", "pacs", "--root", str(tmp_path),
                 "--pretrained", "none", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "expected the DomainBed layout" in capsys.readouterr().err
    assert main(["datasets", "--root", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_train_results_datasets(data_root, cache_dir, tmp_path, capsys):
    args = ["train", "--method", "zero-shot", "--dataset", "rotated-digits", "--root", str(data_root),
            "--test-domain", "rot75", "--seeds", "0", "1", "--pretrained", "none", "--cache-dir", str(cache_dir),
            "--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert len(read_records(tmp_path / "results.jsonl")) == 2
    assert main(["results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rot75" in out and "Avg" in out and "+-" in out
    assert (tmp_path / "results_test_acc.csv").exists() and (tmp_path / "results_test_acc.png").exists()
    assert main(["datasets", "--root", str(data_root), "--quick"]) == 0
    assert "rotated-digits   OK" in capsys.readouterr().out
    ck = tmp_path / "x"
    run = ["train", "--method", "coop", "--dataset", "rotated-digits", "--root", str(data_root), "--test-domain",
           "rot0", "--pretrained", "none", "--cache-dir", str(cache_dir), "--output-dir", str(ck), "--steps", "2",
           "--eval-every", "2", "--hparams", '{"batch_size": 4, "n_ctx": 4}', "--no-progress"]
    assert main(run) == 0
    assert main(["eval", "--checkpoint", str(next((ck / "checkpoints").iterdir()))]) == 0
    assert '"test_acc"' in capsys.readouterr().out
