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
from tests.dgclip_fixtures import backbone, cache_dir, data_root  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _cfg(data_root, cache_dir, out, **kw):
    base = dict(method="coop", dataset="rotated-digits", root=str(data_root), test_domains=["rot75"], seed=0,
                output_dir=str(out), backbone="tiny-digits", pretrained="none", cache_dir=str(cache_dir),
                steps=6, eval_every=3, hparams={"batch_size": 8, "n_ctx": 4}, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _interrupted_run(cfg, fail_at_update, monkeypatch):
    """Run CoOp until its `fail_at_update`-th update raises KeyboardInterrupt (a killed job); the
    checkpoint of the last evaluation before it stays behind."""
    from dgclip.methods.coop import CoOp

    orig, calls = CoOp.update, {"n": 0}

    def flaky(self, batch, forward=None):
        calls["n"] += 1
        if calls["n"] == fail_at_update:
            raise KeyboardInterrupt
        return orig(self, batch, forward)

    monkeypatch.setattr(CoOp, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    monkeypatch.setattr(CoOp, "update", orig)


def test_deterministic_given_seed(data_root, cache_dir, tmp_path):
    hp = {"batch_size": 8, "n_ctx": 4}
    a = run_training(_cfg(data_root, cache_dir, tmp_path / "a", method="dpl", hparams=hp))
    b = run_training(_cfg(data_root, cache_dir, tmp_path / "b", method="dpl", hparams=hp))
    assert a["history"] == b["history"] and a["test_acc"] == b["test_acc"]
    c = run_training(_cfg(data_root, cache_dir, tmp_path / "c", method="dpl", hparams=hp, seed=1))
    assert c["history"] != a["history"]


def test_resume_from_checkpoint_matches(data_root, cache_dir, tmp_path, monkeypatch):
    full = run_training(_cfg(data_root, cache_dir, tmp_path / "full", steps=6, eval_every=2))
    _interrupted_run(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2), 5, monkeypatch)
    assert not (tmp_path / "cut" / "results.jsonl").exists()  # nothing half-written
    res = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2, resume=True))
    assert res["history"] == full["history"] and res["test_acc"] == full["test_acc"]
    assert len(read_records(tmp_path / "cut" / "results.jsonl")) == 1
    # a finished run is skipped on --resume
    again = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=6, eval_every=2, resume=True))
    assert again["run_key"] == res["run_key"] and len(read_records(tmp_path / "cut" / "results.jsonl")) == 1


def test_resume_refuses_other_settings(data_root, cache_dir, tmp_path, monkeypatch):
    """The run key does not name --hparams or --steps: --resume must not hand back (or continue) a
    run made with other settings."""
    out = tmp_path / "r"
    run_training(_cfg(data_root, cache_dir, out, steps=4, eval_every=2))
    with pytest.raises(ValueError, match=r"hparams.lr: 0.002 -> 0.05"):
        run_training(_cfg(data_root, cache_dir, out, steps=4, eval_every=2, resume=True,
                          hparams={"batch_size": 8, "n_ctx": 4, "lr": 0.05}))
    with pytest.raises(ValueError, match=r"steps: 4 -> 6"):
        run_training(_cfg(data_root, cache_dir, out, steps=6, eval_every=2, resume=True))
    assert len(read_records(out / "results.jsonl")) == 1
    # an interrupted run: its checkpoint is not continued under other hparams either
    _interrupted_run(_cfg(data_root, cache_dir, tmp_path / "cut", steps=4, eval_every=2), 3, monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint .*hparams.n_ctx: 4 -> 2"):
        run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=4, eval_every=2, resume=True,
                          hparams={"batch_size": 8, "n_ctx": 2}))
    # the same settings still resume (workers and paths do not count)
    res = run_training(_cfg(data_root, cache_dir, tmp_path / "cut", steps=4, eval_every=2, resume=True, workers=0))
    assert res["history"][-1]["step"] == 4


def test_record_fields_and_open_set(data_root, cache_dir, tmp_path):
    rec = run_training(_cfg(data_root, cache_dir, tmp_path, method="zero-shot", dataset="rotated-digits-open",
                            test_domains=["rot30"], hparams={}))
    for k in ("method", "dataset", "test_domain", "seed", "selection", "test_acc", "config", "versions",
              "protocol", "closed_acc", "known_acc", "unknown_recall", "h_score", "h_score_native",
              "h_score_swept_oracle", "auroc", "oscr", "threshold"):
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


def test_batches_draw_batch_size_per_source_domain(data_root, cache_dir, tmp_path, monkeypatch):
    """DomainBed / DPL (batch_scope "per_domain"): every step holds batch_size images of EACH
    source domain; Dassl's loader (CoOp's released default, "total"): batch_size in all."""
    from dgclip.methods.coop import CoOp

    seen = []
    orig = CoOp.update

    def spy(self, batch, forward=None):
        seen.append(torch.bincount(batch.domains, minlength=self.num_domains).tolist())
        return orig(self, batch, forward)

    monkeypatch.setattr(CoOp, "update", spy)
    run_training(_cfg(data_root, cache_dir, tmp_path / "a", steps=3, eval_every=3,
                      hparams={"batch_size": 8, "n_ctx": 4, "batch_scope": "per_domain"}))
    assert seen == [[8] * 5] * 3
    seen.clear()
    run_training(_cfg(data_root, cache_dir, tmp_path / "b", steps=3, eval_every=3,
                      hparams={"batch_size": 8, "n_ctx": 4}))
    assert [sum(s) for s in seen] == [8] * 3 and CoOp.all_defaults()["batch_scope"] == "total"


def test_domain_balanced_batches_errors_and_resume():
    from dgclip.data.sampling import DomainBalancedBatches

    dom = torch.tensor([0, 0, 1, 1, 1, 2])
    g = torch.Generator().manual_seed(3)
    s = DomainBalancedBatches(dom, 4, g)
    state = g.get_state()
    a = s.draw()
    assert (dom[a] == torch.arange(3).repeat_interleave(4)).all()
    g.set_state(state)
    assert (s.draw() == a).all()
    with pytest.raises(ValueError, match="no training items"):
        DomainBalancedBatches(torch.tensor([0, 2]), 4, g)
    with pytest.raises(ValueError, match="batch_size"):
        DomainBalancedBatches(dom, 0, g)


def _test_split(data_root, backbone, order=None):
    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import ImageDataset, scan
    from dgclip.data.splits import make_protocol
    from dgclip.engine import _Split

    spec = get_spec("rotated-digits")
    protocol = make_protocol(spec, scan(str(data_root), spec), ["rot75"], trial_seed=0)
    recs = protocol.test["rot75"]
    if order is not None:
        recs = recs.subset(order(recs))
    ds = ImageDataset(recs, backbone.preprocess_val, label_map=protocol.label_map, domain_map=protocol.domain_map)
    return protocol, _Split(ds, None)


def test_transductive_eval_is_independent_of_listing_order(data_root, backbone):  # noqa: F811
    """DPL's batch-mean prompt must not see the class-by-class listing: same logits per image for
    class-sorted, reversed and shuffled listings, and no eval batch is one or two classes."""
    import numpy as np

    from dgclip.engine import _logits
    from dgclip.methods import get_method

    protocol, base = _test_split(data_root, backbone)
    m = get_method("dpl")(backbone, protocol.classnames, 5, {})
    assert m.transductive and m.eval_batch_size == 64
    ref = _logits(m, base, 256, "cpu")
    by_path = dict(zip(base.ds.records.paths, ref))
    for order in (lambda r: np.argsort(r.labels, kind="stable"), lambda r: np.arange(len(r))[::-1].copy(),
                  lambda r: np.random.RandomState(5).permutation(len(r))):
        _, s = _test_split(data_root, backbone, order)
        lg = _logits(m, s, 256, "cpu")
        for p, row in zip(s.ds.records.paths, lg):
            torch.testing.assert_close(row, by_path[p], rtol=0, atol=1e-5)
    # the seeded eval batches mix classes although the listing is class-sorted
    from dgclip.data.sampling import eval_order
    from dgclip.data.splits import seed_hash

    _, s = _test_split(data_root, backbone, lambda r: np.argsort(r.labels, kind="stable"))
    order = eval_order(s.ds.records.paths, seed_hash(0, "eval"))
    for start in range(0, len(order) - 63, 64):
        assert len(set(s.labels[order[start:start + 64]].tolist())) >= 6
    assert not get_method("dpl")(backbone, protocol.classnames, 5, {"test_prompt": "instance"}).transductive


def test_transductive_flag_in_record(data_root, cache_dir, tmp_path):
    rec = run_training(_cfg(data_root, cache_dir, tmp_path, method="dpl", steps=2, eval_every=2))
    assert rec["transductive"] is True and rec["eval_batch_size"] == 64
    rec = run_training(_cfg(data_root, cache_dir, tmp_path, steps=2, eval_every=2))
    assert rec["transductive"] is False


def test_open_set_metrics_pool_held_out_domains_by_sample(data_root, cache_dir, tmp_path):
    """Several held-out domains: open-set metrics over the union of their images (sample-weighted,
    like test_acc), the common threshold calibrated on source validation only."""
    import math

    import numpy as np

    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import scan
    from dgclip.data.splits import make_protocol

    doms = ["rot60", "rot75"]
    rec = run_training(_cfg(data_root, cache_dir, tmp_path, method="zero-shot", dataset="rotated-digits-open",
                            test_domains=doms, hparams={}))
    spec = get_spec("rotated-digits-open")
    prot = make_protocol(spec, scan(str(data_root), spec), doms, trial_seed=0)
    known = {d: int((prot.label_map[prot.test[d].labels] < 6).sum()) for d in doms}
    per = rec["history"][0]["test"]
    want = sum(per[d]["closed_acc"] * known[d] for d in doms) / sum(known.values())
    assert rec["closed_acc"] == pytest.approx(want, abs=1e-9)
    assert per["rot60"]["threshold"] == per["rot75"]["threshold"] == rec["threshold"]
    assert math.isnan(rec["h_score_native"])  # zero-shot is closed-set: no native unknown
