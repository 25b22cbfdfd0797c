"""DALSCLIP, GOPro and SeeCLIP through the platform's engine on the embedded rotated-digits data
(tiny random-weight CLIP, a few steps): the open-set pipeline end to end, the three GOPro views
built in the data loader, and evaluation that never hands a label to the model."""
import math

import pytest
import torch

from dgclip_fixtures import backbone, cache_dir, data_root  # noqa: F401  (fixtures)

OPEN_SET_KEYS = ("closed_acc", "known_acc", "unknown_recall", "h_score", "h_score_swept_oracle", "auroc", "oscr")


def _config(method, dataset, data_root, cache_dir, tmp_path, **kw):
    from dgclip.engine import TrainConfig

    base = dict(method=method, dataset=dataset, root=str(data_root), test_domains=["rot75"], seed=0,
                output_dir=str(tmp_path), pretrained="none", cache_dir=str(cache_dir), steps=4, eval_every=4,
                train_domains=["rot0", "rot30"], progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_seeclip_open_set_end_to_end(data_root, cache_dir, tmp_path):
    from dgclip.engine import read_records, run_training

    rec = run_training(_config("seeclip", "rotated-digits-open", data_root, cache_dir, tmp_path,
                               hparams={"batch_size": 16}))
    for key in OPEN_SET_KEYS:
        assert key in rec and math.isfinite(rec[key]) and 0.0 <= rec[key] <= 1.0, key
    assert rec["method"] == "seeclip" and rec["test_domain"] == "rot75"
    assert read_records(tmp_path / "results.jsonl")[-1]["run_key"] == rec["run_key"]


@pytest.mark.parametrize("method", ["gopro", "dalsclip"])
def test_closed_set_methods_run_in_the_engine(method, data_root, cache_dir, tmp_path):
    from dgclip.engine import run_training

    rec = run_training(_config(method, "rotated-digits", data_root, cache_dir, tmp_path, hparams={"batch_size": 8}))
    assert 0.0 <= rec["test_acc"] <= 1.0 and math.isfinite(rec["loss_last"])


def test_gopro_loader_builds_three_views(data_root, backbone):  # noqa: F811
    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import ImageDataset, scan
    from dgclip.methods import get_method

    spec = get_spec("rotated-digits")
    records = scan(str(data_root), spec)
    m = get_method("gopro")(backbone, [spec.classname(c) for c in spec.classes], 2, {})
    ds = ImageDataset(records, m.make_train_transform(backbone.preprocess_val))
    views, *_ = ds[0]
    assert set(views) == {"original", "moco", "augmix"}
    assert all(v.shape == (3, backbone.image_size, backbone.image_size) for v in views.values())


def test_open_set_predictions_ignore_evaluation_labels(data_root, cache_dir, backbone):  # noqa: F811
    """The engine's evaluation with shuffled labels gives bit-identical SeeCLIP logits."""
    from dgclip.data.catalog import get_spec
    from dgclip.data.domainbed import ImageDataset, scan
    from dgclip.data.splits import make_protocol
    from dgclip.engine import _logits, _Split
    from dgclip.methods import get_method

    spec = get_spec("rotated-digits-open")
    protocol = make_protocol(spec, scan(str(data_root), spec), ["rot75"], trial_seed=0)
    m = get_method("seeclip")(backbone, [spec.classname(c) for c in protocol.classnames], 2, {})
    m.configure_optimizers(10)
    recs = protocol.test["rot75"]
    ds = ImageDataset(recs, backbone.preprocess_val, label_map=protocol.label_map, domain_map=protocol.domain_map)
    split = _Split(ds, None)
    first = _logits(m, split, 64, torch.device("cpu"))
    split.labels = split.labels[torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))]
    split.domains = torch.zeros_like(split.domains)
    again = _logits(m, split, 37, torch.device("cpu"))  # other batch boundaries too
    assert first.shape == (len(split), protocol.num_classes + 1)
    torch.testing.assert_close(first, again, rtol=0, atol=1e-5)
