"""`dgclip sweep`: grid, stable keys, relaunch without rerunning, resume of interrupted jobs,
delete_incomplete, the DomainBed table over a sweep, and the submitit launcher (local executor)."""
import json

import pytest

from dgclip.cli import main
from dgclip.results import SWEEP_SELECTIONS, select_sweep
from dgclip.sweep import job_status, launch, make_grid
from tests.dgclip_fixtures import cache_dir, data_root  # noqa: F401


def _argv(action, sweep_dir, data_root, cache_dir, *extra, methods=("coop", "dpl")):  # noqa: F811
    return ["sweep", action, "--sweep-dir", str(sweep_dir), "--methods", *methods, "--datasets", "rotated-digits",
            "--test-domains", "rot75", "--n-hparams", "2", "--steps", "2", "--eval-every", "2",
            "--hparams", '{"batch_size": 4, "n_ctx": 4}', "--train-domains", "rot0", "rot30",
            "--root", str(data_root), "--cache-dir", str(cache_dir), "--pretrained", "none", "--workers", "0",
            "--device", "cpu", "--no-progress", *extra]


def _grid(sweep_dir, data_root, cache_dir, methods=("coop", "dpl"), n_hparams=2):  # noqa: F811
    return make_grid(sweep_dir, list(methods), ["rotated-digits"], ["rot75"], n_hparams, 1, steps=2,
                     hparams={"batch_size": 4, "n_ctx": 4}, root=str(data_root), cache_dir=str(cache_dir),
                     pretrained="none", eval_every=2, workers=0, device="cpu", progress=False,
                     train_domains=["rot0", "rot30"])


def test_keys_are_stable_and_describe_the_job(tmp_path, data_root, cache_dir):  # noqa: F811
    a = _grid(tmp_path, data_root, cache_dir)
    b = _grid(tmp_path, data_root, cache_dir)
    assert len(a) == 4 and [j.key for j in a] == [j.key for j in b] and len({j.key for j in a}) == 4
    assert a[0].key.startswith("coop__rotated-digits__rot75__h0__t0__")
    changed = make_grid(tmp_path, ["coop"], ["rotated-digits"], ["rot75"], 1, 1, steps=3,
                        hparams={"batch_size": 4, "n_ctx": 4}, root=str(data_root), cache_dir=str(cache_dir),
                        pretrained="none", eval_every=2, workers=0, device="cpu", progress=False,
                        train_domains=["rot0", "rot30"])
    assert changed[0].key != a[0].key  # another number of steps is another job
    with pytest.raises(ValueError, match="n-hparams"):
        make_grid(tmp_path, ["coop"], ["rotated-digits"], ["rot75"], 0, 1)


def test_launch_relaunch_list_and_collect(tmp_path, data_root, cache_dir, capsys, monkeypatch):  # noqa: F811
    sweep = tmp_path / "sweep"
    assert main(_argv("launch", sweep, data_root, cache_dir)) == 0
    out = capsys.readouterr().out
    assert "4/4 jobs done (4 launched now, 0 already done)" in out
    # relaunch: nothing reruns
    import dgclip.engine

    def boom(cfg):
        raise AssertionError("a finished job was rerun")

    monkeypatch.setattr(dgclip.engine, "run_training", boom)
    assert main(_argv("launch", sweep, data_root, cache_dir)) == 0
    assert "4/4 jobs done (0 launched now, 4 already done)" in capsys.readouterr().out
    assert main(_argv("list", sweep, data_root, cache_dir)) == 0
    assert "4 done, 0 incomplete, 0 not launched (4 jobs)" in capsys.readouterr().out
    # one table: both DomainBed selections, labelled, over both methods
    assert main(["results", str(sweep)]) == 0
    table = capsys.readouterr().out
    for label in SWEEP_SELECTIONS.values():
        assert f"selection: {label}" in table
    assert "| coop" in table and "| dpl" in table and "rot75" in table


def test_interrupted_job_resumes_and_delete_incomplete(tmp_path, data_root, cache_dir, monkeypatch):  # noqa: F811
    jobs = _grid(tmp_path, data_root, cache_dir, methods=("coop",), n_hparams=1)
    from dgclip.methods.coop import CoOp

    orig = CoOp.update
    calls = {"n": 0}

    def flaky(self, batch, *rest):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first step: no checkpoint yet at eval_every=2
            raise RuntimeError("node lost")
        return orig(self, batch, *rest)

    monkeypatch.setattr(CoOp, "update", flaky)
    launch(jobs)  # the local launcher reports the failure and carries on
    assert job_status(jobs[0]) == "incomplete" and (jobs[0].folder / "error.txt").exists()
    monkeypatch.setattr(CoOp, "update", orig)
    assert main(["sweep", "delete_incomplete", "--sweep-dir", str(tmp_path), "--methods", "coop", "--datasets",
                 "rotated-digits", "--test-domains", "rot75", "--steps", "2", "--eval-every", "2", "--hparams",
                 '{"batch_size": 4, "n_ctx": 4}', "--train-domains", "rot0", "rot30", "--root", str(data_root),
                 "--cache-dir", str(cache_dir), "--pretrained", "none", "--workers", "0", "--device", "cpu",
                 "--no-progress"]) == 0
    assert job_status(jobs[0]) == "not launched"
    assert launch(jobs) == {jobs[0].key: "done"}
    assert not (jobs[0].folder / "error.txt").exists()


def _rec(method, h, seed, hist):
    return {"dataset": "d", "method": method, "test_domain": "t", "seed": seed, "hparams_seed": h, "history": hist}


def test_select_sweep_follows_domainbed():
    # hparam 0: best source validation (0.9 at step 1) but later steps better on the oracle split
    h0 = [{"step": 1, "val_acc": 0.9, "test_acc": 0.5, "oracle_acc": 0.4},
          {"step": 2, "val_acc": 0.8, "test_acc": 0.6, "oracle_acc": 0.45}]
    h1 = [{"step": 1, "val_acc": 0.7, "test_acc": 0.9, "oracle_acc": 0.9},
          {"step": 2, "val_acc": 0.85, "test_acc": 0.7, "oracle_acc": 0.5}]
    rows = {r["selection"]: r for r in select_sweep([_rec("m", 0, 0, h0), _rec("m", 1, 0, h1)])}
    td = rows[SWEEP_SELECTIONS["training-domain"]]
    assert (td["hparams_seed"], td["test_acc"], td["selected_step"]) == (0, 0.5, 1)
    orc = rows[SWEEP_SELECTIONS["oracle"]]  # last step only: 0.45 (h0) vs 0.5 (h1)
    assert (orc["hparams_seed"], orc["test_acc"], orc["selected_step"]) == (1, 0.7, 2)
    # runs without the oracle split: training-domain selection only
    plain = [{k: v for k, v in e.items() if k != "oracle_acc"} for e in h0]
    assert [r["selection"] for r in select_sweep([_rec("m", 0, 0, plain)])] == [SWEEP_SELECTIONS["training-domain"]]


def test_submitit_local_executor(tmp_path, data_root, cache_dir, capsys):  # noqa: F811
    """The grid of the test above, one method (each job is a fresh process here: time)."""
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    argv = _argv("launch", sweep, data_root, cache_dir, "--launcher", "submitit", "--submitit-cluster", "local",
                 "--submitit-options", json.dumps({"timeout_min": 20}), methods=("dpl",))
    assert main(argv) == 0
    assert "2/2 jobs done (2 launched now, 0 already done)" in capsys.readouterr().out
    assert len(list((sweep / "submitit").glob("*_result.pkl"))) == 2
    assert main(argv) == 0  # relaunch: nothing submitted
    assert "(0 launched now, 2 already done)" in capsys.readouterr().out
    assert main(["results", str(sweep)]) == 0
    assert "| dpl" in capsys.readouterr().out


def test_multi_gpu_launcher_runs_jobs_in_pinned_subprocesses(tmp_path, data_root, cache_dir):  # noqa: F811
    """The subprocess path of multi_gpu, on CPU jobs: one child per 'GPU', CUDA_VISIBLE_DEVICES set."""
    jobs = _grid(tmp_path, data_root, cache_dir, methods=("coop",), n_hparams=1)
    with pytest.raises(RuntimeError, match="no visible GPU"):
        launch(jobs, "multi_gpu", gpus=[])
    assert launch(jobs, "multi_gpu", gpus=["0"], poll_s=0.2) == {jobs[0].key: "done"}
    assert json.loads((jobs[0].folder / "job.json").read_text())["method"] == "coop"


def test_launchers_take_the_job_runner_and_never_import_the_sweep():
    """No sweep <-> launcher cycle: a launcher gets `run_job` as an argument."""
    import ast
    import inspect

    import dgclip.launchers as launchers

    tree = ast.parse(inspect.getsource(launchers))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.endswith("sweep") for m in imported)
    ran = []

    class FakeJob:
        key, folder = "k", "f"

    launchers.get("local")([FakeJob(), FakeJob()], ran.append)
    assert len(ran) == 2
