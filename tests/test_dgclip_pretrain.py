"""`dgclip pretrain`: captions, a short run writing the weights atomically, reuse of the cache."""
import json

import torch

from dgclip.data.catalog import DIGIT_WORDS
from dgclip.pretrain import ORIENTATIONS, CaptionTable, pretrain_tiny_clip
from dgclip.backbone import load_tiny_backbone
from dgclip.tiny_clip import build_tiny_model, weights_path


def _decode(tokenizer, ids):
    return tokenizer.decode(ids.tolist()).replace("<start_of_text>", "").split("<end_of_text>")[0].strip()


def test_oriented_captions_name_the_rotation_and_the_digit(tmp_path):
    _, tokenizer = build_tiny_model("tiny-digits", tmp_path)
    table = CaptionTable(tokenizer)
    assert CaptionTable.orientation(torch.tensor([0.0, -7.9, 12.0, -30.0, 49.0, 75.0, -120.0])).tolist() == \
        [0, 0, 1, 2, 2, 3, 3]
    labels = torch.tensor([7, 3, 0, 9])
    angles = torch.tensor([2.0, -20.0, 40.0, 80.0])
    gen = torch.Generator().manual_seed(0)
    oriented = table.sample(labels, angles, 1.0, gen)
    for ids, y, word in zip(oriented, labels, ["upright", "slightly tilted", "tilted", "sideways"]):
        text = _decode(tokenizer, ids)
        assert DIGIT_WORDS[y] in text and word in text, text
        assert not any(o in text for _, o in ORIENTATIONS if o != word and o not in word), text
    plain = table.sample(labels, angles, 0.0, gen)
    for ids, y in zip(plain, labels):
        text = _decode(tokenizer, ids)
        assert DIGIT_WORDS[y] in text and not any(o in text for _, o in ORIENTATIONS), text


def test_short_pretraining_writes_and_reuses_weights(tmp_path):
    path = pretrain_tiny_clip(tmp_path, progress=False, steps=3, batch_size=32, warmup=1)
    assert path == weights_path("tiny-digits", tmp_path) and path.exists()
    assert not list(path.parent.glob("*.tmp"))
    meta = json.loads((path.parent / "pretrain.json").read_text())
    assert meta["config"]["steps"] == 3 and set(meta["zero_shot_dg_pool"]) == {"rot0", "rot45", "rot75"}
    stamp = path.stat().st_mtime_ns
    assert pretrain_tiny_clip(tmp_path, progress=False, steps=3) == path and path.stat().st_mtime_ns == stamp
    # the weights load into the backbone and differ from the random init
    trained = load_tiny_backbone("tiny-digits", "default", cache_dir=tmp_path)
    random = load_tiny_backbone("tiny-digits", "none", cache_dir=tmp_path)
    assert not torch.equal(trained.model.visual.conv1.weight, random.model.visual.conv1.weight)
