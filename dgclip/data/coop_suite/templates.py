"""Zero-shot prompt templates per dataset, as CoOp's zero-shot trainer uses them
(`CoOp trainers/zsclip.py` L13-29). Prompt learners replace "_" by a space in class names
(`trainers/coop.py` L98-100, `zsclip.py` L43)."""
from __future__ import annotations

__all__ = ["TEMPLATES", "template_for", "prompt_name"]

_SOURCE = "released: KaiyangZhou/CoOp/trainers/zsclip.py:L13-29"

TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
TEMPLATE_SOURCE = _SOURCE


def template_for(dataset: str) -> str:
    return TEMPLATES.get(dataset, "a photo of a {}.")


def prompt_name(classname: str) -> str:
    """The class name as it enters a prompt: "_" -> " " (CoOp `trainers/coop.py` L98-100)."""
    return classname.replace("_", " ")
