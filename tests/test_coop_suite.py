"""The CoOp few-shot suite on generated trees: layouts, class names, few-shot sampling, base/new."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coop_suite_trees import (IMAGENET_WNIDS, make_caltech101, make_fgvc_aircraft,  # noqa: E402
                              make_imagenet_family, make_json_datasets)

from dgclip.data.coop_suite import load_suite, verify_suite  # noqa: E402
from dgclip.data.coop_suite.items import Item  # noqa: E402
from dgclip.data.domainbed import DataError  # noqa: E402
from dgclip.data.fewshot import fewshot_split, generate_fewshot  # noqa: E402
from dgclip.protocols.base2new import harmonic_mean, split_labels, subsample_classes  # noqa: E402


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop_suite")
    names = make_json_datasets(root)
    names["fgvc_aircraft"] = make_fgvc_aircraft(root)
    make_imagenet_family(root)
    return root, names


def test_split_json_datasets_load_verbatim(suite_root):
    root, names = suite_root
    for ds in ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "sun397", "dtd",
               "eurosat", "ucf101"):
        data = load_suite(ds, root)
        assert data.classnames == names[ds], ds
        n = len(names[ds])
        assert (len(data.train), len(data.val), len(data.test)) == (4 * n, 2 * n, 3 * n), ds
        assert all(Path(it.impath).is_file() for it in data.train + data.val + data.test)
    assert load_suite("caltech101", root).classnames[:3] == ["face", "leopard", "motorbike"]
    assert load_suite("sun397", root).classnames == ["abbey", "outdoor apartment_building", "shop bakery"]
    assert load_suite("ucf101", root).classnames[0] == "Apply_Eye_Makeup"
    assert load_suite("eurosat", root).classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    # StanfordCars paths are relative to the dataset folder itself
    assert "/stanford_cars/cars_train/" in load_suite("stanford_cars", root).train[0].impath
    assert load_suite("dtd", root).template == "{} texture."


def test_fgvc_aircraft_and_imagenet_family(suite_root):
    root, names = suite_root
    air = load_suite("fgvc_aircraft", root)
    assert air.classnames == names["fgvc_aircraft"]
    assert (len(air.train), len(air.val), len(air.test)) == (9, 3, 6)
    assert air.train[0].impath.endswith("images/1000000.jpg")
    inet = load_suite("imagenet", root)
    wnids = sorted(IMAGENET_WNIDS)
    assert inet.classnames == [IMAGENET_WNIDS[w] for w in wnids]  # labels by sorted folder
    assert inet.val == inet.test and len(inet.train) == 12
    v2 = load_suite("imagenetv2", root)
    assert v2.classnames == list(IMAGENET_WNIDS.values()) and v2.test_only and len(v2.test) == 8
    a = load_suite("imagenet_a", root)  # a 2-way problem over its own sorted wnids, README dropped
    assert a.classnames == [IMAGENET_WNIDS[w] for w in sorted(wnids[1:3])]
    r = load_suite("imagenet_r", root)
    assert r.classnames == [IMAGENET_WNIDS[w] for w in sorted(wnids[::2])]
    assert len(load_suite("imagenet_sketch", root).classnames) == 4


def test_missing_split_file_and_image_are_named(tmp_path):
    make_caltech101(tmp_path)
    split = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    victim = json.loads(split.read_text())["test"][0][0]
    (tmp_path / "caltech-101" / "101_ObjectCategories" / victim).unlink()
    with pytest.raises(DataError, match=victim.split("/")[-1]):
        load_suite("caltech101", tmp_path)
    reports = {r["dataset"]: r for r in verify_suite(tmp_path)}
    assert reports["caltech101"]["found"] and victim.split("/")[-1] in reports["caltech101"]["problems"][0]
    split.unlink()
    with pytest.raises(DataError, match="split_zhou_Caltech101.json"):
        load_suite("caltech101", tmp_path)
    assert not reports["imagenet"]["found"]


def _dassl_reference(items, k, seed):
    """Dassl's generate_fewshot_dataset with the global `random` seeded as CoOp's train.py does."""
    from collections import defaultdict

    random.seed(seed)
    tracker = defaultdict(list)
    for it in items:
        tracker[it.label].append(it)
    out = []
    for _, group in tracker.items():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


def _items(n_classes=5, per=(7, 3, 1, 12, 2)):
    items = []
    for c in range(n_classes):
        items += [Item(f"/x/{c}/{i}.jpg", c, f"c{c}") for i in range(per[c % len(per)])]
    random.Random(0).shuffle(items)  # first-seen label order is not label order
    return items


def test_fewshot_matches_dassl_and_keeps_small_classes():
    items = _items()
    for k, seed in ((1, 1), (4, 2), (16, 3)):
        ours = generate_fewshot(items, k, random.Random(seed))
        assert ours == _dassl_reference(items, k, seed)
        counts = {}
        for it in ours:
            counts[it.label] = counts.get(it.label, 0) + 1
        full = {c: sum(1 for it in items if it.label == c) for c in counts}
        assert counts == {c: min(k, full[c]) for c in counts}
        assert len(set(ours)) == len(ours)  # without replacement


def test_fewshot_identical_across_processes_and_cached_as_json(tmp_path):
    data_dir = tmp_path / "ds"
    train = [Item(str(data_dir / f"{c}/{i}.jpg"), c, f"c{c}") for c in range(6) for i in range(9)]
    val = [Item(str(data_dir / f"{c}/v{i}.jpg"), c, f"c{c}") for c in range(6) for i in range(5)]
    first = fewshot_split("toy", train, val, 4, 2, base_dir=data_dir, cache_dir=tmp_path / "c1")
    cache = Path(first["cache"])
    doc = json.loads(cache.read_text())  # JSON, paths relative to the dataset folder
    assert doc["shots"] == 4 and not doc["train"][0][0].startswith("/")
    assert len(first["val"]) == 6 * 4  # min(k, 4) per class
    again = fewshot_split("toy", train, val, 4, 2, base_dir=data_dir, cache_dir=tmp_path / "c1")
    assert again["train"] == first["train"] and again["val"] == first["val"]
    code = ("import json,sys,random;from pathlib import Path;from dgclip.data.coop_suite.items import Item;"
            "from dgclip.data.fewshot import fewshot_split;d=Path(sys.argv[1]);"
            "tr=[Item(str(d/f'{c}/{i}.jpg'),c,f'c{c}') for c in range(6) for i in range(9)];"
            "va=[Item(str(d/f'{c}/v{i}.jpg'),c,f'c{c}') for c in range(6) for i in range(5)];"
            "random.seed(123);"  # the global stream must not matter
            "o=fewshot_split('toy',tr,va,4,2,base_dir=d,cache_dir=Path(sys.argv[2]));"
            "print(json.dumps([list(x) for x in o['train']+o['val']]))")
    env = {"PYTHONHASHSEED": "7", "PYTHONPATH": str(Path(__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(data_dir), str(tmp_path / "c2")], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert json.loads(out) == [list(x) for x in first["train"] + first["val"]]
    # the same split under another folder reuses the cache (paths are relative to the dataset folder)
    moved = tmp_path / "moved"
    mv = fewshot_split("toy", [it._replace(impath=it.impath.replace(str(data_dir), str(moved))) for it in train],
                       [it._replace(impath=it.impath.replace(str(data_dir), str(moved))) for it in val], 4, 2,
                       base_dir=moved, cache_dir=tmp_path / "c1")
    assert [it.impath for it in mv["train"]] == [it.impath.replace(str(data_dir), str(moved)) for it in first["train"]]
    # a cache drawn from another split is refused
    with pytest.raises(DataError, match="fingerprint"):
        fewshot_split("toy", train[:-1], val, 4, 2, base_dir=data_dir, cache_dir=tmp_path / "c1")


@pytest.mark.parametrize("n,base", [(100, 50), (101, 51), (47, 24), (10, 5), (1, 1)])
def test_base_new_halves_ceil(n, base):
    labels = list(range(n))
    random.Random(n).shuffle(labels)
    b, nw = split_labels(labels)
    assert b == list(range(base)) and nw == list(range(base, n))
    assert len(b) == math.ceil(n / 2)


def test_subsample_classes_relabels_from_first_list():
    train = [Item(f"t{c}", c, f"n{c}") for c in (4, 0, 2, 6, 8)]  # labels present: 0 2 4 6 8
    test = [Item(f"s{c}", c, f"n{c}") for c in range(9)]
    base_train, base_test = subsample_classes(train, test, subsample="base")
    assert sorted((it.label, it.classname) for it in base_train) == [(0, "n0"), (1, "n2"), (2, "n4")]
    assert [(it.label, it.classname) for it in base_test] == [(0, "n0"), (1, "n2"), (2, "n4")]
    _, new_test = subsample_classes(train, test, subsample="new")
    assert [(it.label, it.classname) for it in new_test] == [(0, "n6"), (1, "n8")]
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    with pytest.raises(ValueError):
        subsample_classes(train, subsample="half")


def test_dassl_epoch_schedule():
    import torch

    from dgclip.protocols.schedule import dassl_epoch_lr, dassl_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.002)
    sched = dassl_scheduler(opt, steps_per_epoch=3, max_epoch=4, warmup_epochs=1, warmup_lr=1e-5)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = seen[::3]
    assert all(seen[i] == seen[i - i % 3] for i in range(12))  # constant within an epoch
    # epoch 0 at the warm-up lr, then cosine over epochs from the base lr (Dassl, WARMUP_RECOUNT)
    expected = [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 4)) for e in (1, 2, 3)]
    assert per_epoch == pytest.approx(expected)
    assert dassl_epoch_lr(1, 0.002, 4) == pytest.approx(0.002)


def test_dgclip_datasets_lists_the_suite(tmp_path, capsys):
    from dgclip.cli import main

    make_caltech101(tmp_path)
    make_fgvc_aircraft(tmp_path)
    (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "caltech101       OK: 7 classes, train 28, val 14, test 21" in out
    assert "images_variant_val.txt" in out and "imagenet_r       not found" in out


def test_coop_suite_presets_are_sourced_and_known_to_the_methods():
    from dgclip.methods import get_method
    from dgclip.presets.coop_suite import PRESETS, RUN_SETTINGS, TRAINABLE_DATASETS
    from dgclip.provenance import Sourced

    for method in ("coop", "cocoop", "gopro"):
        known = set(get_method(method).all_defaults())
        for ds in TRAINABLE_DATASETS:
            preset = PRESETS[(method, ds)]
            assert all(isinstance(v, Sourced) for v in preset.values())
            # every value is a run setting or a hyper-parameter of the method (none silently dropped)
            assert set(preset) - set(RUN_SETTINGS) <= known, (method, sorted(set(preset) - set(RUN_SETTINGS) - known))
    assert PRESETS[("coop", "imagenet")]["epochs"].value == 50
    assert PRESETS[("coop", "dtd")]["epochs"].value == 200 and PRESETS[("coop", "dtd")]["n_ctx"].value == 16
    assert PRESETS[("cocoop", "dtd")]["batch_size"].value == 1 and PRESETS[("cocoop", "dtd")]["epochs"].value == 10
    g = PRESETS[("gopro", "eurosat")]
    assert (g["batch_size"].value, g["epochs"].value, g["lr"].value, g["weight_decay"].value) == (4, 50, 0.002, 5e-4)
    assert g["ctx_init"].value == "a photo of a" and g["n_ctx"].value == 4


def test_published_tables_are_consistent():
    from dgclip.protocols.report import load_published

    b2n = load_published("gopro-base2new")
    for method, row in b2n["rows"].items():
        assert set(row) == set(b2n["columns"])
        for col in b2n["columns"]:
            if col.endswith(":hm") and not (method == "CoCoOp" and col.startswith(("oxford_flowers", "average"))):
                ds = col[:-3]
                b, n = row[f"{ds}:base"], row[f"{ds}:new"]
                assert abs(2 * b * n / (b + n) - row[col]) < 0.015, (method, col)
    cd = load_published("gopro-cross-dataset")
    for method, row in cd["rows"].items():
        targets = [c for c in cd["columns"] if c not in ("imagenet", "average")]
        assert len(targets) == 10 and abs(sum(row[t] for t in targets) / 10 - row["average"]) < 0.015, method
    assert "oracle" in b2n["caveats"]["GOPro"] and "oracle" in cd["caveats"]["GOPro"]
    assert load_published("gopro-imagenet-shift")["rows"]["GOPro"]["imagenet_r"] == 78.02


def test_coop_base2new_runs_the_ctxv1_config():
    """CoOp's base-to-new rows come from the ctxv1 configs ("a photo of a", 4 vectors); its few-shot
    runs keep the 16 randomly initialised vectors."""
    from dgclip.methods import get_method
    from dgclip.protocols.runner import ProtocolConfig, resolve_settings

    coop = get_method("coop")
    run, hp, src = resolve_settings(ProtocolConfig("coop", "caltech101", "/nonexistent", protocol="base2new"), coop)
    assert (hp["ctx_init"], hp["n_ctx"], run["epochs"]) == ("a photo of a", 4, 200)
    assert "base2new_train.sh" in src["ctx_init"]
    run, hp, _ = resolve_settings(ProtocolConfig("coop", "imagenet", "/nonexistent", protocol="base2new"), coop)
    assert (hp["ctx_init"], run["epochs"]) == ("a photo of a", 50)
    run, hp, _ = resolve_settings(ProtocolConfig("coop", "caltech101", "/nonexistent", protocol="few-shot"), coop)
    assert (hp["ctx_init"], hp["n_ctx"], run["epochs"]) == ("", 16, 200)
