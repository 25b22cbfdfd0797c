"""CoOp-suite configurations of CoOp, CoCoOp and GOPro, each value with its source.

Keys are (method, dataset) for the 11 trainable suite datasets and the embedded default. Values are
the released configs (BENCHMARKS.md A5-A6): Dassl SGD (momentum 0.9, weight decay 5e-4), a cosine
schedule over epochs behind one constant warm-up epoch at 1e-5, Dassl's transforms, 16 shots,
the last epoch reported. Epochs are epochs: the run's step count follows from the few-shot train
size and the batch size (Dassl drops the last partial batch when the list holds a full one).

Method hyper-parameters (n_ctx, ctx_init, lr, batch_size, ...) are passed to the method; run
settings (epochs, shots, warm-up, transforms, backbone, eval batch) are read by the protocol
runner (dgclip.protocols.runner).
"""
from __future__ import annotations

from ..provenance import Sourced

__all__ = ["PRESETS", "RUN_SETTINGS", "PROTOCOL_OVERRIDES", "protocol_overrides", "TRAINABLE_DATASETS", "EMBEDDED"]

TRAINABLE_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
EMBEDDED = "rotated-digits"
# keys the runner reads; every other key is a method hyper-parameter
RUN_SETTINGS = ("epochs", "budget_steps", "shots", "warmup_epochs", "warmup_lr", "transforms", "backbone",
                "pretrained", "eval_batch_size", "seeds")

_COOP = "released: KaiyangZhou/CoOp"
_DASSL = "released: KaiyangZhou/Dassl.pytorch"
_GOPRO = "released: mainaksingha01/GOPro"

_COMMON = {
    "backbone": Sourced("ViT-B-16", f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (MODEL.BACKBONE ViT-B/16)"),
    "pretrained": Sourced("openai", "paper: CoOp IJCV 2022 §4.1 (CLIP's released weights)"),
    "shots": Sourced(16, f"{_GOPRO}/scripts/train.sh:L11-14 (SHOTS=16)"),
    "optimizer": Sourced("sgd", f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.NAME sgd)"),
    "momentum": Sourced(0.9, f"{_DASSL}/dassl/config/defaults.py:L151-156"),
    "weight_decay": Sourced(5e-4, f"{_DASSL}/dassl/config/defaults.py:L151-156"),
    "warmup_epochs": Sourced(1, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.WARMUP_*: 1 constant epoch at 1e-5)"),
    "warmup_lr": Sourced(1e-5, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.WARMUP_*: 1 constant epoch at 1e-5)"),
    "transforms": Sourced("dassl", f"{_COOP}/configs/trainers/CoOp/vit_b16_ep50.yaml:L8-13"),
    "eval_batch_size": Sourced(100, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (DATALOADER.TEST.BATCH_SIZE 100)"),
    "seeds": Sourced((1, 2, 3), f"{_COOP}/scripts/coop/main.sh:L14"),
}


def _coop(dataset: str) -> dict:
    ep = (Sourced(50, f"{_COOP}/COOP.md:L13 (ImageNet: vit_b16_ep50.yaml for every setting)")
          if dataset == "imagenet" else
          Sourced(200, f"{_COOP}/COOP.md:L18-22 (16 shots: vit_b16.yaml, 200 epochs)"))
    return {**_COMMON, "epochs": ep,
            "n_ctx": Sourced(16, f"{_COOP}/train.py:L90-95 (TRAINER.COOP.N_CTX default)"),
            "ctx_init": Sourced("", f"{_COOP}/train.py:L90-95 (random N(0, 0.02) init)"),
            "class_specific": Sourced(False, f"{_COOP}/train.py:L90-95 (CSC False)"),
            "batch_size": Sourced(32, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (DATALOADER.TRAIN_X.BATCH_SIZE 32)"),
            "lr": Sourced(0.002, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.LR 0.002)")}


def _coop_base2new(dataset: str) -> dict:
    # CoOp's base-to-new rows (CoCoOp's and GOPro's tables) come from the ctxv1 configs: the context
    # starts as "a photo of a" (so 4 vectors: CoOp sets N_CTX from the init's words).
    src = f"{_COOP}/scripts/cocoop/base2new_train.sh:L14-15"
    ep = (Sourced(50, f"{src} (ImageNet: vit_b16_ep50_ctxv1.yaml)") if dataset == "imagenet" else
          Sourced(200, f"{src} (vit_b16_ctxv1.yaml, 200 epochs)"))
    return {"epochs": ep, "ctx_init": Sourced("a photo of a", f"{src} (ctxv1: CTX_INIT 'a photo of a')"),
            "n_ctx": Sourced(4, f"{_COOP}/trainers/coop.py:L90-91 (N_CTX = the words of CTX_INIT)")}


# (method, protocol) -> the values that protocol's published runs changed from the method's preset
PROTOCOL_OVERRIDES = {("coop", "base2new"): _coop_base2new}


def protocol_overrides(method: str, protocol: str, dataset: str) -> dict:
    """{name: Sourced} that replace the (method, dataset) preset under `protocol`."""
    make = PROTOCOL_OVERRIDES.get((method, protocol))
    return make(dataset) if make is not None and dataset != EMBEDDED else {}


def _cocoop(dataset: str) -> dict:
    cfg = f"{_COOP}/configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
    return {**_COMMON, "epochs": Sourced(10, f"{cfg}:L1-35 (OPTIM.MAX_EPOCH)"),
            "n_ctx": Sourced(4, f"{cfg}:L1-35 (TRAINER.COCOOP)"), "ctx_init": Sourced("a photo of a", f"{cfg}:L1-35 (TRAINER.COCOOP)"),
            "batch_size": Sourced(1, f"{cfg}:L1-35 (DATALOADER.TRAIN_X.BATCH_SIZE)"), "lr": Sourced(0.002, f"{cfg}:L1-35 (OPTIM.LR)"),
            "seeds": Sourced((1, 2, 3), f"{_COOP}/scripts/cocoop/base2new_train.sh:L13-31")}


def _gopro(dataset: str) -> dict:
    cfg = f"{_GOPRO}/configs/trainers/GOPro/vit_b16.yaml"
    return {**_COMMON, "epochs": Sourced(50, f"{cfg}:L1-35 (OPTIM.MAX_EPOCH)"),
            "n_ctx": Sourced(4, f"{_GOPRO}/scripts/train.sh:L11-14"),
            "ctx_init": Sourced("a photo of a", f"{cfg}:L1-35 (TRAINER.GOPRO.CTX_INIT)"),
            "batch_size": Sourced(4, f"{cfg}:L1-35 (DATALOADER.TRAIN_X.BATCH_SIZE 4, in total per step)"),
            "lr": Sourced(0.002, f"{cfg}:L1-35 (OPTIM.LR)"),
            "seeds": Sourced((1, 2, 3, 4, 5), f"{_GOPRO}/scripts/train.sh:L16")}


def _embedded(method: str) -> dict:
    # The embedded default keeps each method's own embedded settings (Method.embedded_hparams) and
    # the tiny CLIP; only the length is set, in optimiser steps like the leave-one-domain-out
    # quickstart, turned into whole epochs by the runner.
    why = "project: the embedded default runs in seconds on a CPU; 200 steps as the leave-one-domain-out quickstart"
    return {"backbone": Sourced("tiny-digits", "project: the embedded tiny CLIP (offline)"),
            "pretrained": Sourced("default", "project: the weights `dgclip pretrain` writes"),
            "shots": Sourced(16, f"{_GOPRO}/scripts/train.sh:L11-14 (SHOTS=16)"),
            "budget_steps": Sourced(200, why),
            "warmup_epochs": Sourced(1, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.WARMUP_*: 1 constant epoch at 1e-5)"),
            "warmup_lr": Sourced(1e-5, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (OPTIM.WARMUP_*: 1 constant epoch at 1e-5)"),
            "transforms": Sourced("method", "project: 32 px digits; a flip or a random crop changes a digit"),
            "eval_batch_size": Sourced(100, f"{_COOP}/configs/trainers/CoOp/vit_b16.yaml (DATALOADER.TEST.BATCH_SIZE 100)"),
            "seeds": Sourced((1, 2, 3), f"{_COOP}/scripts/coop/main.sh:L14")}


def _zeroshot(dataset: str) -> dict:
    # CLIP's row of the base-to-new tables: CoOp's zero-shot trainer with its per-dataset template
    from ..data.coop_suite.templates import TEMPLATE_SOURCE, template_for

    keep = ("backbone", "pretrained", "shots", "transforms", "eval_batch_size", "seeds")
    return {**{k: _COMMON[k] for k in keep}, "template": Sourced(template_for(dataset), TEMPLATE_SOURCE)}


PRESETS: dict = {}
for _ds in TRAINABLE_DATASETS:
    PRESETS[("zero-shot", _ds)] = _zeroshot(_ds)
    PRESETS[("coop", _ds)] = _coop(_ds)
    PRESETS[("cocoop", _ds)] = _cocoop(_ds)
    PRESETS[("gopro", _ds)] = _gopro(_ds)
for _m in ("coop", "cocoop", "gopro", "zero-shot"):
    PRESETS[(_m, EMBEDDED)] = _embedded(_m)
