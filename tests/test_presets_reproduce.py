"""Presets (resolution, sources, explicit flags win, the record keeps them), `dgclip reproduce`
(every table's dry run; a tiny dpl-table1 end to end on generated PACS-layout data, offline) and
the published-number files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dgclip.presets import RUN_KEYS, UnknownPresetError, all_presets, resolve
from dgclip.provenance import SOURCE_KINDS, Sourced
from dgclip.reproduce import TABLES
from tests.dgclip_fixtures import cache_dir  # noqa: F401

PUBLISHED = Path(__file__).resolve().parents[1] / "dgclip" / "published"


def test_dpl_paper_preset_values_and_sources():
    p = resolve("paper", "dpl", "pacs")
    want = {"steps": 5001, "eval_every": 300, "batch_size": 32, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.1,
            "weight_decay": 0.0, "backbone": "ViT-B-16", "pretrained": "openai", "holdout_fraction": 0.2}
    assert {k: p[k].value for k in want} == want
    assert resolve("paper", "dpl", "domainnet")["eval_every"].value == 1000
    assert "DomainBed" in p["steps"].source and "DPLCLIP" in p["momentum"].source


def test_every_preset_value_is_sourced_and_known_to_its_method():
    from dgclip.methods import get_method

    from dgclip.presets.coop_suite import RUN_SETTINGS as SUITE_RUN_SETTINGS

    table = all_presets()
    assert table, "no presets collected"
    for (method, dataset), values in table.items():
        keys = set(get_method(method).all_defaults())
        for name, v in values.items():
            assert isinstance(v, Sourced) and v.source.split(":")[0] in SOURCE_KINDS, (method, dataset, name)
            assert name in RUN_KEYS or name in SUITE_RUN_SETTINGS or name in keys, \
                f"{method} has no hyper-parameter {name!r}"


def test_embedded_is_the_toy_default_and_unknown_pairs_are_clear():
    emb = resolve("embedded", "dpl", "rotated-digits")
    assert emb["backbone"].value == "tiny-digits" and emb["steps"].value == 300
    with pytest.raises(UnknownPresetError, match="dpl has paper presets for: .*pacs"):
        resolve("paper", "dpl", "rotated-digits")
    with pytest.raises(UnknownPresetError, match="choose one of paper, embedded"):
        resolve("papers", "dpl", "pacs")


def test_missing_module_is_skipped_but_a_broken_one_is_not(monkeypatch):
    import importlib

    import dgclip.presets as presets

    monkeypatch.setattr(presets, "_CACHE", None)
    monkeypatch.setattr(presets, "_MODULES", ("domainbed", "not_written_yet"))
    assert ("dpl", "pacs") in presets.all_presets()
    real = importlib.import_module

    def broken(name, *a):
        if name.endswith(".domainbed"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real(name, *a)

    monkeypatch.setattr(presets, "_CACHE", None)
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        presets.all_presets()
    monkeypatch.setattr(presets, "_CACHE", None)


def _train_args(argv):
    from dgclip.cli import build_parser
    from dgclip.presets.apply import apply_to_train_args

    args = build_parser().parse_args(argv)
    apply_to_train_args(args, argv)
    return args


def test_explicit_flags_override_the_preset():
    args = _train_args(["train", "--method", "dpl", "--dataset", "pacs", "--preset", "paper", "--step", "7",
                        "--hparams", '{"lr": 0.5}'])
    hp = args.hparams  # the CLI parses --hparams into a dict
    assert args.steps == 7 and args.backbone == "ViT-B-16" and args.eval_every == 300
    assert hp["lr"] == 0.5 and hp["momentum"] == 0.1 and hp["batch_size"] == 32
    src = args.preset_record["sources"]
    assert src["steps"] == "command line: --steps" and src["lr"] == "command line: --hparams"
    assert src["momentum"].startswith("released: shogi880/DPLCLIP")
    # without --preset nothing changes
    plain = _train_args(["train", "--method", "dpl", "--dataset", "pacs"])
    assert plain.steps == 300 and plain.backbone == "tiny-digits" and not hasattr(plain, "preset_record")


def _write_pacs(root: Path, per_class: int = 5) -> None:
    from PIL import Image

    from dgclip.data.catalog import get_spec

    spec = get_spec("pacs")
    for di, d in enumerate(spec.domains):
        for ci, c in enumerate(spec.classes):
            folder = root / spec.dirname / d / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), ((ci * 36) % 256, (di * 60 + i * 9) % 256, 90)).save(folder / f"{i}.png")


def test_epochs_become_steps_from_the_data(tmp_path):
    from dgclip.presets.apply import epochs_to_steps

    _write_pacs(tmp_path)
    # 140 images, 4 domains: 20 epochs x 0.8 x 140 / (4 x 16) = 35
    steps, how = epochs_to_steps("pacs", tmp_path, 20, 16, 0.2)
    assert steps == math.ceil(20 * 0.8 * 140 / (4 * 16)) == 35 and "140 images" in how
    # open set: only the known classes count (6 of 7)
    steps, _ = epochs_to_steps("pacs-open-odgclip", tmp_path, 20, 16, 0.2)
    assert steps == math.ceil(20 * 0.8 * 120 / (4 * 16))


@pytest.mark.parametrize("table", sorted(TABLES))
def test_reproduce_dry_run_prints_the_grid(table, capsys, tmp_path):
    from dgclip.cli import main

    assert main(["reproduce", table, "--dry-run", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    t = TABLES[table]
    runs = 0
    for g in t.groups:
        for m in g.methods:
            for d in g.datasets:
                assert any(line.split()[:2] == [m, d] for line in out.splitlines()), (m, d)
    runs = sum(int(line.split()[4]) for line in out.splitlines()
               if len(line.split()) > 5 and line.split()[0] in {m for g in t.groups for m in g.methods}
               and line.split()[1] in {d for g in t.groups for d in g.datasets})
    assert f"runs: {runs};" in out and "GPU hours:" in out
    assert f"dgclip sweep launch --sweep-dir runs/reproduce/{table}" in out
    if t.groups[0].protocol != "loo":
        assert f"--protocol {t.groups[0].protocol} --shots 16" in out


def test_dpl_table1_dry_run_counts():
    from dgclip.reproduce import plan

    rows = plan(TABLES["dpl-table1"], root="/nonexistent")
    assert sum(r.runs for r in rows) == 2 * 4 * 4 * 3  # methods x datasets x held-out domains x trials
    assert {r.steps for r in rows if r.method == "dpl"} == {5001}
    with pytest.raises(ValueError, match="dpl-table1 has no method gopro"):
        plan(TABLES["dpl-table1"], methods=["gopro"])


def test_unknown_table(capsys):
    from dgclip.cli import main

    assert main(["reproduce", "dpl-tabel1", "--dry-run"]) == 2
    assert "did you mean dpl-table1" in capsys.readouterr().err


def test_tiny_dpl_table1_end_to_end(tmp_path, cache_dir, capsys):
    """dpl-table1 on generated PACS-layout data, one held-out domain, 2 steps, the tiny random CLIP."""
    from dgclip.cli import main
    from dgclip.results import load_results

    _write_pacs(tmp_path / "data")
    sweep = tmp_path / "sweep"
    rc = main(["reproduce", "dpl-table1", "--datasets", "pacs", "--test-domains", "sketch", "--n-trials", "1",
               "--steps", "2", "--eval-every", "1", "--backbone", "tiny-digits", "--pretrained", "none",
               "--root", str(tmp_path / "data"), "--sweep-dir", str(sweep), "--cache-dir", str(cache_dir),
               "--device", "cpu", "--no-progress", "--workers", "0"])
    assert rc == 0
    records = load_results(sweep)
    assert sorted(r["method"] for r in records) == ["dpl", "zero-shot"]
    dpl = next(r for r in records if r["method"] == "dpl")
    preset = dpl["config"]["preset"]
    assert preset["name"] == "paper" and dpl["config"]["steps"] == 2
    assert preset["sources"]["steps"] == "command line: --steps"
    assert preset["sources"]["backbone"] == "command line: --backbone"
    assert dpl["hparams"]["momentum"] == 0.1 and preset["sources"]["momentum"].startswith("released: shogi880")
    assert dpl["config"]["eval_every"] == 1 and dpl["backbone"]["name"] == "tiny-digits"
    zs = next(r for r in records if r["method"] == "zero-shot")
    assert zs["hparams"]["template"] == "a photo of a {}."
    capsys.readouterr()
    assert main(["results", str(sweep)]) == 0


@pytest.mark.parametrize("table", ["dpl-table1", "odgclip-open"])
def test_published_files_follow_the_schema(table):
    data = json.loads((PUBLISHED / f"{table}.json").read_text())
    assert data["table"] == table and data["title"] and data["source"] and data["metric"]
    cols = data["columns"]
    for row, vals in data["rows"].items():
        assert set(vals) <= set(cols), row
        assert all(isinstance(v, (int, float)) for v in vals.values())
    assert set(data["caveats"]) <= set(data["rows"])
    if table == "dpl-table1":
        # the Avg column is the mean of the four datasets: each printed value is rounded to 0.1
        # (+-0.05, so +-0.05 on their mean) and so is Avg itself: at most 0.1 apart
        for row, v in data["rows"].items():
            assert abs(sum(v[c] for c in cols[:4]) / 4 - v["Avg"]) <= 0.1 + 1e-9, row
    else:  # each Avg is the mean of the six datasets (values printed to 0.01: at most 0.01 apart)
        for row, v in data["rows"].items():
            for m in ("Acc", "H"):
                mean = sum(v[f"{d} {m}"] for d in ("PACS", "VLCS", "OfficeHome", "Digits-DG", "Multi-Dataset",
                                                   "Mini-DomainNet")) / 6
                assert abs(mean - v[f"Avg {m}"]) <= 0.011, (row, m)
        assert "label at test time" in data["caveats"]["ODG-CLIP"] and "oracle" in data["caveats"]["ODG-CLIP"]


def test_train_with_preset_records_values_and_sources(tmp_path, cache_dir):
    from dgclip.cli import main
    from dgclip.results import load_results

    _write_pacs(tmp_path / "data")
    out = tmp_path / "runs"
    assert main(["train", "--method", "zero-shot", "--dataset", "pacs", "--test-domain", "photo", "--preset", "paper",
                 "--backbone", "tiny-digits", "--pretrained", "none", "--root", str(tmp_path / "data"),
                 "--output-dir", str(out), "--cache-dir", str(cache_dir), "--device", "cpu", "--no-progress",
                 "--workers", "0"]) == 0
    (rec,) = load_results(out / "results.jsonl")
    preset = rec["config"]["preset"]
    assert preset["values"]["template"] == "a photo of a {}." and preset["sources"]["template"].startswith("paper: DPL")
    assert preset["values"]["backbone"] == "tiny-digits" and preset["sources"]["backbone"] == "command line: --backbone"
    assert rec["hparams"]["template"] == "a photo of a {}."


def test_sweep_job_keys_do_not_depend_on_the_preset_record():
    from dgclip.sweep import make_grid

    a = make_grid("s", ["dpl"], ["pacs"], ["photo"], 1, 1, steps=5, root="r")
    b = make_grid("s", ["dpl"], ["pacs"], ["photo"], 1, 1, steps=5, root="r",
                  preset={"name": "paper", "values": {"steps": 5}, "sources": {"steps": "command line: --steps"}})
    assert [j.key for j in a] == [j.key for j in b]
    c = make_grid("s", ["dpl"], ["pacs"], ["photo"], 1, 1, steps=6, root="r")
    assert a[0].key != c[0].key


def test_gpu_hours_come_only_from_measured_times(tmp_path, capsys):
    from dgclip.cli import main

    sweep = tmp_path / "sweep"
    args = ["reproduce", "dpl-table1", "--dry-run", "--datasets", "pacs", "--root", str(tmp_path),
            "--sweep-dir", str(sweep)]
    assert main(args) == 0
    assert "GPU hours: not estimated: no measured GPU per-step time for dpl/ViT-B-16" in capsys.readouterr().out
    # a finished CUDA run in the sweep folder is a measurement: 2 runs of 10 steps at 1.0 and 3.0 s/step
    job = sweep / "job"
    job.mkdir(parents=True)
    recs = [{"method": "dpl", "train_seconds": s, "config": {"device": "cuda:0", "steps": 10, "backbone": "ViT-B-16"}}
            for s in (10.0, 30.0)]
    recs.append({"method": "dpl", "train_seconds": 999.0, "config": {"device": "cpu", "steps": 10, "backbone": "ViT-B-16"}})
    (job / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(args) == 0
    out = capsys.readouterr().out
    hours = 2.0 * 5001 * 12 / 3600  # median 2 s/step x 5001 steps x 12 dpl runs; zero-shot trains 0 steps
    assert f"GPU hours: {hours:.1f}" in out and "median of 2 CUDA run(s)" in out
    assert main(args + ["--step-seconds", "0.5"]) == 0
    assert f"GPU hours: {0.5 * 5001 * 12 / 3600:.1f}" in capsys.readouterr().out


def test_dry_run_turns_epochs_into_steps_when_the_data_is_there(tmp_path):
    from dgclip.reproduce import plan

    _write_pacs(tmp_path)
    (row,) = plan(TABLES["odgclip-open"], root=tmp_path, methods=["seeclip"], datasets=["pacs-open-odgclip"])
    assert row.steps == math.ceil(20 * 0.8 * 120 / (4 * 16)) and row.steps_how.startswith("project: 20 epochs")
    (row,) = plan(TABLES["odgclip-open"], root=tmp_path / "absent", methods=["seeclip"], datasets=["pacs-open-odgclip"])
    assert row.steps is None and "computed from the data at launch" in row.steps_how


def test_a_suite_preset_is_refused_outside_its_protocol():
    from dgclip.presets.apply import resolve_run

    with pytest.raises(ValueError, match="--protocol base2new"):
        resolve_run("paper", "coop", "caltech101", explicit_run={}, explicit_hparams={})
    with pytest.raises(ValueError, match="--preset applies to leave-one-domain-out"):
        _train_args(["train", "--method", "coop", "--dataset", "caltech101", "--protocol", "base2new",
                     "--preset", "paper"])
