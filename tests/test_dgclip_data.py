import numpy as np
import pytest
from PIL import Image

from dgclip.data.catalog import DatasetSpec, OpenSetSpec, get_spec, list_datasets, UnknownDatasetError
from dgclip.data.domainbed import DataError, ImageDataset, load_image, scan, verify
from dgclip.data.splits import make_protocol, resolve_test_domains, split_in_out
from tests.dgclip_fixtures import data_root  # noqa: F401


def test_catalogue_lists():
    sizes = {"pacs": (4, 7), "vlcs": (4, 5), "officehome": (4, 65), "terraincognita": (4, 10),
             "domainnet": (6, 345), "digits-dg": (4, 10), "mini-domainnet": (4, 126), "rotated-digits": (6, 10)}
    for k, (d, c) in sizes.items():
        s = get_spec(k)
        assert (len(s.domains), len(s.classes)) == (d, c)
        assert list(s.classes) == sorted(s.classes) and len(set(s.classes)) == c
    oh = get_spec("officehome-open").open_set
    assert len(oh.known) == 54 and len(oh.unknown) == 11
    assert len(get_spec("mini-domainnet-open").open_set.known) == 90
    assert get_spec("pacs-open").open_set.unknown == ("person",)
    with pytest.raises(UnknownDatasetError, match="unknown dataset"):
        get_spec("imagenet-x")


def test_embedded_layout(data_root):
    spec = get_spec("rotated-digits")
    rec = scan(data_root, spec)
    assert len(rec) == 1080
    assert np.bincount(rec.domains).tolist() == [180] * 6
    rep = verify(data_root, spec)
    assert rep["found"] and not rep["problems"] and sum(rep["domains"].values()) == 1080
    img = load_image(rec.paths[0])
    assert img.size == (32, 32)


def test_split_in_out_deterministic_and_disjoint():
    a_in, a_out = split_in_out(100, 0.2, 7)
    b_in, b_out = split_in_out(100, 0.2, 7)
    assert (a_in == b_in).all() and (a_out == b_out).all()
    assert len(a_out) == 20 and not set(a_in) & set(a_out) and len(set(a_in) | set(a_out)) == 100
    c_in, _ = split_in_out(100, 0.2, 8)
    assert not (a_in == c_in).all()
    # DomainBed keeps the shuffled order: never sorted back into the class-by-class listing
    assert not (np.diff(a_in) > 0).all() and not (np.diff(a_out) > 0).all()


def test_leave_one_domain_out_protocol(data_root):
    spec = get_spec("rotated-digits")
    rec = scan(data_root, spec)
    assert resolve_test_domains(spec, "all") == [[d] for d in spec.domains]
    p = make_protocol(spec, rec, ["rot75"], trial_seed=0)
    assert p.source_domains == ["rot0", "rot15", "rot30", "rot45", "rot60"]
    assert set(p.val) == set(p.source_domains) and list(p.test) == ["rot75"] and not p.oracle_val
    assert len(p.train) == 5 * 144 and all(len(v) == 36 for v in p.val.values()) and len(p.test["rot75"]) == 144
    assert not set(p.train.paths) & {x for v in p.val.values() for x in v.paths}
    assert not set(p.train.paths) & set(p.test["rot75"].paths)
    # a domain splits the same way whatever its role
    q = make_protocol(spec, rec, ["rot0"], trial_seed=0)
    assert set(q.val["rot75"].paths) == set(make_protocol(spec, rec, ["rot0"], trial_seed=0).val["rot75"].paths)
    assert set(p.test["rot75"].paths) | set(q.val["rot75"].paths) == {x for x, d in zip(rec.paths, rec.domains) if d == 5}
    assert p.domain_map.tolist() == [0, 1, 2, 3, 4, -1]
    o = make_protocol(spec, rec, ["rot75"], trial_seed=0, oracle=True)
    assert len(o.oracle_val["rot75"]) == 36
    s = make_protocol(spec, rec, ["rot75"], train_domains=["rot0"])
    assert s.source_domains == ["rot0"] and len(s.train) == 144
    with pytest.raises(DataError, match="unknown"):
        make_protocol(spec, rec, ["rot90"])


def test_open_set_protocol(data_root):
    spec = get_spec("rotated-digits-open")
    rec = scan(data_root, spec)
    p = make_protocol(spec, rec, ["rot60"])
    assert p.classnames == list("012345") and p.open_set
    train_labels = p.label_map[p.train.labels]
    assert train_labels.max() < 6 and train_labels.min() >= 0  # sources never show unknowns
    test_labels = p.label_map[p.test["rot60"].labels]
    assert set(np.unique(test_labels)) == set(range(7))  # 6 known + unknown (=6)


# The published ODG-CLIP / SeeCLIP OfficeHome split (Art, Clipart, Product -> Real World), by name.
OH_TARGET_KNOWN = ["Alarm_Clock", "Bed", "Bike", "Candles", "Chair", "Desk_Lamp", "Drill", "Flipflops", "Flowers",
                   "Folder", "Laptop", "Marker", "Monitor", "Pencil", "Postit_Notes", "Printer"]
OH_UNKNOWN = ["Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can",
              "Webcam"]


def test_published_open_set_splits_by_name():
    from dgclip.data.catalog import OFFICEHOME_CLASSES, MINI_DOMAINNET_CLASSES

    oh = get_spec("officehome-open").open_set
    assert list(oh.target_known) == OH_TARGET_KNOWN and list(oh.unknown) == OH_UNKNOWN
    art, clipart, product = oh.source_patterns
    assert list(art) == list(OFFICEHOME_CLASSES[0:15] + OFFICEHOME_CLASSES[21:32])
    assert list(clipart) == list(OFFICEHOME_CLASSES[0:9] + OFFICEHOME_CLASSES[15:21] + OFFICEHOME_CLASSES[32:43])
    assert list(product) == list(OFFICEHOME_CLASSES[0:3] + OFFICEHOME_CLASSES[9:21] + OFFICEHOME_CLASSES[43:54])
    assert set(art) | set(clipart) | set(product) == set(oh.known) == set(OFFICEHOME_CLASSES[:54])
    medic = get_spec("officehome-open-medic").open_set
    assert medic.known[-1] == "Oven" and medic.unknown[0] == "Pan" and len(medic.unknown) == 25
    pacs = get_spec("pacs-open-odgclip").open_set
    assert pacs.source_patterns == (("guitar", "dog", "elephant"), ("horse", "dog", "giraffe"),
                                    ("house", "elephant", "giraffe")) and pacs.unknown == ("person",)
    assert get_spec("pacs-open").open_set.source_patterns is None  # SeeCLIP / MEDIC: homogeneous
    vlcs = get_spec("vlcs-open-odgclip").open_set
    assert vlcs.source_patterns == (("bird", "car"), ("car", "chair"), ("chair", "dog"))
    dg = get_spec("digits-dg-open-odgclip").open_set
    assert dg.source_patterns == (("0", "1", "2"), ("2", "3", "4"), ("4", "5", "6")) and dg.unknown == ("7", "8", "9")
    assert get_spec("digits-dg-open").open_set.unknown == ("6", "7", "8", "9")
    mini = get_spec("mini-domainnet-open").open_set
    want_tk = [MINI_DOMAINNET_CLASSES[i] for r in ((0, 4), (8, 17), (25, 34), (43, 47), (75, 79), (83, 87))
               for i in range(r[0], r[1] + 1)]
    assert list(mini.target_known) == want_tk and len(want_tk) == 40
    assert list(mini.unknown) == list(MINI_DOMAINNET_CLASSES[90:]) and len(mini.known) == 90


def test_odgclip_protocol_filters_sources_and_target(tmp_path):
    spec = get_spec("officehome-open")
    _tiny_tree(tmp_path, spec, n=1)
    records = scan(tmp_path, spec)
    prot = make_protocol(spec, records, ["Real World"], trial_seed=0, holdout_fraction=0.5)
    d = prot.describe()
    assert d["target_known"] == OH_TARGET_KNOWN and d["target_unknown"] == OH_UNKNOWN
    assert d["source_classes"]["Art"] == list(spec.open_set.source_patterns[0])
    train_classes = {dom: {spec.classes[c] for c, dd in zip(prot.train.labels, prot.train.domains)
                           if spec.domains[dd] == dom} for dom in ("Art", "Clipart", "Product")}
    for i, dom in enumerate(("Art", "Clipart", "Product")):
        assert train_classes[dom] <= set(spec.open_set.source_patterns[i])
    test_classes = {spec.classes[c] for c in prot.test["Real World"].labels}
    assert test_classes <= set(OH_TARGET_KNOWN) | set(OH_UNKNOWN) and set(OH_UNKNOWN) & test_classes
    # another target: the same pattern on the sources in DomainBed order
    prot = make_protocol(spec, records, ["Art"], trial_seed=0, holdout_fraction=0.5)
    assert prot.describe()["source_classes"]["Clipart"] == list(spec.open_set.source_patterns[0])
    with pytest.raises(DataError, match="3 sources by position"):
        make_protocol(spec, records, ["Art"], train_domains=["Clipart"])


def _tiny_tree(root, spec, n=2, corrupt=False, skip_domain=None, skip_class=None):
    for d in spec.domains:
        if d == skip_domain:
            continue
        for c in spec.classes:
            if c == skip_class:
                continue
            (root / spec.dirname / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / spec.dirname / d / c / f"{i}.png")
    if corrupt:
        (root / spec.dirname / spec.domains[0] / spec.classes[0] / "bad.jpg").write_bytes(b"not an image")


def test_verify_reports_problems(tmp_path):
    spec = get_spec("vlcs")
    _tiny_tree(tmp_path, spec, corrupt=True, skip_domain="SUN09", skip_class="dog")
    rep = verify(tmp_path, spec)
    text = "\n".join(rep["problems"])
    assert "missing domain 'SUN09'" in text and "dog" in text and "unreadable" in text
    rec = scan(tmp_path, spec, ["Caltech101"])
    bad = [i for i, p in enumerate(rec.paths) if p.endswith("bad.jpg")]
    with pytest.raises(DataError, match="corrupt or unreadable image"):
        ImageDataset(rec, lambda x: x)[bad[0]]
    with pytest.raises(DataError, match="domain folder .* is missing"):
        scan(tmp_path, spec)


def test_layout_errors(tmp_path):
    spec = get_spec("pacs")
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope", spec)
    with pytest.raises(DataError, match="not found"):
        scan(tmp_path, spec)
    (tmp_path / "PACS" / "photo" / "zebra").mkdir(parents=True)
    with pytest.raises(DataError, match="unknown class folder"):
        scan(tmp_path, spec, ["photo"])


def test_unknown_class_in_open_split(data_root):
    base = get_spec("rotated-digits")
    bad = DatasetSpec("bad", base.dirname, base.domains, base.classes,
                      open_set=OpenSetSpec(("0", "1"), ("eleven",)))
    with pytest.raises(DataError, match="unknown class 'eleven'"):
        make_protocol(bad, scan(data_root, bad), ["rot0"])
