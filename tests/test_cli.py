"""The command line: help and argument errors without torch, every flag validated by name,
nothing accepted and ignored, optional dependencies named when missing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dgclip import cli, cli_flags

REPO = Path(__file__).resolve().parents[1]


def test_static_names_match_the_registries():
    from dgclip.data.catalog import list_datasets
    from dgclip.methods import _MODULES

    assert cli_flags.METHODS == tuple(_MODULES)
    assert cli_flags.DATASETS == tuple(list_datasets())
    from dgclip.data.coop_suite import SUITE_DATASETS
    from dgclip.protocols import PROTOCOLS

    assert cli_flags.SUITE_DATASETS == SUITE_DATASETS
    assert tuple(cli_flags.PROTOCOLS) == PROTOCOLS


def test_parser_and_argument_errors_import_no_torch():
    code = ("import sys\nimport dgclip.cli as c\nc.build_parser()\n"
            "try:\n    c.main(['train', '--method', 'coop', '--dataset', 'pacs', '--steps', '0'])\n"
            "except SystemExit as e:\n    assert e.code == 2, e.code\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]", out.stdout


def test_help_lists_methods_datasets_protocols_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in (*cli_flags.METHODS, *cli_flags.DATASETS, "loo", "DGCLIP_DATA", "DomainBed-layout folder"):
        assert name in text, name
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 300)" in text and "--skip-unreadable" in text


BASE = ["--method", "coop", "--dataset", "rotated-digits"]
SWEEP = ["sweep", "list", "--sweep-dir", "x", "--methods", "coop", "--datasets", "rotated-digits"]
BAD = [
    (["train", *BASE, "--steps", "0"], "--steps", ">= 1"),
    (["train", *BASE, "--steps", "-5"], "--steps", ">= 1"),
    (["train", *BASE, "--steps", "ten"], "--steps", "integer"),
    (["train", *BASE, "--eval-every", "0"], "--eval-every", ">= 1"),
    (["train", *BASE, "--hparams", "{lr:0.1}"], "--hparams", "not valid JSON"),
    (["train", *BASE, "--hparams", "[0.1]"], "--hparams", "JSON object"),
    (["train", *BASE, "--holdout-fraction", "1.5"], "--holdout-fraction", "(0.0, 1.0)"),
    (["train", *BASE, "--workers", "-1"], "--workers", ">= 0"),
    (["train", *BASE, "--seeds", "-1"], "--seeds", ">= 0"),
    (["train", *BASE, "--selection", "best"], "--selection", "invalid choice"),
    (["train", *BASE, "--feature-cache-budget-gb", "-1"], "--feature-cache-budget-gb", "[0.0, inf)"),
    ([*SWEEP, "--seeds", "1", "2"], "--seeds", "--n-trials"),
    ([*SWEEP, "--output-dir", "o"], "--output-dir", "--sweep-dir"),
    ([*SWEEP, "--selection", "oracle"], "--selection", "both DomainBed selections"),
    ([*SWEEP, "--hparams-seed", "3"], "--hparams-seed", "--n-hparams"),
    ([*SWEEP, "--resume"], "--resume", "always resumes"),
    ([*SWEEP, "--n-hparams", "0"], "--n-hparams", ">= 1"),
    ([*SWEEP, "--submitit-options", "{slurm}"], "--submitit-options", "not valid JSON"),
    (["quickstart", "--backbone", "ViT-B-16"], "--backbone", "embedded tiny-digits"),
    (["quickstart", "--pretrained", "openai"], "--pretrained", "embedded tiny-digits"),
    (["quickstart", "--eval-every", "10"], "--eval-every", "dgclip train"),
    (["pretrain", "--steps", "0"], "--steps", ">= 1"),
]


@pytest.mark.parametrize("argv,flag,why", BAD, ids=[" ".join(a[0][:1] + [a[1]]) + f"-{i}" for i, a in enumerate(BAD)])
def test_bad_arguments_are_refused_naming_the_flag(argv, flag, why, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and why in err, err


def test_results_metric_lists_the_valid_metrics(tmp_path, capsys):
    rec = {"dataset": "D", "method": "coop", "selection": "training-domain validation", "seed": 0,
           "test_domain": "a", "test_acc": 0.5, "val_acc": 0.4}
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    assert cli.main(["results", str(tmp_path), "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert "argument --metric" in err and "test_acc, val_acc" in err
    assert cli.main(["results", str(tmp_path), "--metric", "val_acc"]) == 0


def test_results_without_matplotlib_prints_the_table_and_how_to_get_the_chart(tmp_path, capsys, monkeypatch):
    rec = {"dataset": "D", "method": "coop", "selection": "training-domain validation", "seed": 0,
           "test_domain": "a", "test_acc": 0.5, "val_acc": 0.4}
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli.main(["results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "| coop" in out.out and (tmp_path / "results_test_acc.csv").exists()
    assert not (tmp_path / "results_test_acc.png").exists()
    assert "matplotlib is not installed" in out.err and "[dgclip]" in out.err


@pytest.mark.parametrize("module,extra", [("open_clip", "dgclip"), ("diffusers", "diffusion"), ("submitit", "slurm")])
def test_a_missing_optional_dependency_names_its_extra(module, extra, monkeypatch, capsys):
    import dgclip.commands.pretrain as verb

    def missing(_args):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(verb, "run", missing)
    assert cli.main(["pretrain"]) == 2
    err = capsys.readouterr().err
    assert repr(module) in err and f"[{extra}]" in err


@pytest.mark.parametrize("flag,value", [("--test-domain", "a"), ("--root", "r"), ("--output-dir", "o"),
                                        ("--workers", "2"), ("--device", "cpu")])
def test_eval_flags_that_need_a_dataset_are_refused_without_one(tmp_path, capsys, flag, value):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "c.pt"), flag, value]) == 2
    assert f"argument {flag}: only applies with --dataset" in capsys.readouterr().err


def test_quickstart_runs_its_fixed_settings_and_the_flags_it_takes(tmp_path, monkeypatch, capsys):
    from dgclip.commands import _training, train
    from dgclip.engine import append_record

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        rec = {"method": cfg.method, "dataset": cfg.dataset, "selection": "training-domain validation",
               "seed": cfg.seed, "test_domain": "+".join(cfg.test_domains), "test_acc": 0.5}
        append_record(tmp_path / "out" / "results.jsonl", rec)
        return rec

    monkeypatch.setattr(train, "run_training_verbose", fake_run)
    monkeypatch.setattr(_training, "ensure_pretrained", lambda args: None)
    from dgclip.protocols import cli as protocols_cli

    base2new = []  # the base-to-new part runs for real in tests/test_protocols_e2e.py
    monkeypatch.setattr(protocols_cli, "quickstart_base2new", base2new.append)
    assert cli.main(["quickstart", "--output-dir", str(tmp_path / "out"), "--seeds", "0", "--steps", "7",
                     "--root", str(tmp_path), "--device", "cpu"]) == 0
    assert {c.method for c in seen} == {"zero-shot", "coop", "cocoop", "dpl"} and len(seen) == 4 * 6
    assert {(c.backbone, c.pretrained, c.steps, c.eval_every, c.seed) for c in seen} == {("tiny-digits", "default", 7, 50, 0)}
    assert "| coop" in capsys.readouterr().out
    assert len(base2new) == 1 and base2new[0].seeds == [0]


def test_a_missing_dependency_behind_a_wrapping_error_is_named(monkeypatch, capsys):
    import dgclip.commands.pretrain as verb

    def wrapped(_args):
        try:
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        except ModuleNotFoundError as exc:
            raise ImportError("method 'seeclip' needs a missing dependency") from exc

    monkeypatch.setattr(verb, "run", wrapped)
    assert cli.main(["pretrain"]) == 2
    assert "[diffusion]" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--eval-every"])
def test_training_flags_are_refused_for_a_method_with_nothing_to_train(flag, capsys):
    from types import SimpleNamespace

    from dgclip.methods import get_method

    for name in cli_flags.UNTRAINED_METHODS:  # the static list is right: no optimizer, no steps
        probe = SimpleNamespace()
        get_method(name).configure_optimizers(probe, 10)
        assert probe.optimizer is None
    assert cli.main(["train", "--method", "zero-shot", "--dataset", "rotated-digits", f"{flag}=10"]) == 2
    assert f"argument {flag}: zero-shot has nothing to train" in capsys.readouterr().err
