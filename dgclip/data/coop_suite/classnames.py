"""Class-name rules of the CoOp dataset readers.

They matter where CoOp builds names itself (FGVCAircraft, ImageNet and its variants) and where a
split file is made; once a `split_zhou_*.json` exists its stored names are read verbatim. They are
kept here so that a split made by a user, or a generated test tree, names classes as CoOp does.
"""
from __future__ import annotations

import re

__all__ = ["CALTECH101_IGNORED", "CALTECH101_RENAMED", "EUROSAT_RENAMED", "caltech101_name",
           "eurosat_name", "sun397_name", "ucf101_name", "pets_breed"]

# CoOp datasets/caltech101.py L10-16
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

# CoOp datasets/eurosat.py L10-21 (Forest and River keep their folder names)
EUROSAT_RENAMED = {
    "AnnualCrop": "Annual Crop Land",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "SeaLake": "Sea or Lake",
}


def caltech101_name(folder: str) -> str:
    return CALTECH101_RENAMED.get(folder, folder)


def eurosat_name(folder: str) -> str:
    return EUROSAT_RENAMED.get(folder, folder)


def sun397_name(entry: str) -> str:
    """`/a/apartment_building/outdoor` -> "outdoor apartment_building": drop the first-letter
    folder, reverse the rest, join with a space (CoOp datasets/sun397.py L61-80)."""
    parts = entry.strip().lstrip("/").split("/")[1:]
    return " ".join(reversed(parts))


def ucf101_name(action: str) -> str:
    """`ApplyEyeMakeup` -> "Apply_Eye_Makeup": split on capitals, join with "_"
    (CoOp datasets/ucf101.py L27-39); the same string names the image folder."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


def pets_breed(filename_stem: str) -> str:
    """`Abyssinian_100` -> "abyssinian" (CoOp datasets/oxford_pets.py L56-74)."""
    return filename_stem.rsplit("_", 1)[0].lower()
