"""Paper presets on the DomainBed datasets (DPL, zero-shot CLIP) and the open-set DG benchmarks
(SeeCLIP, and zero-shot / CoOp / CoCoOp as ODG-CLIP's table compares them).

Facts and their files: BENCHMARKS.md B1-B3, C3, C4 and DESIGN.md §2-§3.
"""
from __future__ import annotations

from ..provenance import Sourced

__all__ = ["PRESETS", "DOMAINBED_DATASETS", "OPEN_SET_DATASETS"]

_DB = "facebookresearch/DomainBed/domainbed"
_DPL = "shogi880/DPLCLIP"
_COOP = "KaiyangZhou/CoOp"
_DASSL = "KaiyangZhou/Dassl.pytorch"

DOMAINBED_DATASETS = ("vlcs", "pacs", "officehome", "terraincognita", "domainnet")


def _domainbed_run(dataset: str) -> dict:
    return {
        "steps": Sourced(5001, f"released: {_DB}/datasets.py:L55 (N_STEPS = 5001 for every image dataset)"),
        "eval_every": Sourced(1000 if dataset == "domainnet" else 300,
                              f"released: {_DB}/datasets.py:L56,L228-257 (CHECKPOINT_FREQ: 300, DomainNet 1000)"),
        "holdout_fraction": Sourced(0.2, f"released: {_DB}/scripts/train.py:L46"),
        "backbone": Sourced("ViT-B-16", "paper: DPL (Zhang et al.) Table 1 caption, CLIP ViT-B/16"),
        "pretrained": Sourced("openai", "paper: DPL Table 1, OpenAI CLIP weights"),
    }


def _dpl(dataset: str) -> dict:
    hp = f"released: {_DPL}/domainbed/hparams_registry.py:L86-101"
    return {
        **_domainbed_run(dataset),
        "batch_size": Sourced(32, f"released: {_DB}/hparams_registry.py:L210-233 (batch 32 per source domain)"),
        "optimizer": Sourced("sgd", hp),
        "lr": Sourced(1e-3, hp),
        "momentum": Sourced(0.1, hp),
        "weight_decay": Sourced(0.0, hp),
        "n_ctx": Sourced(16, f"{hp} (num_domain_tokens 16)"),
        "dropout": Sourced(0.1, f"{hp} (MLP dropout 0.1)"),
    }


def _zero_shot_template(dataset: str) -> dict:
    run = _domainbed_run(dataset)
    return {"backbone": run["backbone"], "pretrained": run["pretrained"],
            "holdout_fraction": run["holdout_fraction"],
            "template": Sourced("a photo of a {}.", "paper: DPL Table 1 caption, the 'template prompt' row")}


# ---- open-set DG ---------------------------------------------------------------------------------
# Datasets of ODG-CLIP's main table that the catalogue holds (BENCHMARKS.md C4; the Multi-Dataset
# benchmark is not in the catalogue).
OPEN_SET_DATASETS = ("pacs-open-odgclip", "vlcs-open-odgclip", "officehome-open", "digits-dg-open-odgclip",
                     "mini-domainnet-open")
_SEECLIP_SCRIPTS = "released: SeeCLIP training scripts, as read in DESIGN.md §2 'SeeCLIP'"
_SMALL_BATCH = {"officehome-open", "mini-domainnet-open"}  # B = 2 in SeeCLIP's scripts, else 16


def _seeclip(dataset: str) -> dict:
    return {
        "epochs": Sourced(20, "paper: SeeCLIP (arXiv 2511.16979) implementation details, as read in DESIGN.md §2: 20 epochs"),
        "optimizer": Sourced("adamw", "paper: SeeCLIP implementation details (DESIGN.md §2): AdamW"),
        "lr": Sourced(1e-3, "paper: SeeCLIP implementation details (DESIGN.md §2): lr 1e-3"),
        "weight_decay": Sourced(1e-5, "paper: SeeCLIP implementation details (DESIGN.md §2): weight decay 1e-5"),
        "batch_size": (Sourced(16, "project: SeeCLIP's scripts name no Digits-DG batch; 16 as for PACS/VLCS")
                       if dataset.startswith("digits") else
                       Sourced(2 if dataset in _SMALL_BATCH else 16,
                               f"{_SEECLIP_SCRIPTS} (B = 16 for PACS/VLCS, 2 for OfficeHome/Mini-DomainNet)")),
        "backbone": Sourced("ViT-B-32", f"{_SEECLIP_SCRIPTS} (the scripts load ViT-B/32)"),
        "pretrained": Sourced("openai", f"{_SEECLIP_SCRIPTS} (OpenAI CLIP weights)"),
        "holdout_fraction": Sourced(0.2, f"released: {_DB}/scripts/train.py:L46 (the project's DomainBed split)"),
    }


def _open_clip_b16() -> dict:
    return {"backbone": Sourced("ViT-B-16", "project: the CLIP the project's papers use (DESIGN.md §2); "
                                           "ODG-CLIP's table does not name the baselines' backbone"),
            "pretrained": Sourced("openai", "project: OpenAI CLIP weights, as every compared paper"),
            "holdout_fraction": Sourced(0.2, f"released: {_DB}/scripts/train.py:L46")}


def _coop(dataset: str) -> dict:
    cfg = f"released: {_COOP}/configs/trainers/CoOp/vit_b16_ep50.yaml"
    return {**_open_clip_b16(),
            "epochs": Sourced(50, f"{cfg} (MAX_EPOCH 50)"),
            "batch_size": Sourced(32, f"{cfg} (train batch 32)"),
            "lr": Sourced(2e-3, f"{cfg} (LR 0.002)"),
            "optimizer": Sourced("sgd", f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "momentum": Sourced(0.9, f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "weight_decay": Sourced(5e-4, f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "n_ctx": Sourced(16, f"released: {_COOP}/train.py:L90-95 (N_CTX 16)")}


def _cocoop(dataset: str) -> dict:
    cfg = f"released: {_COOP}/configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:L1-35"
    return {**_open_clip_b16(),
            "epochs": Sourced(10, cfg), "batch_size": Sourced(1, cfg), "lr": Sourced(2e-3, cfg),
            "optimizer": Sourced("sgd", f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "momentum": Sourced(0.9, f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "weight_decay": Sourced(5e-4, f"released: {_DASSL}/dassl/config/defaults.py:L151-156"),
            "n_ctx": Sourced(4, cfg), "ctx_init": Sourced("a photo of a", cfg)}


def _zero_shot_open(dataset: str) -> dict:
    return {**_open_clip_b16(), "template": Sourced("a photo of a {}.", "released: KaiyangZhou/CoOp/trainers/zsclip.py:L13-29")}


PRESETS: dict = {}
for _d in DOMAINBED_DATASETS:
    PRESETS[("dpl", _d)] = _dpl(_d)
    PRESETS[("zero-shot", _d)] = _zero_shot_template(_d)
for _d in OPEN_SET_DATASETS:
    PRESETS[("seeclip", _d)] = _seeclip(_d)
    PRESETS[("zero-shot", _d)] = _zero_shot_open(_d)
    PRESETS[("coop", _d)] = _coop(_d)
    PRESETS[("cocoop", _d)] = _cocoop(_d)
