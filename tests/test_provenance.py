import pytest

from dgclip.provenance import Sourced, format_table, sources, values


def test_sourced_table_roundtrip():
    table = {"lr": Sourced(2e-3, "paper: CoOp IJCV 2022 §4.1"), "ctx": Sourced(16, "released: KaiyangZhou/CoOp/configs/trainers/CoOp/rn50.yaml:L20")}
    assert values(table) == {"lr": 2e-3, "ctx": 16}
    assert sources(table)["ctx"].startswith("released:")
    lines = format_table(table).splitlines()
    assert [line.split()[0] for line in lines] == ["ctx", "lr"]


def test_source_kind_is_checked():
    with pytest.raises(ValueError, match="must start with"):
        Sourced(1, "somewhere")
