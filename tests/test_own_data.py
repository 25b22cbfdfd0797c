"""A researcher's own data: a DomainBed-layout folder by path through train, sweep, results and
eval; an open-set split file; images checked before the first step; resume refused on other data."""
import json
from pathlib import Path

import pytest

from dgclip.cli import main
from dgclip.engine import read_records
from tests.own_data_fixtures import CLASSES, COOP, DOMAINS, TINY, corrupt, make_tree


@pytest.fixture
def own(tmp_path):
    return make_tree(tmp_path / "MyDG")


def _train(own, out, cache, *extra, method="coop", steps="2"):
    return main(["train", "--method", method, "--dataset", str(own), "--test-domain", "night", *TINY,
                 "--steps", steps, "--eval-every", "2", "--hparams", COOP, "--output-dir", str(out),
                 "--cache-dir", str(cache), *extra])


def test_own_folder_by_path_through_train_sweep_and_results(own, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _train(own, tmp_path / "runs", cache) == 0
    rec = read_records(tmp_path / "runs" / "results.jsonl")[-1]
    assert rec["dataset"] == "MyDG" and rec["test_domain"] == "night"
    assert rec["data"]["domains"] == list(DOMAINS) and rec["data"]["classes"] == list(CLASSES)
    assert rec["protocol"]["sources"] == ["day", "fog"] and rec["data"]["n_images"] == 45
    assert main(["results", str(tmp_path / "runs")]) == 0
    assert "| coop" in capsys.readouterr().out
    sweep = tmp_path / "sweep"
    assert main(["sweep", "launch", "--sweep-dir", str(sweep), "--methods", "zero-shot", "coop", "--datasets", str(own),
                 "--test-domains", "fog", *TINY, "--steps", "2", "--eval-every", "2", "--cache-dir", str(cache),
                 "--hparams", json.dumps({"coop": json.loads(COOP)})]) == 0
    capsys.readouterr()
    assert main(["results", str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "MyDG" in table and "| coop" in table and "| zero-shot" in table


def test_own_open_set_split_file(own, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"dataset": "MyDG", "sources": ["cat", "dog"], "target_known": ["cat"],
                                 "target_unknown": ["fox"], "note": "fox never seen"}))
    assert main(["train", "--method", "zero-shot", "--dataset", str(split), "--test-domain", "night", *TINY,
                 "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]) == 0
    rec = read_records(tmp_path / "runs" / "results.jsonl")[-1]
    assert rec["dataset"] == "MyDG-open-split"
    assert rec["protocol"]["target_unknown"] == ["fox"] and rec["protocol"]["target_known"] == ["cat"]
    assert rec["protocol"]["split_note"] == "fox never seen" and "h_score" in rec


@pytest.mark.parametrize("content,message", [
    ({"dataset": "MyDG", "sources": ["cat"], "target_known": ["cat"], "target_unknown": ["wolf"]}, "'target_unknown' names class(es) ['wolf']"),
    ({"dataset": "MyDG", "sources": ["cat"], "target_known": ["dog"], "target_unknown": ["fox"]}, "are in no source's list"),
    ({"dataset": "MyDG", "sources": ["cat", "fox"], "target_known": ["cat"], "target_unknown": ["fox"]}, "both a source class"),
    ({"dataset": "MyDG", "sources": {"dusk": ["cat"]}, "target_known": ["cat"], "target_unknown": ["fox"]}, "names domain(s) ['dusk']"),
    ({"dataset": "MyDG", "sources": ["cat"], "target_known": ["cat"]}, "missing field 'target_unknown'"),
])
def test_bad_split_files_are_refused_with_the_file_and_field(own, tmp_path, content, message, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps(content))
    assert main(["train", "--method", "zero-shot", "--dataset", str(split), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(split) in err and message in err, err


def test_datasets_lists_what_it_does_not_recognise_and_names_unreadable_images(own, tmp_path, capsys):
    root = own.parent
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("x")
    (root / "flat").mkdir()
    make_tree(root / "flat", domains=("only",))
    assert main(["datasets", "--root", str(root), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"use it with --dataset {own}" in out
    assert "notes            not recognised: 0 domain folder(s)" in out
    assert "flat             not recognised: 1 domain folder(s)" in out
    bad = corrupt(own / "fog" / "dog" / "3.png")
    assert main(["datasets", "--root", str(root), "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "1 unreadable image(s)" in out and str(bad) in out


def test_a_corrupt_image_is_refused_before_the_first_step_and_skipped_with_the_flag(own, tmp_path, capsys,
                                                                                      monkeypatch):
    from dgclip.methods.coop import CoOp

    bad = corrupt(own / "day" / "cat" / "1.png")

    def never(*_a, **_k):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(CoOp, "update", never)
    assert _train(own, tmp_path / "runs", tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and str(bad) in err and "--skip-unreadable" in err
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    assert _train(own, tmp_path / "runs", tmp_path / "cache", "--skip-unreadable") == 0
    rec = read_records(tmp_path / "runs" / "results.jsonl")[-1]
    assert rec["data"]["unreadable_skipped"] == [str(bad)] and str(bad) in capsys.readouterr().err
    assert rec["protocol"]["n_train"] + sum(rec["protocol"]["n_val"].values()) == 29  # 30 source images - 1


def test_the_image_check_is_cached_by_fingerprint(own, tmp_path, monkeypatch):
    from dgclip.data import verify

    paths = sorted(str(p) for p in own.rglob("*.png"))
    assert verify.find_unreadable(paths, cache_dir=tmp_path) == []
    monkeypatch.setattr(verify, "check_image", lambda p: pytest.fail("decoded again despite the cache"))
    assert verify.find_unreadable(paths, cache_dir=tmp_path) == []
    corrupt(Path(paths[0]))  # size and mtime change: a new fingerprint, checked again
    monkeypatch.undo()
    assert [p for p, _ in verify.find_unreadable(paths, cache_dir=tmp_path)] == [paths[0]]


def test_resume_is_refused_after_the_data_changed(own, tmp_path, capsys):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    assert _train(own, out, cache) == 0
    assert _train(own, out, cache, "--resume") == 0  # same data: the finished record is reused
    assert len(read_records(out / "results.jsonl")) == 1
    (own / "night" / "fox" / "0.png").unlink()  # an image removed from the held-out domain
    capsys.readouterr()
    assert _train(own, out, cache, "--resume") == 2
    assert "the data changed" in capsys.readouterr().err
    (out / "results.jsonl").unlink()  # the checkpoint alone is refused the same way
    assert _train(own, out, cache, "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "the data changed" in err


def test_eval_scores_a_checkpoint_on_another_dataset_with_the_training_classes(own, tmp_path, capsys):
    out = tmp_path / "runs"
    assert _train(own, out, tmp_path / "cache") == 0
    other = make_tree(tmp_path / "Other", domains=("rain", "snow"), seed=1)
    ckpt = next((out / "checkpoints").iterdir())
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", str(other), "--test-domain", "snow",
                 "--output-dir", str(tmp_path / "ev"), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]) == 0
    rec = read_records(tmp_path / "ev" / "results.jsonl")[-1]
    assert rec["dataset"] == "Other" and rec["test_domain"] == "snow" and rec["n_test"] == 15
    assert rec["trained_on"]["dataset"] == str(own) and 0.0 <= rec["test_acc"] <= 1.0
    assert main(["results", str(tmp_path / "ev")]) == 0
    wrong = make_tree(tmp_path / "Wrong", domains=("a", "b"), classes=("cat", "owl"))
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", str(wrong), "--workers", "0"]) == 2
    assert "['owl'] were not among the checkpoint's training classes" in capsys.readouterr().err


def test_sweep_refuses_a_done_job_after_the_data_changed(own, tmp_path, capsys):
    argv = ["sweep", "launch", "--sweep-dir", str(tmp_path / "sweep"), "--methods", "zero-shot", "--datasets", str(own),
            "--test-domains", "fog", *TINY, "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged: the done job is kept
    (own / "day" / "cat" / "0.png").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    assert "is done on other data" in capsys.readouterr().err


def test_a_yaml_split_file_where_pyyaml_is_installed(own, tmp_path):
    pytest.importorskip("yaml")
    from dgclip.data.catalog import get_spec

    split = tmp_path / "split.yaml"
    split.write_text(f"dataset: {own}\nsources:\n  day: [cat]\n  fog: [cat, dog]\ntarget_known: [cat]\n"
                     "target_unknown: [fox]\n")
    spec = get_spec(str(split))
    assert spec.open_set.known == ("cat", "dog") and spec.open_set.unknown == ("fox",)
    assert spec.open_set.source_classes(["day", "fog"]) == {"day": ("cat",), "fog": ("cat", "dog")}
