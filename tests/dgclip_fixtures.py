"""Shared fixtures for the dgclip tests: a random-weight tiny CLIP and the embedded dataset
written once per session into a temporary root."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dgclip_cache")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from dgclip.data.embedded import ensure_rotated_digits

    root = tmp_path_factory.mktemp("dgclip_data")
    ensure_rotated_digits(root)
    return root


@pytest.fixture(scope="session")
def backbone(cache_dir):
    from dgclip.backbone import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("tiny-digits", "none", cache_dir=cache_dir)
    with torch.no_grad():  # a trained CLIP's temperature, so random-weight logits are not flat
        bb.model.logit_scale.fill_(math.log(100.0))
    return bb
