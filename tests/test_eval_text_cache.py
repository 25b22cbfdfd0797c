"""CoOp's class text features are computed once per evaluation pass and never served stale."""
from types import SimpleNamespace

import pytest
import torch

from dgclip.methods import Batch, get_method
from dgclip.methods.base import cosine_logits
from tests.dgclip_fixtures import backbone, cache_dir  # noqa: F401

NAMES = ["zero", "one", "two", "three"]


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _coop(backbone, **hp):
    torch.manual_seed(0)
    m = get_method("coop")(backbone, NAMES, 3, {"train_augment": "none", **hp})
    m.configure_optimizers(10)
    return m


def _count_text_calls(method):
    calls = []
    method.prompt_encoder.register_forward_hook(lambda mod, inp, out: calls.append(1))
    return calls


@torch.no_grad()
def _uncached(method, x):
    """The direct computation: the text tower on every class prompt for this batch."""
    return cosine_logits(method.features(x).pooled, method.text_features(), method.backbone.logit_scale)


class _Split:
    """The engine's view of an evaluation split: records' paths for the order, and batches."""

    def __init__(self, images):
        self.images = images
        self.ds = SimpleNamespace(records=SimpleNamespace(paths=[f"img{i}.png" for i in range(len(images))]))

    def __len__(self):
        return len(self.images)

    def batches(self, order, bs):
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield Batch(self.images[idx], torch.zeros(len(idx), dtype=torch.long), torch.zeros(len(idx), dtype=torch.long))


@pytest.mark.parametrize("hp", [{}, {"class_specific": True, "n_ctx": 4}])
def test_coop_text_tower_once_per_evaluation_pass(backbone, hp, monkeypatch):
    from dgclip.engine import _logits

    m = _coop(backbone, **hp)
    calls = _count_text_calls(m)
    split = _Split(_images(10, seed=1))
    logits = _logits(m, split, 3, "cpu")  # 4 batches of at most 3 images
    assert len(calls) == 1
    _logits(m, split, 3, "cpu")  # a second pass starts afresh (the engine calls eval() first)
    assert len(calls) == 2
    # the uncached path: the text tower for every batch, same batches, same result bit for bit
    monkeypatch.setattr(m._eval_text, "get", lambda module, compute: compute())
    uncached = _logits(m, split, 3, "cpu")
    assert len(calls) == 2 + 4
    torch.testing.assert_close(logits, uncached, atol=0, rtol=0)


def test_coop_cache_is_never_stale(backbone):
    m = _coop(backbone)
    calls = _count_text_calls(m)
    x = _images(6, seed=2)
    m.eval()
    before = m.predict(x)
    assert len(calls) == 1
    m.predict(x)
    assert len(calls) == 1  # reused within the pass
    # an update step through the usual path (mode change, optimiser step) is seen
    m.train()
    m.update(Batch(x, torch.tensor([0, 1, 2, 3, 0, 1]), torch.zeros(6, dtype=torch.long)))
    m.eval()
    after = m.predict(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _uncached(m, x), atol=0, rtol=0)
    # a parameter changed in place without any mode change (an optimiser step called directly)
    n = len(calls)
    with torch.no_grad():
        m.ctx.add_(0.5)
    changed = m.predict(x)
    assert len(calls) == n + 1  # recomputed for the changed parameter
    torch.testing.assert_close(changed, _uncached(m, x), atol=0, rtol=0)
    # loading another state is a change too
    m.load_state_dict({**m.state_dict(), "ctx": torch.zeros_like(m.ctx)})
    torch.testing.assert_close(m.predict(x), _uncached(m, x), atol=0, rtol=0)


def test_coop_train_mode_never_caches(backbone):
    m = _coop(backbone)
    calls = _count_text_calls(m)
    m.train()
    x = _images(4, seed=3)
    m.predict(x)
    m.predict(x)
    assert len(calls) == 2
