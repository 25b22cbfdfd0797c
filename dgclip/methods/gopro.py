"""GOPro (BMVC 2023): style/content-conditioned prompts learned from three views of each image.

Per image, the frozen image tower's per-layer token mean/std give style and content vectors
(`StyleContentShift`), mixed over layers into one shift added to the M = 4 shared context vectors
("a photo of a" initialisation): B x K prompts per view. Three views per image (original, MoCo-v3
style, AugMix; built in the data loader by `make_train_transform`) all go through the same prompt
generator, so one step encodes 3 x B x K prompt sequences through `dgkernels.PromptEncoder`
(prefix sharing, chunking).

Loss = CE(original view) + consistency_weight * [MSE(T_o, T_moco) + MSE(T_o, T_augmix)]
       + contrastive_weight * NT-Xent(tau) on normalised P_v(f_o / |f_o|), P_v(f_moco / |f_moco|)
with T_v the L2-normalised text features of view v ([B, K, E]) and P_v = Linear(E, E) + BatchNorm1d.

Defaults = the released code (mainaksingha01/GOPro trainers/gopro.py), which produced the
published numbers: the RAW image feature feeds the logits and P_v feeds only the SimCLR loss
(`projector_feeds_logits` False), P_v takes the L2-NORMALISED image feature
(`projector_raw_input` False; True feeds it the pooled feature as it comes), P_v and the Linear(L -> 1) layer mix start with nn.Linear's
default init (`projector_init` "random", `shift_init` "default"), 4 images per step IN TOTAL
(Dassl's sampler over the pooled training set: `batch_scope` "total").
The paper figure's reading is an option: projector_feeds_logits=True, and then
projector_init="zero_residual" (P_v = f + BN(Linear(f)) with the BatchNorm scale at 0, the identity
at start: a random P_v in the logits starts from a random image embedding and fell to chance,
16.9% held-out vs zero-shot 59.5% on the embedded default). consistency_on_normalized (True): the
MSE compares L2-normalised text features.
  augmix_ops ("tpt"): AugMix over TPT's op list (geometric and histogram ops, no colour ops),
    applied after the original view's crop/flip; "torchvision": torchvision's AugMix list.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgkernels

from . import register_method
from ..backbone import ImageFeatures
from .base import Batch, Method, check_choice, cosine_logits
from .prompt_modules import StyleContentShift, initial_context, make_prompt_encoder
from .views import MultiViewTransform

VIEWS = ("original", "moco", "augmix")
GOPRO = "released: mainaksingha01/GOPro"


@register_method("gopro")
class GOPro(Method):
    open_set = False
    uses_frozen_features = False  # three augmented views per step
    needs_layer_stats = True
    default_hparams = {
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 4,
        "batch_scope": "total",
        "warmup_fraction": 0.02,  # 1 of 50 epochs, at the constant warm-up lr
        "warmup_lr": 1e-5,
        "consistency_weight": 1.0,
        "contrastive_weight": 0.1,
        "temperature": 0.1,
        "projector_feeds_logits": False,
        "projector_raw_input": False,  # True: P_v sees the pooled feature unnormalised
        "consistency_on_normalized": True,
        "moco_blur_p": 1.0,
        "prompt_chunk_size": 0,  # 0 = the encoder's default
        "shift_init": "default",  # | "zero": the layer mix starts at 0 (first prompts = the plain context)
        "projector_init": "random",  # | "zero_residual" (with projector_feeds_logits: starts as the identity)
        "augmix_ops": "tpt",  # | "torchvision"
        "crop_scale_min": 0.08,  # random-resized-crop scale (0.08, 1) of the original and MoCo views
        "hflip": True,  # off for data whose meaning mirroring changes (digits)
    }
    hparam_sources = {
        "n_ctx": f"{GOPRO} scripts/train.sh:L11-14 (NCTX=4)",
        "ctx_init": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (CTX_INIT 'a photo of a')",
        "optimizer": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (sgd)",
        "lr": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (LR 0.002)",
        "momentum": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156",
        "weight_decay": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L151-156",
        "batch_size": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (BATCH_SIZE 4)",
        "batch_scope": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L102 (RandomSampler, pooled)",
        "warmup_fraction": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (WARMUP_EPOCH 1 of MAX_EPOCH 50)",
        "warmup_lr": f"{GOPRO} configs/trainers/GOPro/vit_b16.yaml:L1-35 (WARMUP_CONS_LR 1e-5)",
        "consistency_weight": f"{GOPRO} trainers/gopro.py GOProLoss.forward (ce + mse + mse + 0.1 * SIMCLRLoss)",
        "contrastive_weight": f"{GOPRO} trainers/gopro.py GOProLoss.forward (0.1 * con_loss)",
        "temperature": f"{GOPRO} trainers/gopro.py SIMCLRLoss(temperature=0.1)",
        "projector_feeds_logits": f"{GOPRO} trainers/gopro.py CustomCLIP.forward (logits from image_features; "
                                  f"simproj only feeds SIMCLRLoss)",
        "projector_raw_input": f"{GOPRO} trainers/gopro.py:L350,L367,L389-390 (commit e284586d: image_features and "
                               f"mocov3_features divided by their norm before self.simproj)",
        "consistency_on_normalized": f"{GOPRO} trainers/gopro.py CustomCLIP.forward (text features normalised before "
                                     f"GOProLoss's mse_loss)",
        "moco_blur_p": "paper: MoCo v3 (Chen et al., ICCV 2021) augmentation, blur on view 1 with p=1.0",
        "prompt_chunk_size": "project: speed only (0 = the encoder's default); never changes results",
        "shift_init": f"{GOPRO} trainers/gopro.py PromptLearner.__init__ (self.rho = nn.Linear(12, 1), default init)",
        "projector_init": f"{GOPRO} trainers/gopro.py sim_projector (nn.Linear(512, 512) + BatchNorm1d, default init)",
        "augmix_ops": "released: azshue/TPT data/augmix_ops.py (the AugMix op list GOPro's AugMix view follows)",
        "crop_scale_min": "released: KaiyangZhou/Dassl.pytorch dassl/config/defaults.py:L40 (RRCROP_SCALE (0.08, 1.0))",
        "hflip": "released: KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50.yaml:L8-13 (random_flip)",
    }

    weight_decay_log10_range = (-5.0, -3.0)
    batch_sizes = (2, 4, 8)

    # embedded default: only what the data is (a mirrored digit is another symbol); no tuned value
    embedded_hparams = {"hflip": False}
    embedded_sources = {"hflip": "project: a mirrored digit is another symbol (or none): no flip on rotated digits"}

    @classmethod
    def search_space(cls, rng) -> dict:
        hp = super().search_space(rng)
        hp.update({
            "consistency_weight": float(10 ** rng("consistency_weight").uniform(-1, 1)),
            "contrastive_weight": float(10 ** rng("contrastive_weight").uniform(-2, 0)),
            "temperature": float(rng("temperature").choice([0.05, 0.1, 0.2])),
        })
        return hp

    def __init__(self, backbone, classnames, num_domains, hparams=None):
        super().__init__(backbone, classnames, num_domains, hparams or {})
        hp = self.hparams
        check_choice(hp, "projector_init", ("zero_residual", "random"))
        check_choice(hp, "augmix_ops", ("tpt", "torchvision"))
        check_choice(hp, "shift_init", ("default", "zero"))
        check_choice(hp, "projector_raw_input", (False, True))
        self.n_ctx = int(hp["n_ctx"])
        chunk = int(hp["prompt_chunk_size"]) or None
        self.encoder = make_prompt_encoder(backbone, self.classnames, chunk_size=chunk)
        self.ctx = nn.Parameter(initial_context(self.encoder, self.n_ctx, hp["ctx_init"] or None))
        self.shift = StyleContentShift(backbone.num_layers, backbone.vision_width, backbone.text_width,
                                       zero_init=hp["shift_init"] == "zero")
        dim = backbone.embed_dim
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim))
        self.residual_projector = hp["projector_init"] == "zero_residual"
        if self.residual_projector:
            nn.init.zeros_(self.projector[1].weight)  # P_v(f) = f + 0 at start: the identity

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """P_v of the pooled image feature f: Linear + BatchNorm on f / |f| (the released code's
        input; f itself with projector_raw_input), as a residual on that input when
        projector_init='zero_residual'."""
        if not self.hparams["projector_raw_input"]:
            f = F.normalize(f, dim=-1)
        out = self.projector(f)
        return f.to(out.dtype) + out if self.residual_projector else out

    def make_train_transform(self, base_transform):
        hp = self.hparams
        return MultiViewTransform(base_transform, blur_p=float(hp["moco_blur_p"]),
                                  crop_scale=(float(hp["crop_scale_min"]), 1.0), hflip=bool(hp["hflip"]),
                                  augmix_ops=hp["augmix_ops"])

    # -- forward pieces -------------------------------------------------------------------------
    def text_features(self, feats) -> torch.Tensor:
        """[N, K, E] text features, one prompt set per image (N = rows of feats), one encoder call."""
        ctx = self.ctx[None] + self.shift(feats.layer_mean, feats.layer_std)[:, None, :]  # [N, M, W]
        return self.encoder(ctx).float()

    def losses(self, views: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [v for v in VIEWS if v not in views]
        if missing:
            raise ValueError(f"GOPro needs the views {VIEWS} in batch.images (built by make_train_transform); missing {missing}")
        return self.losses_from_features(self.features(torch.cat([views[v] for v in VIEWS])), labels)

    def losses_from_features(self, feats: ImageFeatures, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """feats: frozen features of the 3B views stacked as [original; moco; augmix]."""
        b = labels.shape[0]
        if feats.pooled.shape[0] != 3 * b:
            raise ValueError(f"expected features of 3 x {b} views, got {feats.pooled.shape[0]} rows")
        text = self.text_features(feats).view(3, b, self.num_classes, -1)  # 3 x B x K prompts in one call
        pooled = feats.pooled.view(3, b, -1)
        proj_o, proj_m = self.project(pooled[0]), self.project(pooled[1])  # BatchNorm statistics per view
        image_o = proj_o if self.hparams["projector_feeds_logits"] else pooled[0]
        ce = dgkernels.cosine_cross_entropy(image_o, text[0], self.backbone.logit_scale, labels)
        t = F.normalize(text, dim=-1) if self.hparams["consistency_on_normalized"] else text
        consistency = F.mse_loss(t[0], t[1]) + F.mse_loss(t[0], t[2])
        nce = dgkernels.multiview_info_nce(torch.stack([proj_o, proj_m], dim=1), temperature=self.hparams["temperature"])
        total = ce + self.hparams["consistency_weight"] * consistency + self.hparams["contrastive_weight"] * nce
        return {"loss": total, "ce": ce, "consistency": consistency, "contrastive": nce}

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not isinstance(batch.images, dict):
            raise ValueError("GOPro trains on a dict of views in batch.images; build the loader with make_train_transform")
        return self.losses(batch.images, batch.labels)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """[B, K] logits from images (a tensor, or a dict of views: the original is used) or cached features."""
        # in eval mode (the engine's job) P_v's BatchNorm uses running statistics: a prediction
        # never depends on the rest of the batch
        if isinstance(x, dict):
            x = x["original"]
        feats = self.features(x)
        image = self.project(feats.pooled) if self.hparams["projector_feeds_logits"] else feats.pooled
        return cosine_logits(image, self.text_features(feats), self.backbone.logit_scale)
