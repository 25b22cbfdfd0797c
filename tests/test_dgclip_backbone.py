import pytest
import torch

from dgclip.backbone import BackboneError, ImageFeatures, load_backbone
from tests.dgclip_fixtures import backbone, cache_dir  # noqa: F401


def test_frozen_and_eval(backbone):
    assert all(not p.requires_grad for p in backbone.model.parameters())
    backbone.train()
    assert not backbone.model.training and not backbone.training
    assert backbone.embed_dim == 64 and backbone.text_width == 64 and backbone.logit_scale > 1


def test_one_forward_features(backbone):
    x = torch.randn(3, 3, 32, 32)
    f = backbone.image_features(x, patches=True, layer_stats=True)
    assert isinstance(f, ImageFeatures)
    torch.testing.assert_close(f.pooled, backbone.encode_image(x))
    assert f.patches.shape == (3, 16, 64)
    assert f.layer_mean.shape == (3, 3, 64) and f.layer_std.shape == (3, 3, 64)
    # recompute the statistics by running the tower's blocks by hand
    v = backbone.model.visual
    with torch.no_grad():
        h = v._embeds(x)
        means, stds = [], []
        for blk in v.transformer.resblocks:
            h = blk(h)
            means.append(h.mean(1))
            stds.append(h.std(1, unbiased=False))
        patches = v.ln_post(h[:, 1:]) @ v.proj
    torch.testing.assert_close(f.layer_mean, torch.stack(means, 1))
    torch.testing.assert_close(f.layer_std, torch.stack(stds, 1))
    torch.testing.assert_close(f.patches, patches)
    # no hooks left behind
    assert not v.transformer._forward_hooks and not any(b._forward_hooks for b in v.transformer.resblocks)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(BackboneError, match="dgclip pretrain"):
        load_backbone("tiny-digits", "default", cache_dir=tmp_path)
    with pytest.raises(BackboneError, match="unknown model"):
        load_backbone("ViT-Z-99", "none")


def test_offline_open_clip_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="Put the checkpoint in"):
        load_backbone("RN50", str(tmp_path / "missing.bin"), cache_dir=tmp_path)


def test_unreachable_hub_loads_from_the_cache_only(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE: one bounded reachability check, then cache-only loading, so
    a missing checkpoint fails at once (it took ~50 s of download retries before)."""
    import time

    import huggingface_hub
    from huggingface_hub import constants

    import dgclip.backbone as bb

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)
    before = constants.HF_HUB_OFFLINE
    t0 = time.time()
    with bb._offline_unless_reachable("openai"):
        assert constants.HF_HUB_OFFLINE
        with pytest.raises(Exception, match="(?i)offline|cache|connection"):
            huggingface_hub.hf_hub_download("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin",
                                            cache_dir=str(tmp_path))
    assert time.time() - t0 < 10 and constants.HF_HUB_OFFLINE == before
    with bb._offline_unless_reachable(str(tmp_path)):  # a local path: no check, nothing changed
        assert constants.HF_HUB_OFFLINE == before


def test_backbone_and_tiny_clip_import_in_one_direction():
    """tiny_clip.py never imports backbone.py (no import cycle, not even inside a
    function); backbone.py imports tiny_clip at module level."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "dgclip"

    def imports(path):
        out = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                out += [(node.module or "") + ":" + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                out += [a.name for a in node.names]
        return out

    assert not [i for i in imports(root / "tiny_clip.py") if "backbone" in i]
    top = ast.parse((root / "backbone.py").read_text()).body
    assert any(isinstance(n, ast.ImportFrom) and any(a.name == "tiny_clip" for a in n.names) for n in top)
