"""uint8 transport (dgclip.data.transfer): the host half of a split transform followed by the device
stage gives exactly the images of the whole transform, for every transform dgclip builds."""
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dgclip.data.transfer import DeviceNormalize, ToUint8, split_device_stage
from dgclip.methods.base import Batch
from dgclip.methods.views import MultiViewTransform
from dgclip.tiny_clip import tiny_transform

try:
    import open_clip
except ImportError:  # a machine without open_clip (the GPU machine's image): those transforms skip
    open_clip = None


def _open_clip():
    if open_clip is None:
        pytest.skip("open_clip not installed")
    return open_clip


def _image(seed, size=(67, 53), mode="RGB"):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _seeded(fn, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return fn()


def _whole_and_split(tf, img, seed, device="cpu"):
    """(whole transform's output, host half then device stage), both under the same seeds."""
    host, stage = split_device_stage(tf)
    assert stage is not None
    want = _seeded(lambda: tf(img), seed)
    raw = _seeded(lambda: host(img), seed)
    move = (lambda x: stage(x.to(device)[None])[0].cpu())  # the stage runs on a batch
    got = {k: move(v) for k, v in raw.items()} if isinstance(raw, dict) else move(raw)
    return want, got, raw


TRANSFORMS = {
    "open_clip train": lambda: _open_clip().image_transform(40, is_train=True),
    "open_clip eval": lambda: _open_clip().image_transform(40, is_train=False),
    "tiny": lambda: tiny_transform(32),
    "augment then eval": lambda: T.Compose([T.RandomHorizontalFlip(), _open_clip().image_transform(40, is_train=False)]),
    "gopro views": lambda: MultiViewTransform(_open_clip().image_transform(40, is_train=False)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_split_transform_is_bit_identical(name):
    tf = TRANSFORMS[name]()
    before = repr(tf)
    for seed in range(3):
        want, got, raw = _whole_and_split(tf, _image(seed), seed)
        if isinstance(want, dict):
            assert set(got) == set(want) == {"original", "moco", "augmix"}
            assert all(raw[k].dtype == torch.uint8 for k in raw)
            assert all(torch.equal(got[k], want[k]) for k in want)
        else:
            assert raw.dtype == torch.uint8 and got.dtype == want.dtype == torch.float32
            assert got.is_contiguous() and torch.equal(got, want)
    assert repr(tf) == before  # the caller's transform is not modified


def test_unsplittable_transforms_pass_through():
    for tf in (T.Compose([T.ToTensor()]), T.Compose([T.Normalize((0.5,), (0.5,)), T.ToTensor()]),
               lambda img: img, T.Compose([])):
        assert split_device_stage(tf) == (tf, None)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "I", "F"])
def test_to_uint8_matches_to_tensor_for_every_mode(mode):
    img = _image(3, mode=mode)
    want = T.ToTensor()(img)
    raw = ToUint8()(img)
    assert raw.dtype == (torch.uint8 if mode not in ("I", "F") else want.dtype)
    got = raw.permute(2, 0, 1).float() / 255 if raw.dtype == torch.uint8 else raw  # uint8 is [H, W, C]
    assert torch.equal(got, want)


def test_to_uint8_refuses_integer_tensors():
    with pytest.raises(TypeError, match="uint8 tensor"):
        ToUint8()(torch.zeros(3, 4, 4, dtype=torch.uint8))
    f = torch.rand(3, 4, 4)
    assert ToUint8()(f) is f


def test_device_stage_rejects_bad_batches():
    stage = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="channels"):
        stage(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # uint8 batches are [B, H, W, C]
    with pytest.raises(ValueError, match="channels"):
        stage(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match="uint8 or floating"):
        stage(torch.zeros(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="zero"):
        DeviceNormalize((0.5,), (0.0,))
    f = torch.rand(2, 3, 4, 4)
    assert torch.equal(stage(f), (f - 0.5) / 0.25) and stage(f) is not f


def test_batch_images_unreadable_until_moved():
    stage = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    raw = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    b = Batch({"original": raw, "moco": raw}, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
              device_stage=stage)
    with pytest.raises(RuntimeError, match="device stage"):
        b.original()
    moved = b.to("cpu")
    assert moved.device_stage is None
    got = moved.view("moco")
    assert got.shape == (2, 3, 4, 5) and got.is_contiguous()
    assert torch.equal(got, (raw.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)


def test_device_stage_pickles_without_its_device_constants():
    stage = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    stage(torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    again = pickle.loads(pickle.dumps(stage))
    assert again._consts == {} and again.mean == stage.mean


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_stage_on_cuda_is_bit_identical_to_the_host_transform():
    tf = _open_clip().image_transform(40, is_train=False)
    for seed in range(3):
        want, got, _ = _whole_and_split(tf, _image(seed), seed, device="cuda")
        assert torch.equal(got, want)
