"""SeeCLIP's diffusion pseudo-unknown generator on a tiny, randomly initialised Stable Diffusion
pipeline built locally from configs (no download). Skipped when diffusers/transformers are absent."""
import json

import pytest
import torch

import dgkernels

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hasattr(dgkernels, "PromptEncoder"), reason="needs dgkernels.PromptEncoder (pending merge)")

CLASSES = ["cat", "dog", "bird"]


def tiny_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # character-level BPE vocabulary: every word is its letters, the last one with </w>
    chars = list("abcdefghijklmnopqrstuvwxyz.,")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=32)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from dgclip.backbone import load_backbone

    return load_backbone("tiny-digits", "none", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(path).save_pretrained(path / "pipeline")
    return path / "pipeline"


def _encode(backbone):
    from dgclip.methods.pseudo_unknown import normalize_images

    def encode(images):
        feats = backbone.image_features(normalize_images(images, backbone.image_size, (0.2,) * 3, (0.3,) * 3), patches=True)
        return feats.pooled, feats.patches

    return encode


def test_diffusion_generator_loads_and_makes_pseudo_unknowns(backbone, pipe_dir):
    from dgclip.methods.pseudo_unknown import DiffusionUnknowns, UnknownRequest

    gen = DiffusionUnknowns.from_pretrained(CLASSES, _encode(backbone), model_id=str(pipe_dir), local_files_only=True,
                                            ratio=0.5, num_inference_steps=2)
    assert gen.guidance_scale == 15.0 and gen.negative_prompt == "cat, dog, bird"
    # the paper's prompt "a [source domain] of an unknown class"; the perturbation sits on the
    # "unknown class" tokens (one token per letter here), right before EOS
    gen.domain_names = ["sketch", "photo"]
    prompts = [gen.template.format(gen.domain_name(d)) for d in (0, 1)]
    assert prompts == ["a sketch of an unknown class", "a photo of an unknown class"]
    mask = gen._unknown_token_mask(prompts, 48, "cpu")
    n_tail = len("unknownclass")
    for row, p in zip(mask, prompts):
        end = 1 + len(p.replace(" ", ""))
        assert row.nonzero().flatten().tolist() == list(range(end - n_tail, end))
    feats = backbone.image_features(torch.randn(4, 3, 32, 32), patches=True)
    req = UnknownRequest(feats.pooled, feats.patches, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1]))
    out = gen(req, generator=torch.Generator().manual_seed(0))
    # max(1, int(0.5 * 4)) = 2 per source domain (B = the whole batch), 2 domains
    assert out.pooled.shape == (4, feats.pooled.shape[1]) and out.patches.shape == (4,) + feats.patches.shape[1:]
    assert torch.isfinite(out.pooled).all()
    again = gen(req, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.pooled, again.pooled)  # seeded: reproducible
    gen.token_noise_std = 0.0
    clean = gen(req, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(clean.pooled, out.pooled)  # the token perturbation changes the images


def test_seeclip_trains_with_diffusion_unknowns(backbone, pipe_dir):
    from dgclip.methods import get_method
    from dgclip.methods.base import Batch

    m = get_method("seeclip")(backbone, CLASSES, 2, {"unknown_generator": "diffusion", "diffusion_model_id": str(pipe_dir),
                                                     "diffusion_steps": 2, "unknown_ratio": 0.5})
    m.configure_optimizers(10)
    batch = Batch(images=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0]), domains=torch.tensor([0, 1, 0, 1]))
    pooled, patches, labels = m.training_inputs(batch, generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 1, 2, 0, 3, 3, 3, 3]
    assert m.run_notes()["unknown_generator"] == "diffusion"
    auto = get_method("seeclip")(backbone, CLASSES, 2, {"diffusion_model_id": str(pipe_dir), "diffusion_steps": 2})
    assert auto.run_notes()["unknown_generator"] == "diffusion"  # "auto": the paper's generator when present
    out = m.update(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


def test_missing_weights_error_names_the_model(backbone, tmp_path):
    from dgclip.methods import get_method
    from dgclip.methods.pseudo_unknown import DiffusionUnknowns, FeatureSpaceUnknowns

    auto = get_method("seeclip")(backbone, CLASSES, 2, {"diffusion_model_id": str(tmp_path / "nowhere")})
    notes = auto.run_notes()  # "auto" without weights: the named fallback, and the record says so
    assert notes["unknown_generator"] == "feature" and "fallback" in notes["unknown_generator_note"]
    assert isinstance(auto.generator, FeatureSpaceUnknowns)

    with pytest.raises(OSError, match="could not load the diffusion model"):
        DiffusionUnknowns.from_pretrained(CLASSES, _encode(backbone), model_id=str(tmp_path / "nowhere"), local_files_only=True)
