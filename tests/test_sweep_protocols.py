"""`dgclip sweep --protocol base2new` (and `dgclip reproduce gopro-base2new`) on a generated
Caltech101-layout tree: one job per (method, dataset, trial seed) running what `dgclip train
--protocol` runs, done jobs skipped, incomplete ones deleted, the protocol tables from the sweep
folder, flags that do not apply refused by name. Tiny sizes: random-weight tiny CLIP, 1 epoch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coop_suite_trees import make_caltech101, make_json_datasets  # noqa: E402

from dgclip.cli import main  # noqa: E402
from dgclip.engine import read_records  # noqa: E402

TINY = ["--backbone", "tiny-digits", "--pretrained", "none", "--no-progress", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def caltech_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("caltech")
    make_caltech101(root)
    return root


def _argv(action, sweep, root, cache, *extra, methods=("coop", "gopro"), n_trials="2"):
    return ["sweep", action, "--sweep-dir", str(sweep), "--protocol", "base2new", "--shots", "2", "--epochs", "1",
            "--methods", *methods, "--datasets", "caltech101", "--n-trials", n_trials, "--root", str(root),
            "--cache-dir", str(cache), *TINY, *extra]


def test_base2new_sweep_launch_list_relaunch_results(caltech_root, tmp_path, capsys, monkeypatch):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    assert main(_argv("launch", sweep, caltech_root, cache)) == 0
    assert "4/4 jobs done (4 launched now, 0 already done)" in capsys.readouterr().out
    recs = {(r["method"], r["seed"]): r for r in
            (read_records(f)[-1] for f in sorted(sweep.rglob("results.jsonl")))}
    # trial seeds 0, 1 are CoOp's seeds 1, 2 (the presets' `seeds`)
    assert set(recs) == {("coop", 1), ("coop", 2), ("gopro", 1), ("gopro", 2)}
    for r in recs.values():
        assert r["protocol"] == "base2new" and r["shots"] == 2 and r["epochs"] == 1
        assert r["base_classes"] == ["face", "leopard", "motorbike", "accordion"]
        assert r["new_classes"] == ["airplane", "anchor", "ant"]
        assert {"base_acc", "new_acc", "hm"} <= set(r)
    folder = next(p for p in sweep.iterdir() if p.name.startswith("coop__caltech101__base2new__k2__t0__s1__"))
    assert (folder / "done").exists() and json.loads((folder / "job.json").read_text())["seed"] == 1

    # the same run as `dgclip train --protocol` with the same flags
    out = tmp_path / "train"
    assert main(["train", "--protocol", "base2new", "--method", "coop", "--dataset", "caltech101", "--shots", "2",
                 "--epochs", "1", "--seeds", "1", "--root", str(caltech_root), "--cache-dir", str(cache),
                 "--output-dir", str(out), *TINY]) == 0
    alone = read_records(out / "results.jsonl")[-1]
    swept = recs[("coop", 1)]
    for k in ("base_acc", "new_acc", "hm", "loss_first", "loss_last", "hparams", "settings", "sources", "steps"):
        assert swept[k] == alone[k], k
    assert {k: v for k, v in swept["config"].items() if k != "output_dir"} == \
        {k: v for k, v in alone["config"].items() if k != "output_dir"}

    # relaunch: nothing reruns
    import dgclip.protocols.runner as runner

    def boom(cfg):
        raise AssertionError("a finished job was rerun")

    monkeypatch.setattr(runner, "run_protocol", boom)
    capsys.readouterr()
    assert main(_argv("launch", sweep, caltech_root, cache)) == 0
    assert "4/4 jobs done (0 launched now, 4 already done)" in capsys.readouterr().out
    assert main(_argv("list", sweep, caltech_root, cache)) == 0
    listed = capsys.readouterr().out
    assert "4 done, 0 incomplete, 0 not launched (4 jobs)" in listed
    assert "done          gopro__caltech101__base2new__k2__t1__s2__" in listed

    assert main(["results", str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "base-to-new" in table and "HM" in table
    rows = [line.split() for line in table.splitlines() if line.startswith("caltech101")]
    assert {r[1] for r in rows} == {"coop", "gopro"} and all(r[3] == "2" for r in rows)  # 2 seeds each
    assert main(["results", str(sweep), "--paper"]) == 0
    paper = capsys.readouterr().out
    assert "caltech101:hm" in paper and "93.73" in paper  # CoOp's published Caltech101 HM beside ours


def test_keys_follow_the_resolved_settings(caltech_root, tmp_path):
    import argparse

    from dgclip.commands.sweep import _suite_jobs

    def keys(**over):
        args = argparse.Namespace(
            sweep_dir=str(tmp_path), methods=["coop"], datasets=["caltech101"], n_trials=2, protocol="base2new",
            shots=2, epochs=1, targets=None, root=str(caltech_root), backbone="tiny-digits", pretrained="none",
            cache_dir=str(tmp_path / "c"), device="cpu", precision="auto", no_progress=True, workers=0, hparams=None)
        for k, v in over.items():
            setattr(args, k, v)
        return [j.key for j in _suite_jobs(args)]

    base = keys()
    assert len(set(base)) == 2 and base == keys() and base == keys(workers=2, no_progress=False)
    assert base == keys(hparams={"lr": 0.002})  # CoOp's preset learning rate spelled out: the same jobs
    assert base != keys(hparams={"lr": 0.01}) and base != keys(epochs=2) and base != keys(shots=4)


def test_trial_seeds_are_the_presets_coop_seeds():
    from dgclip.protocols.sweep import trial_seeds

    assert trial_seeds("coop", "caltech101", 3) == [1, 2, 3]
    assert trial_seeds("gopro", "caltech101", 3) == [1, 2, 3]  # GOPro's list is 1..5
    assert trial_seeds("coop", "imagenet", 5) == [1, 2, 3, 4, 5]  # beyond the list: counting on
    assert trial_seeds("zero-shot", "caltech101", 1) == [1]


def test_incomplete_job_is_listed_and_deleted(caltech_root, tmp_path, capsys, monkeypatch):
    import dgclip.protocols.runner as runner

    sweep, cache = tmp_path / "sweep", tmp_path / "cache"

    def crash(cfg):
        raise RuntimeError("node lost")

    monkeypatch.setattr(runner, "run_protocol", crash)
    argv = _argv("launch", sweep, caltech_root, cache, methods=("coop",), n_trials="1")
    assert main(argv) == 1
    (folder,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert "node lost" in (folder / "error.txt").read_text() and not (folder / "done").exists()
    capsys.readouterr()
    assert main(_argv("list", sweep, caltech_root, cache, methods=("coop",), n_trials="1")) == 0
    assert "0 done, 1 incomplete, 0 not launched (1 jobs)" in capsys.readouterr().out
    assert main(_argv("delete_incomplete", sweep, caltech_root, cache, methods=("coop",), n_trials="1")) == 0
    assert "deleted 1 incomplete job(s)" in capsys.readouterr().out and not folder.exists()


def test_incomplete_job_reruns_on_relaunch(caltech_root, tmp_path, capsys, monkeypatch):
    import dgclip.protocols.runner as runner

    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    argv = _argv("launch", sweep, caltech_root, cache, methods=("coop",), n_trials="1")
    real = runner.run_protocol

    def crash_after_record(cfg):  # dies after its record, before the job is marked done
        real(cfg)
        raise RuntimeError("node lost")

    monkeypatch.setattr(runner, "run_protocol", crash_after_record)
    assert main(argv) == 1
    monkeypatch.setattr(runner, "run_protocol", real)
    capsys.readouterr()
    assert main(argv) == 0
    assert "1/1 jobs done (1 launched now, 0 already done)" in capsys.readouterr().out
    (folder,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(read_records(folder / "results.jsonl")) == 1 and not (folder / "error.txt").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--test-domains", "caltech101"], "--test-domains"),
    (["--n-hparams", "2"], "--n-hparams"),
    (["--train-domains", "a"], "--train-domains"),
    (["--holdout-fraction", "0.3"], "--holdout-fraction"),
    (["--steps", "5"], "--steps"),
    (["--preset", "paper"], "--preset"),
])
def test_flags_that_do_not_apply_to_a_suite_protocol_are_refused(extra, flag, caltech_root, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(_argv("launch", sweep, caltech_root, tmp_path / "c", *extra)) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: does not apply to --protocol base2new" in err
    assert not sweep.exists()  # refused before anything was written


def test_suite_flags_are_refused_in_a_leave_one_domain_out_sweep(tmp_path, capsys):
    assert main(["sweep", "list", "--sweep-dir", str(tmp_path), "--methods", "coop", "--datasets", "pacs",
                 "--shots", "4"]) == 2
    assert "argument --shots: applies to the CoOp-suite protocols" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, why", [("pacs", "is not one"), ("imagenet_a", "is test-only")])
def test_datasets_outside_the_suite_are_refused_before_any_job(dataset, why, tmp_path, capsys):
    assert main(["sweep", "launch", "--sweep-dir", str(tmp_path / "s"), "--protocol", "base2new", "--methods", "coop",
                 "--datasets", dataset, "--root", str(tmp_path), *TINY]) == 2
    assert why in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_suite_job_runs_in_a_multi_gpu_child(caltech_root, tmp_path):
    """The multi_gpu launcher's subprocess (`python -m dgclip.sweep JOB.json`) runs a suite job."""
    import argparse

    from dgclip.commands.sweep import _suite_jobs
    from dgclip.protocols.sweep import run_suite_job
    from dgclip.sweep import launch

    args = argparse.Namespace(
        sweep_dir=str(tmp_path / "sweep"), methods=["zero-shot"], datasets=["caltech101"], n_trials=1,
        protocol="base2new", shots=2, epochs=None, targets=None, root=str(caltech_root), backbone="tiny-digits",
        pretrained="none", cache_dir=str(tmp_path / "c"), device="cpu", precision="auto", no_progress=True, workers=0,
        hparams=None)
    jobs = _suite_jobs(args)
    assert launch(jobs, "multi_gpu", run=run_suite_job, gpus=["0"], poll_s=0.2) == {jobs[0].key: "done"}
    rec = read_records(jobs[0].folder / "results.jsonl")[-1]
    assert rec["method"] == "zero-shot" and rec["seed"] == 1 and rec["epochs"] == 0
    assert rec["hparams"]["template"] == "a photo of a {}."  # CoOp's zero-shot template for Caltech101


def test_tiny_gopro_base2new_reproduction(caltech_root, tmp_path, capsys):
    """`dgclip reproduce gopro-base2new` restricted to one dataset, method and seed, offline."""
    sweep = tmp_path / "sweep"
    rc = main(["reproduce", "gopro-base2new", "--datasets", "caltech101", "--methods", "gopro", "--n-trials", "1",
               "--epochs", "1", "--root", str(caltech_root), "--sweep-dir", str(sweep),
               "--cache-dir", str(tmp_path / "cache"), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "--protocol base2new --shots 16" in out and "--preset" not in out.split("[reproduce] dgclip")[1]
    (rec,) = [read_records(f)[-1] for f in sweep.rglob("results.jsonl")]
    assert (rec["method"], rec["dataset"], rec["protocol"], rec["seed"]) == ("gopro", "caltech101", "base2new", 1)
    assert rec["shots"] == 16 and rec["n_train_images"] == 4 * 4  # 4 train images per class: all kept
    assert rec["hparams"]["n_ctx"] == 4 and rec["sources"]["n_ctx"].startswith("released: mainaksingha01/GOPro")
    assert main(["results", str(sweep), "--paper", "gopro-base2new"]) == 0
    text = capsys.readouterr().out
    assert "gopro k=16" in text and "caltech101:hm" in text and "caveat (GOPro, paper)" in text


def test_cross_dataset_reproduction_passes_the_targets(tmp_path, capsys):
    from dgclip.reproduce import TABLES, sweep_argv

    g = TABLES["gopro-cross-dataset"].groups[0]
    argv = sweep_argv(TABLES["gopro-cross-dataset"], g, sweep_dir="s", methods=None, datasets=None, n_trials=None,
                      test_domains=None, passthrough=[])
    assert argv[argv.index("--targets") + 1:argv.index("--targets") + 11] == list(g.targets)
    assert "--test-domains" not in argv and "--preset" not in argv
    # and the sweep takes them: a cross-dataset grid on generated data, listed (nothing run)
    make_json_datasets(tmp_path)
    assert main(["sweep", "list", "--sweep-dir", str(tmp_path / "s"), "--protocol", "cross-dataset", "--methods",
                 "coop", "--datasets", "caltech101", "--targets", "dtd", "--n-trials", "1", "--root",
                 str(tmp_path), *TINY]) == 0
    assert "not launched  coop__caltech101__cross-dataset__k16__t0__s1__" in capsys.readouterr().out


def test_suite_job_through_submitit_local_executor(caltech_root, tmp_path, capsys):
    pytest.importorskip("submitit")
    argv = ["sweep", "launch", "--sweep-dir", str(tmp_path / "sweep"), "--protocol", "base2new", "--shots", "2",
            "--methods", "zero-shot", "--datasets", "caltech101", "--n-trials", "1", "--root", str(caltech_root),
            "--cache-dir", str(tmp_path / "c"), *TINY, "--launcher", "submitit", "--submitit-cluster", "local",
            "--submitit-options", json.dumps({"timeout_min": 10})]
    assert main(argv) == 0
    assert "1/1 jobs done (1 launched now, 0 already done)" in capsys.readouterr().out
    assert main(argv) == 0  # relaunch: nothing submitted
    assert "(0 launched now, 1 already done)" in capsys.readouterr().out


def test_reproduce_refuses_test_domains_for_a_suite_table(tmp_path, capsys):
    assert main(["reproduce", "gopro-base2new", "--test-domains", "sketch", "--dry-run", "--root", str(tmp_path)]) == 2
    assert "argument --test-domains: gopro-base2new runs a CoOp-suite protocol" in capsys.readouterr().err
