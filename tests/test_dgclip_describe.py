"""`dgclip describe`: every hyper-parameter of every method with a value and a source."""
import pytest

from dgclip.cli import main
from dgclip.methods import get_method, list_methods


def test_describe_every_method_every_value_has_a_source(capsys):
    assert main(["describe"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        defaults = get_method(name).all_defaults()
        assert f"{name}: {len(defaults)} hyper-parameters" in out
        block = out.split(f"{name}: ")[1].split("\n\n")[0]
        rows = [l for l in block.splitlines()[1:] if not l.startswith("random search")]
        assert len(rows) == len(defaults)
        for row in rows:
            assert any(f"  {kind}:" in row for kind in ("paper", "released", "project")), row


def test_describe_dataset_shows_the_embedded_overrides(capsys):
    assert main(["describe", "--method", "coop", "--dataset", "rotated-digits"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("train_augment"))
    assert "'crop'" in line and "mirrored digit" in line
    assert main(["describe", "--method", "coop", "--dataset", "pacs"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("train_augment"))
    assert "'crop_flip'" in line and "Dassl" in line
    assert main(["describe", "--method", "nope"]) == 2


def test_records_carry_the_provenance():
    from dgclip.engine import _run_sources

    dpl = get_method("dpl")
    hp = dpl.hparams_for(0)
    src = _run_sources(dpl, hp, embedded=False)
    assert set(src) == set(hp) and src["loss_form"].startswith("released: shogi880/DPLCLIP")
    src = _run_sources(dpl, {**hp, "lr": 0.5}, embedded=False)
    assert src["lr"].startswith("project: set for this run")
