"""Dataset catalogue: explicit domain and class lists (DomainBed layout) and open-set splits.

Layout on disk: ``<root>/<dirname>/<domain>/<class>/<image>``. Domain order follows DomainBed;
class order is the sorted folder order (what torchvision's ImageFolder uses), so indices agree
with DomainBed checkpoints. Open-set splits name their known / unknown classes explicitly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["DatasetSpec", "OpenSetSpec", "get_spec", "list_datasets", "UnknownDatasetError",
           "register_dataset", "is_path_dataset"]


class UnknownDatasetError(KeyError):
    def __str__(self):
        return str(self.args[0])


@dataclass(frozen=True)
class OpenSetSpec:
    """Known classes (trained on) and target-only unknown classes, all by NAME.

    per_source_known: maps a domain name to the known classes it carries when it is a source
    (others are removed from its training data); None = homogeneous (every source carries every
    known class).
    source_patterns: ODG-CLIP / DAML splits: the known classes of source 1, 2, 3 BY POSITION
    (the sources in DomainBed order, whichever domain is the target); needs exactly that many
    sources.
    target_known: the known classes kept in the target's test set (None = every known class);
    target images of other known classes are left out, as in the published protocols.
    """

    known: tuple[str, ...]
    unknown: tuple[str, ...]
    per_source_known: Optional[dict] = None
    note: str = ""
    source_patterns: Optional[tuple] = None
    target_known: Optional[tuple] = None

    def source_classes(self, sources: list[str]) -> Optional[dict]:
        """{source domain: its known classes} for this run's sources, or None (homogeneous)."""
        if self.source_patterns is not None:
            if len(sources) != len(self.source_patterns):
                raise ValueError(f"this open-set split defines {len(self.source_patterns)} sources by position; "
                                 f"got {len(sources)}: {sources}")
            return {d: tuple(p) for d, p in zip(sources, self.source_patterns)}
        if self.per_source_known is not None:
            return {d: tuple(self.per_source_known.get(d, self.known)) for d in sources}
        return None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    dirname: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    text_names: dict = field(default_factory=dict)  # class folder -> text used in prompts
    open_set: Optional[OpenSetSpec] = None
    embedded: bool = False  # built on first use by dgclip.data.embedded

    def classname(self, cls: str) -> str:
        if cls in self.text_names:
            return self.text_names[cls]
        return cls.replace("_", " ").replace("-", " ").lower()

    @property
    def classnames(self) -> list[str]:
        return [self.classname(c) for c in self.classes]


DOMAINNET_CLASSES = (
    'The_Eiffel_Tower', 'The_Great_Wall_of_China', 'The_Mona_Lisa', 'aircraft_carrier', 'airplane',
    'alarm_clock', 'ambulance', 'angel', 'animal_migration', 'ant', 'anvil', 'apple', 'arm',
    'asparagus', 'axe', 'backpack', 'banana', 'bandage', 'barn', 'baseball', 'baseball_bat',
    'basket', 'basketball', 'bat', 'bathtub', 'beach', 'bear', 'beard', 'bed', 'bee', 'belt',
    'bench', 'bicycle', 'binoculars', 'bird', 'birthday_cake', 'blackberry', 'blueberry', 'book',
    'boomerang', 'bottlecap', 'bowtie', 'bracelet', 'brain', 'bread', 'bridge', 'broccoli',
    'broom', 'bucket', 'bulldozer', 'bus', 'bush', 'butterfly', 'cactus', 'cake', 'calculator',
    'calendar', 'camel', 'camera', 'camouflage', 'campfire', 'candle', 'cannon', 'canoe', 'car',
    'carrot', 'castle', 'cat', 'ceiling_fan', 'cell_phone', 'cello', 'chair', 'chandelier',
    'church', 'circle', 'clarinet', 'clock', 'cloud', 'coffee_cup', 'compass', 'computer',
    'cookie', 'cooler', 'couch', 'cow', 'crab', 'crayon', 'crocodile', 'crown', 'cruise_ship',
    'cup', 'diamond', 'dishwasher', 'diving_board', 'dog', 'dolphin', 'donut', 'door', 'dragon',
    'dresser', 'drill', 'drums', 'duck', 'dumbbell', 'ear', 'elbow', 'elephant', 'envelope',
    'eraser', 'eye', 'eyeglasses', 'face', 'fan', 'feather', 'fence', 'finger', 'fire_hydrant',
    'fireplace', 'firetruck', 'fish', 'flamingo', 'flashlight', 'flip_flops', 'floor_lamp',
    'flower', 'flying_saucer', 'foot', 'fork', 'frog', 'frying_pan', 'garden', 'garden_hose',
    'giraffe', 'goatee', 'golf_club', 'grapes', 'grass', 'guitar', 'hamburger', 'hammer', 'hand',
    'harp', 'hat', 'headphones', 'hedgehog', 'helicopter', 'helmet', 'hexagon', 'hockey_puck',
    'hockey_stick', 'horse', 'hospital', 'hot_air_balloon', 'hot_dog', 'hot_tub', 'hourglass',
    'house', 'house_plant', 'hurricane', 'ice_cream', 'jacket', 'jail', 'kangaroo', 'key',
    'keyboard', 'knee', 'knife', 'ladder', 'lantern', 'laptop', 'leaf', 'leg', 'light_bulb',
    'lighter', 'lighthouse', 'lightning', 'line', 'lion', 'lipstick', 'lobster', 'lollipop',
    'mailbox', 'map', 'marker', 'matches', 'megaphone', 'mermaid', 'microphone', 'microwave',
    'monkey', 'moon', 'mosquito', 'motorbike', 'mountain', 'mouse', 'moustache', 'mouth', 'mug',
    'mushroom', 'nail', 'necklace', 'nose', 'ocean', 'octagon', 'octopus', 'onion', 'oven', 'owl',
    'paint_can', 'paintbrush', 'palm_tree', 'panda', 'pants', 'paper_clip', 'parachute', 'parrot',
    'passport', 'peanut', 'pear', 'peas', 'pencil', 'penguin', 'piano', 'pickup_truck',
    'picture_frame', 'pig', 'pillow', 'pineapple', 'pizza', 'pliers', 'police_car', 'pond', 'pool',
    'popsicle', 'postcard', 'potato', 'power_outlet', 'purse', 'rabbit', 'raccoon', 'radio',
    'rain', 'rainbow', 'rake', 'remote_control', 'rhinoceros', 'rifle', 'river', 'roller_coaster',
    'rollerskates', 'sailboat', 'sandwich', 'saw', 'saxophone', 'school_bus', 'scissors',
    'scorpion', 'screwdriver', 'sea_turtle', 'see_saw', 'shark', 'sheep', 'shoe', 'shorts',
    'shovel', 'sink', 'skateboard', 'skull', 'skyscraper', 'sleeping_bag', 'smiley_face', 'snail',
    'snake', 'snorkel', 'snowflake', 'snowman', 'soccer_ball', 'sock', 'speedboat', 'spider',
    'spoon', 'spreadsheet', 'square', 'squiggle', 'squirrel', 'stairs', 'star', 'steak', 'stereo',
    'stethoscope', 'stitches', 'stop_sign', 'stove', 'strawberry', 'streetlight', 'string_bean',
    'submarine', 'suitcase', 'sun', 'swan', 'sweater', 'swing_set', 'sword', 'syringe', 't-shirt',
    'table', 'teapot', 'teddy-bear', 'telephone', 'television', 'tennis_racquet', 'tent', 'tiger',
    'toaster', 'toe', 'toilet', 'tooth', 'toothbrush', 'toothpaste', 'tornado', 'tractor',
    'traffic_light', 'train', 'tree', 'triangle', 'trombone', 'truck', 'trumpet', 'umbrella',
    'underwear', 'van', 'vase', 'violin', 'washing_machine', 'watermelon', 'waterslide', 'whale',
    'wheel', 'windmill', 'wine_bottle', 'wine_glass', 'wristwatch', 'yoga', 'zebra', 'zigzag',
)

MINI_DOMAINNET_CLASSES = (
    'The_Eiffel_Tower', 'The_Great_Wall_of_China', 'aircraft_carrier', 'alarm_clock', 'ant',
    'anvil', 'asparagus', 'axe', 'banana', 'basket', 'bathtub', 'bear', 'bee', 'bird',
    'blackberry', 'blueberry', 'bottlecap', 'broccoli', 'bus', 'butterfly', 'cactus', 'cake',
    'calculator', 'camel', 'camera', 'candle', 'cannon', 'canoe', 'carrot', 'castle', 'cat',
    'ceiling_fan', 'cell_phone', 'cello', 'chair', 'chandelier', 'coffee_cup', 'compass',
    'computer', 'cow', 'crab', 'crocodile', 'cruise_ship', 'dog', 'dolphin', 'dragon', 'drums',
    'duck', 'dumbbell', 'elephant', 'eyeglasses', 'feather', 'fence', 'fish', 'flamingo', 'flower',
    'foot', 'fork', 'frog', 'giraffe', 'goatee', 'grapes', 'guitar', 'hammer', 'helicopter',
    'helmet', 'horse', 'kangaroo', 'lantern', 'laptop', 'leaf', 'lion', 'lipstick', 'lobster',
    'microphone', 'monkey', 'mosquito', 'mouse', 'mug', 'mushroom', 'onion', 'panda', 'peanut',
    'pear', 'peas', 'pencil', 'penguin', 'pig', 'pillow', 'pineapple', 'potato', 'power_outlet',
    'purse', 'rabbit', 'raccoon', 'rhinoceros', 'rifle', 'saxophone', 'screwdriver', 'sea_turtle',
    'see_saw', 'sheep', 'shoe', 'skateboard', 'snake', 'speedboat', 'spider', 'squirrel',
    'strawberry', 'streetlight', 'string_bean', 'submarine', 'swan', 'table', 'teapot',
    'teddy-bear', 'television', 'tiger', 'toe', 'train', 'truck', 'umbrella', 'vase', 'watermelon',
    'whale', 'zebra',
)

OFFICEHOME_CLASSES = (
    'Alarm_Clock', 'Backpack', 'Batteries', 'Bed', 'Bike', 'Bottle', 'Bucket', 'Calculator',
    'Calendar', 'Candles', 'Chair', 'Clipboards', 'Computer', 'Couch', 'Curtains', 'Desk_Lamp',
    'Drill', 'Eraser', 'Exit_Sign', 'Fan', 'File_Cabinet', 'Flipflops', 'Flowers', 'Folder',
    'Fork', 'Glasses', 'Hammer', 'Helmet', 'Kettle', 'Keyboard', 'Knives', 'Lamp_Shade', 'Laptop',
    'Marker', 'Monitor', 'Mop', 'Mouse', 'Mug', 'Notebook', 'Oven', 'Pan', 'Paper_Clip', 'Pen',
    'Pencil', 'Postit_Notes', 'Printer', 'Push_Pin', 'Radio', 'Refrigerator', 'Ruler', 'Scissors',
    'Screwdriver', 'Shelf', 'Sink', 'Sneakers', 'Soda', 'Speaker', 'Spoon', 'TV', 'Table',
    'Telephone', 'ToothBrush', 'Toys', 'Trash_Can', 'Webcam',
)

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")
TERRA_CLASSES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon",
                 "squirrel")
DIGITS = tuple(str(i) for i in range(10))
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEXT = dict(zip(DIGITS, DIGIT_WORDS))
ROTATIONS = (0, 15, 30, 45, 60, 75)


def _without(classes, drop):
    return tuple(c for c in classes if c not in drop)


def _idx(*parts) -> tuple[int, ...]:
    """Class indices from ints and inclusive (lo, hi) ranges, in the order given."""
    out = []
    for p in parts:
        out += list(range(p[0], p[1] + 1)) if isinstance(p, tuple) else [p]
    return tuple(out)


def _names(classes, idx) -> tuple[str, ...]:
    return tuple(classes[i] for i in idx)


def _odg_split(classes, sources, known, target_known, unknown, note) -> OpenSetSpec:
    """An ODG-CLIP / DAML split from DESIGN.md sec. 3's index table (sorted class folders)."""
    return OpenSetSpec(_names(classes, known), _names(classes, unknown), note=note,
                       source_patterns=tuple(_names(classes, p) for p in sources),
                       target_known=_names(classes, target_known))


# ODG-CLIP (CVPR 2024) / DAML index patterns, applied to sorted class folders as ODG-CLIP and
# SeeCLIP do (not DAML's own OfficeHome CLASSES order).
ODG_SPLITS = {
    "pacs": dict(sources=[(3, 0, 1), (4, 0, 2), (5, 1, 2)], known=_idx((0, 5)), target_known=_idx((0, 5)),
                 unknown=(6,)),
    "vlcs": dict(sources=[(0, 1), (1, 2), (2, 3)], known=_idx((0, 3)), target_known=_idx((0, 3)), unknown=(4,)),
    "officehome": dict(sources=[_idx((0, 14), (21, 31)), _idx((0, 8), (15, 20), (32, 42)),
                                _idx((0, 2), (9, 20), (43, 53))],
                       known=_idx((0, 53)), target_known=(0, 3, 4, 9, 10, 15, 16, 21, 22, 23, 32, 33, 34, 43, 44, 45),
                       unknown=_idx((54, 64))),
    "digits-dg": dict(sources=[(0, 1, 2), (2, 3, 4), (4, 5, 6)], known=_idx((0, 6)), target_known=_idx((0, 6)),
                      unknown=_idx((7, 9))),
    "mini-domainnet": dict(sources=[_idx((0, 19), (40, 59)), _idx((0, 9), (20, 39), (80, 89)),
                                    _idx((10, 19), (40, 49), (60, 79))],
                           known=_idx((0, 89)),
                           target_known=_idx((0, 4), (8, 17), (25, 34), (43, 47), (75, 79), (83, 87)),
                           unknown=_idx((90, 125))),
}


_OH_DOMAINS = ("Art", "Clipart", "Product", "Real World")
_MINI_DOMAINS = ("clipart", "painting", "real", "sketch")

_SPECS: dict[str, DatasetSpec] = {}
# open-set split files passed as --dataset (YAML only where a YAML parser is installed)
SPLIT_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def register_dataset(key: str, spec: DatasetSpec) -> DatasetSpec:
    _SPECS[key.lower()] = spec
    return spec


register_dataset("pacs", DatasetSpec("PACS", "PACS", ("art_painting", "cartoon", "photo", "sketch"),
                                     PACS_CLASSES))
register_dataset("vlcs", DatasetSpec("VLCS", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
                                     VLCS_CLASSES))
register_dataset("officehome", DatasetSpec("OfficeHome", "office_home", _OH_DOMAINS, OFFICEHOME_CLASSES))
register_dataset("terraincognita", DatasetSpec(
    "TerraIncognita", "terra_incognita", ("location_100", "location_38", "location_43", "location_46"),
    TERRA_CLASSES))
register_dataset("domainnet", DatasetSpec(
    "DomainNet", "domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    DOMAINNET_CLASSES))
register_dataset("digits-dg", DatasetSpec("Digits-DG", "digits_dg", ("mnist", "mnist_m", "svhn", "syn"),
                                          DIGITS, DIGIT_TEXT))
register_dataset("mini-domainnet", DatasetSpec("Mini-DomainNet", "mini_domainnet", _MINI_DOMAINS,
                                               MINI_DOMAINNET_CLASSES))
register_dataset("rotated-digits", DatasetSpec(
    "rotated-digits", "rotated_digits", tuple(f"rot{a}" for a in ROTATIONS), DIGITS, DIGIT_TEXT,
    embedded=True))

# Open-set variants (DESIGN.md sec. 3). Homogeneous (MEDIC, SeeCLIP's PACS/VLCS): every source
# carries every known class. ODG-CLIP/DAML: per-source subsets by source position.
_ODG_NOTE = "ODG-CLIP/DAML per-source subsets (index pattern on sorted class folders), sources by position"


def _odg(base: str, key: str, name: str) -> DatasetSpec:
    b = _SPECS[base]
    return DatasetSpec(name, b.dirname, b.domains, b.classes, b.text_names,
                       open_set=_odg_split(b.classes, note=_ODG_NOTE, **ODG_SPLITS[key]))


register_dataset("pacs-open", DatasetSpec(
    "PACS-open", "PACS", _SPECS["pacs"].domains, PACS_CLASSES,
    open_set=OpenSetSpec(_without(PACS_CLASSES, {"person"}), ("person",),
                         note="homogeneous: SeeCLIP and MEDIC (known dog..house, unknown person)")))
register_dataset("pacs-open-odgclip", _odg("pacs", "pacs", "PACS-open-odgclip"))
register_dataset("vlcs-open", DatasetSpec(
    "VLCS-open", "VLCS", _SPECS["vlcs"].domains, VLCS_CLASSES,
    open_set=OpenSetSpec(_without(VLCS_CLASSES, {"person"}), ("person",), note="homogeneous: SeeCLIP")))
register_dataset("vlcs-open-odgclip", _odg("vlcs", "vlcs", "VLCS-open-odgclip"))
register_dataset("officehome-open", _odg("officehome", "officehome", "OfficeHome-open"))
register_dataset("officehome-open-medic", DatasetSpec(
    "OfficeHome-open-medic", "office_home", _OH_DOMAINS, OFFICEHOME_CLASSES,
    open_set=OpenSetSpec(OFFICEHOME_CLASSES[:40], OFFICEHOME_CLASSES[40:],
                         note="homogeneous: MEDIC (Alarm_Clock..Oven known, Pan..Webcam unknown)")))
register_dataset("mini-domainnet-open", _odg("mini-domainnet", "mini-domainnet", "Mini-DomainNet-open"))
register_dataset("digits-dg-open", DatasetSpec(
    "Digits-DG-open", "digits_dg", _SPECS["digits-dg"].domains, DIGITS, DIGIT_TEXT,
    open_set=OpenSetSpec(DIGITS[:6], DIGITS[6:], note="homogeneous: MEDIC (0-5 known, 6-9 unknown)")))
register_dataset("digits-dg-open-odgclip", _odg("digits-dg", "digits-dg", "Digits-DG-open-odgclip"))
register_dataset("rotated-digits-open", DatasetSpec(
    "rotated-digits-open", "rotated_digits", _SPECS["rotated-digits"].domains, DIGITS, DIGIT_TEXT,
    open_set=OpenSetSpec(DIGITS[:6], DIGITS[6:], note="homogeneous, as Digits-DG in MEDIC"), embedded=True))


def is_path_dataset(name: str) -> bool:
    """A dataset named by path (a DomainBed-layout folder, or an open-set split file) rather than
    by a registered name: anything with a path separator, a leading '.' or '~', or a split file."""
    name = str(name)
    return (os.sep in name or "/" in name or name.startswith((".", "~"))
            or name.lower().endswith(SPLIT_FILE_SUFFIXES))


def get_spec(name: str) -> DatasetSpec:
    """A registered dataset by name, or a dataset by path: a DomainBed-layout folder
    (dgclip.data.folder) or an open-set split file naming its classes (dgclip.data.open_split)."""
    key = str(name).lower()
    if key in _SPECS:
        return _SPECS[key]
    if is_path_dataset(name):
        if key.endswith(SPLIT_FILE_SUFFIXES):
            from .open_split import load_open_split

            return load_open_split(name)
        from .folder import folder_spec

        return folder_spec(name)
    raise UnknownDatasetError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}, "
                              "or a path to a DomainBed-layout folder (<folder>/<domain>/<class>/<image>) "
                              "or to an open-set split file (.json)")


def list_datasets() -> list[str]:
    return list(_SPECS)
