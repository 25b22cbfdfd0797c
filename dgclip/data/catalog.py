"""Dataset catalogue: explicit domain and class lists (DomainBed layout) and open-set splits.

Layout on disk: ``<root>/<dirname>/<domain>/<class>/<image>``. Domain order follows DomainBed;
class order is the sorted folder order (what torchvision's ImageFolder uses), so indices agree
with DomainBed checkpoints. Open-set splits name their known / unknown classes explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["DatasetSpec", "OpenSetSpec", "get_spec", "list_datasets", "UnknownDatasetError",
           "register_dataset"]


class UnknownDatasetError(KeyError):
    def __str__(self):
        return str(self.args[0])


@dataclass(frozen=True)
class OpenSetSpec:
    """Known classes (trained on) and target-only unknown classes.

    per_source_known: for DAML-style splits, maps a domain name to the known classes present in
    that domain when it is a source (others are removed from its training data); None = every
    source domain carries every known class (homogeneous).
    """

    known: tuple[str, ...]
    unknown: tuple[str, ...]
    per_source_known: Optional[dict] = None
    note: str = ""


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


def _officehome_daml(domains) -> dict:
    """DAML-style per-source known subsets (INFERRED: the exact published lists were not
    available here). Known = the first 54 classes (sorted order), unknown = the last 11 (target
    only). Classes 0-14 are shared by every source; the remaining 39 known classes are split into
    three private blocks of 13, the i-th domain (DomainBed order) owning block i mod 3, so each
    source sees 28 known classes and the sources jointly cover all 54."""
    known = OFFICEHOME_CLASSES[:54]
    shared, private = known[:15], known[15:]
    blocks = [private[i * 13:(i + 1) * 13] for i in range(3)]
    return {d: tuple(shared) + tuple(blocks[i % 3]) for i, d in enumerate(domains)}


_OH_DOMAINS = ("Art", "Clipart", "Product", "Real World")
_MINI_DOMAINS = ("clipart", "painting", "real", "sketch")

_SPECS: dict[str, DatasetSpec] = {}


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

# Open-set variants (DESIGN.md sec. 3).
register_dataset("pacs-open", DatasetSpec(
    "PACS-open", "PACS", _SPECS["pacs"].domains, PACS_CLASSES,
    open_set=OpenSetSpec(_without(PACS_CLASSES, {"person"}), ("person",))))
register_dataset("vlcs-open", DatasetSpec(
    "VLCS-open", "VLCS", _SPECS["vlcs"].domains, VLCS_CLASSES,
    open_set=OpenSetSpec(_without(VLCS_CLASSES, {"person"}), ("person",))))
register_dataset("officehome-open", DatasetSpec(
    "OfficeHome-open", "office_home", _OH_DOMAINS, OFFICEHOME_CLASSES,
    open_set=OpenSetSpec(OFFICEHOME_CLASSES[:54], OFFICEHOME_CLASSES[54:], _officehome_daml(_OH_DOMAINS),
                         note="DAML-style per-source subsets (INFERRED block layout)")))
register_dataset("officehome-open-homogeneous", DatasetSpec(
    "OfficeHome-open-homogeneous", "office_home", _OH_DOMAINS, OFFICEHOME_CLASSES,
    open_set=OpenSetSpec(OFFICEHOME_CLASSES[:54], OFFICEHOME_CLASSES[54:])))
register_dataset("mini-domainnet-open", DatasetSpec(
    "Mini-DomainNet-open", "mini_domainnet", _MINI_DOMAINS, MINI_DOMAINNET_CLASSES,
    open_set=OpenSetSpec(MINI_DOMAINNET_CLASSES[:90], MINI_DOMAINNET_CLASSES[90:],
                         note="known = first 90 in sorted order (INFERRED)")))
register_dataset("digits-dg-open", DatasetSpec(
    "Digits-DG-open", "digits_dg", _SPECS["digits-dg"].domains, DIGITS, DIGIT_TEXT,
    open_set=OpenSetSpec(DIGITS[:6], DIGITS[6:])))
register_dataset("rotated-digits-open", DatasetSpec(
    "rotated-digits-open", "rotated_digits", _SPECS["rotated-digits"].domains, DIGITS, DIGIT_TEXT,
    open_set=OpenSetSpec(DIGITS[:6], DIGITS[6:]), embedded=True))


def get_spec(name: str) -> DatasetSpec:
    key = name.lower()
    if key not in _SPECS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _SPECS[key]


def list_datasets() -> list[str]:
    return list(_SPECS)
