"""`dgclip train --protocol base2new` end to end (CoOp, CoCoOp, GOPro) on the embedded default and a
generated Caltech101-layout tree; `dgclip results --paper`; the base-to-new quickstart table; the
other protocols on a generated ImageNet family. Tiny sizes: random-weight tiny CLIP, 1 epoch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coop_suite_trees import make_caltech101, make_imagenet_family, make_json_datasets  # noqa: E402

from dgclip.cli import main  # noqa: E402
from dgclip.engine import read_records  # noqa: E402

TINY = ["--backbone", "tiny-digits", "--pretrained", "none", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def caltech_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("caltech")
    make_caltech101(root)
    return root


@pytest.mark.parametrize("method", ["coop", "cocoop", "gopro"])
def test_base2new_cli_on_caltech_layout(method, caltech_root, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", "--protocol", "base2new", "--method", method, "--dataset", "caltech101",
               "--root", str(caltech_root), "--shots", "2", "--epochs", "1", "--seeds", "1",
               "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY])
    assert rc == 0
    rec = read_records(out / "results.jsonl")[-1]
    assert rec["protocol"] == "base2new" and rec["shots"] == 2 and rec["seed"] == 1
    # 7 classes: ceil(7/2) = 4 base (sorted labels 0-3), 3 new
    assert rec["base_classes"] == ["face", "leopard", "motorbike", "accordion"]
    assert rec["new_classes"] == ["airplane", "anchor", "ant"]
    assert rec["n_train_images"] == 4 * 2 and rec["n_test_images"] == 4 * 3 and rec["n_new_test_images"] == 3 * 3
    for k in ("base_acc", "new_acc", "hm"):
        assert 0.0 <= rec[k] <= 1.0
    b, n = rec["base_acc"], rec["new_acc"]
    assert rec["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert rec["selection"] == "last epoch" and rec["selected_epoch"] == rec["epochs"] == 1
    assert rec["steps"] == rec["steps_per_epoch"] >= 1
    assert rec["loss_first"] is not None
    assert rec["train_transform"].startswith("dassl" if method in ("coop", "cocoop") else "gopro's own")
    printed = capsys.readouterr().out
    assert "base=" in printed and "hm=" in printed


def test_base2new_embedded_default_and_paper_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    common = ["--dataset", "rotated-digits", "--root", str(tmp_path / "data"), "--shots", "2", "--epochs", "1",
              "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY]
    for method in ("coop", "cocoop", "gopro"):
        assert main(["train", "--protocol", "base2new", "--method", method, "--seeds", "1", *common]) == 0
    recs = read_records(out / "results.jsonl")
    assert [r["method"] for r in recs] == ["coop", "cocoop", "gopro"]
    for r in recs:  # digits 0-4 base, 5-9 new
        assert r["base_classes"] == ["zero", "one", "two", "three", "four"]
        assert r["new_classes"] == ["five", "six", "seven", "eight", "nine"]
        assert r["n_train_images"] == 5 * 2 and {"base_acc", "new_acc", "hm"} <= set(r)
    capsys.readouterr()
    assert main(["results", str(out), "--paper"]) == 0
    text = capsys.readouterr().out
    assert "base-to-new" in text and "rotated-digits" in text
    assert "Base-to-new generalisation" in text and "source: GOPro" in text
    assert main(["results", str(out), "--paper", "no-such-table"]) == 2


def test_oracle_selection_is_named(caltech_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--protocol", "base2new", "--method", "coop", "--dataset", "caltech101",
                 "--root", str(caltech_root), "--shots", "2", "--epochs", "2", "--seeds", "1",
                 "--selection", "oracle-best-test-epoch", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *TINY]) == 0
    rec = read_records(out / "results.jsonl")[-1]
    assert rec["selection"].startswith("oracle") and "test_acc" in rec["history"][0]
    capsys.readouterr()
    assert main(["results", str(out), "--paper", "gopro-base2new"]) == 0
    text = capsys.readouterr().out
    assert "coop (oracle)" in text and "caveat (ours)" in text
    assert "caltech101:hm" in text and "93.73" in text  # CoOp's published Caltech101 HM beside ours


def test_results_paper_difference(tmp_path, capsys):
    """The difference column is ours - paper, in points, with the published row's caveat."""
    from dgclip.engine import append_record

    for seed, (b, n) in enumerate([(0.99, 0.95), (0.97, 0.97)], start=1):
        append_record(tmp_path / "results.jsonl", {
            "protocol": "base2new", "method": "gopro", "dataset": "caltech101", "shots": 16, "seed": seed,
            "selection": "last epoch", "base_acc": b, "new_acc": n, "hm": 2 * b * n / (b + n)})
    assert main(["results", str(tmp_path), "--paper", "gopro-base2new"]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if "caltech101:base" in l and "gopro" in l)
    assert "98.00+-1.00" in line and "98.86" in line and "-0.86" in line
    assert "caveat (GOPro, paper): oracle selection" in text
    assert "average:" not in text  # one dataset is not the published 11-dataset average


def test_unknown_flags_for_protocols_are_errors(caltech_root, tmp_path, capsys):
    base = ["train", "--protocol", "base2new", "--method", "coop", "--dataset", "caltech101", "--root",
            str(caltech_root), "--epochs", "1", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"), *TINY]
    assert main(base + ["--shots", "0"]) == 2
    assert main(base + ["--shots", "2", "--selection", "oracle"]) == 2
    assert main(base + ["--shots", "2", "--targets", "dtd"]) == 2
    assert main(["train", "--protocol", "base2new", "--method", "coop", "--dataset", "imagenet_a", "--root",
                 str(tmp_path / "nothing")]) == 2
    assert "error" in capsys.readouterr().err


def test_cross_dataset_and_imagenet_shift(tmp_path):
    make_imagenet_family(tmp_path)
    make_json_datasets(tmp_path)
    out = tmp_path / "runs"
    for protocol, targets in (("imagenet-shift", None), ("cross-dataset", ["caltech101", "dtd"])):
        argv = ["train", "--protocol", protocol, "--method", "coop", "--dataset", "imagenet", "--root", str(tmp_path),
                "--shots", "2", "--epochs", "1", "--seeds", "1", "--output-dir", str(out),
                "--cache-dir", str(tmp_path / "cache"), *TINY]
        assert main(argv + (["--targets", *targets] if targets else [])) == 0
    recs = read_records(out / "results.jsonl")
    shift, cross = recs
    assert set(shift["target_acc"]) == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert shift["n_train_images"] == 4 * 2  # ImageNet: train few-shot only, val = test
    assert set(cross["target_acc"]) == {"caltech101", "dtd"}
    assert cross["target_avg"] == pytest.approx(sum(cross["target_acc"].values()) / 2)


def test_quickstart_base2new_table(tmp_path, capsys, monkeypatch):
    import argparse

    from dgclip.protocols import cli as pcli

    monkeypatch.setitem(pcli.QUICKSTART_BASE2NEW, "shots", 2)
    args = argparse.Namespace(root=str(tmp_path / "data"), seeds=[0], output_dir=str(tmp_path / "qs"),
                              cache_dir=str(tmp_path / "cache"), device="cpu", precision="auto", no_progress=True,
                              workers=0, epochs=1, backbone="tiny-digits", pretrained="none")
    recs = pcli.quickstart_base2new(args)
    assert {r["method"] for r in recs} == set(pcli.QUICKSTART_BASE2NEW["methods"])
    text = capsys.readouterr().out
    assert "base-to-new" in text and "HM" in text
    for m in pcli.QUICKSTART_BASE2NEW["methods"]:
        assert any(line.startswith("rotated-digits") and m in line for line in text.splitlines())


def test_same_run_with_any_worker_count(caltech_root, tmp_path):
    """Few-shot lists, batches and augmentations do not depend on the loader's worker count."""
    from dgclip.protocols.runner import ProtocolConfig, run_protocol

    recs = []
    for workers in (0, 2):
        recs.append(run_protocol(ProtocolConfig(
            method="gopro", dataset="caltech101", root=str(caltech_root), protocol="base2new", shots=3, seed=2,
            output_dir=str(tmp_path / f"w{workers}"), backbone="tiny-digits", pretrained="none",
            cache_dir=str(tmp_path / f"cache{workers}"), epochs=1, progress=False, workers=workers)))
    a, b = recs
    assert json.loads(Path(a["fewshot_cache"]).read_text())["train"] == \
        json.loads(Path(b["fewshot_cache"]).read_text())["train"]
    assert a["loss_first"] == b["loss_first"] and a["loss_last"] == b["loss_last"]
    assert (a["base_acc"], a["new_acc"]) == (b["base_acc"], b["new_acc"])


def test_few_shot_protocol_all_classes(caltech_root, tmp_path):
    out = tmp_path / "runs"
    assert main(["train", "--protocol", "few-shot", "--method", "coop", "--dataset", "caltech101", "--root",
                 str(caltech_root), "--shots", "3", "--epochs", "1", "--seeds", "4", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *TINY]) == 0
    rec = read_records(out / "results.jsonl")[-1]
    assert rec["protocol"] == "few-shot" and 0.0 <= rec["test_acc"] <= 1.0 and "hm" not in rec
    assert len(rec["base_classes"]) == 7 and rec["new_classes"] == []
    assert rec["n_train_images"] == 7 * 3 and rec["n_val_images"] == 7 * 2  # val: min(k, 4), 2 per class here
    assert rec["n_test_images"] == 7 * 3
