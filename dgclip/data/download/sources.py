"""Where every dataset's files come from, what they unpack to, and how the result is checked.

Sources: DomainBed ``domainbed/scripts/download.py`` (facebookresearch/DomainBed@b93c22a), Dassl's
dataset classes (KaiyangZhou/Dassl.pytorch@c61a1b5) and CoOp's ``DATASETS.md``
(KaiyangZhou/CoOp@ff61507); line numbers in BENCHMARKS.md B1, B4, A1. None of these repositories
publishes a checksum: ``sha256=None`` marks a digest the project does not know, and the digest of
what was fetched is then written into the dataset's manifest (``dgclip-download.json``) so other
machines can compare. A mirror (``--mirror URL``) serves every file as ``URL/<file name>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import steps

__all__ = ["RemoteFile", "DatasetDownload", "SOURCES", "gdrive", "get_source", "names"]


def gdrive(file_id: str) -> str:
    return f"https://drive.google.com/uc?export=download&id={file_id}"


@dataclass(frozen=True)
class RemoteFile:
    name: str                      # file name: what a mirror serves and what the archive is saved as
    url: str
    source: str                    # where the URL comes from
    sha256: Optional[str] = None   # None: no published digest; recorded in the manifest instead


@dataclass(frozen=True)
class DatasetDownload:
    name: str                       # `dgclip download NAME`
    target: str                     # folder under --root the dataset ends up in
    files: tuple = ()
    build: Optional[Callable] = None  # steps.*: raw unpacked files -> the dataset folder
    catalog: Optional[str] = None   # catalogue key: checked as `dgclip datasets` checks it
    required: tuple = ()            # otherwise: paths that must exist (folders non-empty) in the target
    requires: tuple = ()            # other downloads installed first (their files are read)
    manual: Optional[str] = None    # login-only: what to fetch by hand and where to put it
    note: str = ""


_DB = "released: facebookresearch/DomainBed/domainbed/scripts/download.py"
_DASSL = "released: KaiyangZhou/Dassl.pytorch/dassl/data/datasets"
_COOP = "released: KaiyangZhou/CoOp/DATASETS.md"
_DB_RAW = "https://raw.githubusercontent.com/facebookresearch/DomainBed/b93c22a1cfc3b2428398272c1a116c8de1f4139e"
_DN = "http://csr.bu.edu/ftp/visda/2019/multi-source"
_TERRA = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps"


def _split(dataset: str, file_id: str, line: int) -> RemoteFile:
    return RemoteFile(f"split_zhou_{dataset}.json", gdrive(file_id), f"{_COOP}:L{line}")


_CLASSNAMES = RemoteFile("classnames.txt", gdrive("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"), f"{_COOP}:L45")

_IMAGENET_MANUAL = """\
ImageNet needs an account at https://image-net.org (CoOp DATASETS.md L37). Fetch
  ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
and lay them out as
  {target}/images/train/<wnid>/*.JPEG   (1,000 folders)
  {target}/images/val/<wnid>/*.JPEG     (1,000 folders: val sorted into class folders too)
  {target}/classnames.txt               ({classnames})
then run this command again: it checks what you placed."""

_SKETCH_MANUAL = """\
ImageNet-Sketch is distributed through the links in https://github.com/HaohanWang/ImageNet-Sketch
(CoOp DATASETS.md L198). Unpack it as
  {target}/images/<wnid>/*.JPEG   (1,000 folders)
  {target}/classnames.txt         ({classnames})
then run this command again: it checks what you placed."""


SOURCES: dict[str, DatasetDownload] = {s.name: s for s in [
    # ---- DomainBed (BENCHMARKS.md B1) -------------------------------------------------------------
    DatasetDownload("pacs", "PACS", (RemoteFile("PACS.zip", gdrive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"),
                                                f"{_DB}:L121"),),
                    steps.moves([("kfold", "")]), catalog="pacs", note="DomainBed renames kfold/ to PACS/"),
    DatasetDownload("vlcs", "VLCS", (RemoteFile("VLCS.tar.gz", gdrive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),
                                                f"{_DB}:L103"),),
                    steps.moves([("VLCS", "")]), catalog="vlcs"),
    DatasetDownload("officehome", "office_home",
                    (RemoteFile("office_home.zip", gdrive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), f"{_DB}:L134"),),
                    steps.moves([("OfficeHomeDataset_10072016", "")]), catalog="officehome",
                    note="DomainBed renames OfficeHomeDataset_10072016/ to office_home/"),
    DatasetDownload("terraincognita", "terra_incognita",
                    (RemoteFile("eccv_18_all_images_sm.tar.gz", f"{_TERRA}/eccv_18_all_images_sm.tar.gz",
                                f"{_DB}:L175-182"),
                     RemoteFile("eccv_18_annotations.tar.gz", f"{_TERRA}/eccv_18_annotations.tar.gz",
                                f"{_DB}:L175-182")),
                    steps.terra_incognita, catalog="terraincognita",
                    note="rebuilt from the five annotation files: locations 38, 43, 46, 100; ten classes"),
    DatasetDownload("domainnet", "domain_net",
                    (RemoteFile("clipart.zip", f"{_DN}/groundtruth/clipart.zip", f"{_DB}:L147-154"),
                     RemoteFile("infograph.zip", f"{_DN}/infograph.zip", f"{_DB}:L147-154"),
                     RemoteFile("painting.zip", f"{_DN}/groundtruth/painting.zip", f"{_DB}:L147-154"),
                     RemoteFile("quickdraw.zip", f"{_DN}/quickdraw.zip", f"{_DB}:L147-154"),
                     RemoteFile("real.zip", f"{_DN}/real.zip", f"{_DB}:L147-154"),
                     RemoteFile("sketch.zip", f"{_DN}/sketch.zip", f"{_DB}:L147-154"),
                     RemoteFile("domain_net_duplicates.txt", f"{_DB_RAW}/domainbed/misc/domain_net_duplicates.txt",
                                f"{_DB}:L159-164",
                                # the file at the pinned commit (9,431 lines), hashed from a clone
                                sha256="a52b4ab70203f4f3df381077694dba3e33ff44c26407e1c5faca76919c702770")),
                    steps.domain_net, catalog="domainnet",
                    note="the images DomainBed lists as duplicates are deleted"),
    # ---- Dassl DG (BENCHMARKS.md B4) ----------------------------------------------------------------
    DatasetDownload("digits-dg", "digits_dg",
                    (RemoteFile("digits_dg.zip", gdrive("15V7EsHfCcfbKgsDmzQKj_DfXt_XYp_P7"),
                                f"{_DASSL}/dg/digits_dg.py:L31-57"),),
                    steps.digits_dg, catalog="digits-dg"),
    DatasetDownload("mini-domainnet", "mini_domainnet",
                    (RemoteFile("splits_mini.zip", gdrive("15rrLDCrzyi6ZY-1vJar3u7plgLe4COL7"),
                                "released: KaiyangZhou/Dassl.pytorch/DATASETS.md:L163-165"),),
                    steps.mini_domainnet, catalog="mini-domainnet", requires=("domainnet",),
                    note="Dassl's split lists; the images are linked out of the installed DomainNet"),
    # ---- CoOp suite (BENCHMARKS.md A1): target = CoOp's dataset_dir --------------------------------
    DatasetDownload("caltech101", "caltech-101",
                    (RemoteFile("101_ObjectCategories.tar.gz",
                                "http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz",
                                f"{_COOP}:L49"),
                     _split("Caltech101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", 50)),
                    steps.moves([("101_ObjectCategories", "101_ObjectCategories"),
                                 ("split_zhou_Caltech101.json", "split_zhou_Caltech101.json")]),
                    required=("101_ObjectCategories/", "split_zhou_Caltech101.json")),
    DatasetDownload("oxford_pets", "oxford_pets",
                    (RemoteFile("images.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                                f"{_COOP}:L61"),
                     RemoteFile("annotations.tar.gz",
                                "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz", f"{_COOP}:L62"),
                     _split("OxfordPets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", 63)),
                    steps.moves([("images", "images"), ("annotations", "annotations"),
                                 ("split_zhou_OxfordPets.json", "split_zhou_OxfordPets.json")]),
                    required=("images/", "annotations/", "split_zhou_OxfordPets.json")),
    DatasetDownload("stanford_cars", "stanford_cars",
                    (RemoteFile("cars_train.tgz", "http://ai.stanford.edu/~jkrause/car196/cars_train.tgz", f"{_COOP}:L75"),
                     RemoteFile("cars_test.tgz", "http://ai.stanford.edu/~jkrause/car196/cars_test.tgz", f"{_COOP}:L76"),
                     RemoteFile("car_devkit.tgz", "https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", f"{_COOP}:L77"),
                     RemoteFile("cars_test_annos_withlabels.mat",
                                "http://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat", f"{_COOP}:L78"),
                     _split("StanfordCars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT", 79)),
                    steps.moves([("cars_train", "cars_train"), ("cars_test", "cars_test"), ("devkit", "devkit"),
                                 ("cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat"),
                                 ("split_zhou_StanfordCars.json", "split_zhou_StanfordCars.json")]),
                    required=("cars_train/", "cars_test/", "devkit/", "split_zhou_StanfordCars.json"),
                    note="the Stanford host has been offline at times: --mirror with a lab copy then"),
    DatasetDownload("oxford_flowers", "oxford_flowers",
                    (RemoteFile("102flowers.tgz", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                                f"{_COOP}:L93"),
                     RemoteFile("imagelabels.mat", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                                f"{_COOP}:L93"),
                     RemoteFile("cat_to_name.json", gdrive("1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"), f"{_COOP}:L94"),
                     _split("OxfordFlowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", 95)),
                    steps.moves([("jpg", "jpg"), ("imagelabels.mat", "imagelabels.mat"),
                                 ("cat_to_name.json", "cat_to_name.json"),
                                 ("split_zhou_OxfordFlowers.json", "split_zhou_OxfordFlowers.json")]),
                    required=("jpg/", "imagelabels.mat", "cat_to_name.json", "split_zhou_OxfordFlowers.json")),
    DatasetDownload("food101", "food-101",
                    (RemoteFile("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", f"{_COOP}:L107"),
                     _split("Food101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", 108)),
                    steps.moves([("food-101/images", "images"), ("split_zhou_Food101.json", "split_zhou_Food101.json")]),
                    required=("images/", "split_zhou_Food101.json")),
    DatasetDownload("fgvc_aircraft", "fgvc_aircraft",
                    (RemoteFile("fgvc-aircraft-2013b.tar.gz",
                                "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                                f"{_COOP}:L121-123"),),
                    steps.moves([("fgvc-aircraft-2013b/data", "")]),
                    required=("images/", "variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                              "images_variant_test.txt"),
                    note="only data/ is kept, renamed to fgvc_aircraft/ (CoOp DATASETS.md L121-123)"),
    DatasetDownload("sun397", "sun397",
                    (RemoteFile("SUN397.tar.gz", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                                f"{_COOP}:L134"),
                     RemoteFile("Partitions.zip", "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip",
                                f"{_COOP}:L135"),
                     _split("SUN397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", 137)),
                    steps.sun397, required=("SUN397/", "ClassName.txt", "split_zhou_SUN397.json")),
    DatasetDownload("dtd", "dtd",
                    (RemoteFile("dtd-r1.0.1.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                                f"{_COOP}:L148"),
                     _split("DescribableTextures", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", 149)),
                    steps.moves([("dtd/images", "images"),
                                 ("split_zhou_DescribableTextures.json", "split_zhou_DescribableTextures.json")]),
                    required=("images/", "split_zhou_DescribableTextures.json")),
    DatasetDownload("eurosat", "eurosat",
                    (RemoteFile("EuroSAT.zip", "http://madm.dfki.de/files/sentinel/EuroSAT.zip", f"{_COOP}:L162"),
                     _split("EuroSAT", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", 163)),
                    steps.moves([("2750", "2750"), ("split_zhou_EuroSAT.json", "split_zhou_EuroSAT.json")]),
                    required=("2750/", "split_zhou_EuroSAT.json")),
    DatasetDownload("ucf101", "ucf101",
                    (RemoteFile("UCF-101-midframes.zip", gdrive("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"), f"{_COOP}:L174"),
                     _split("UCF101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", 175)),
                    steps.moves([("UCF-101-midframes", "UCF-101-midframes"),
                                 ("split_zhou_UCF101.json", "split_zhou_UCF101.json")]),
                    required=("UCF-101-midframes/", "split_zhou_UCF101.json")),
    DatasetDownload("imagenetv2", "imagenetv2",
                    (RemoteFile("imagenetv2-matched-frequency.tar.gz",
                                "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz",
                                f"{_COOP}:L187"), _CLASSNAMES),
                    steps.moves([("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),
                                 ("classnames.txt", "classnames.txt")]),
                    required=("imagenetv2-matched-frequency-format-val/", "classnames.txt")),
    DatasetDownload("imagenet_a", "imagenet-adversarial",
                    (RemoteFile("imagenet-a.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                                f"{_COOP}:L211 (the archive link of github.com/hendrycks/natural-adv-examples)"),
                     _CLASSNAMES),
                    steps.moves([("imagenet-a", "imagenet-a"), ("classnames.txt", "classnames.txt")]),
                    required=("imagenet-a/", "classnames.txt")),
    DatasetDownload("imagenet_r", "imagenet-rendition",
                    (RemoteFile("imagenet-r.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                                f"{_COOP}:L223 (the archive link of github.com/hendrycks/imagenet-r)"),
                     _CLASSNAMES),
                    steps.moves([("imagenet-r", "imagenet-r"), ("classnames.txt", "classnames.txt")]),
                    required=("imagenet-r/", "classnames.txt")),
    DatasetDownload("imagenet", "imagenet", required=("images/train/", "images/val/", "classnames.txt"),
                    manual=_IMAGENET_MANUAL),
    DatasetDownload("imagenet_sketch", "imagenet-sketch", required=("images/", "classnames.txt"),
                    manual=_SKETCH_MANUAL),
]}


def names() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> DatasetDownload:
    """The download entry for `name` (case and -/_ insensitive); unknown names list close matches."""
    import difflib

    from .remote import DownloadError

    key = name.strip().lower()
    canon = {k.replace("_", "-"): k for k in SOURCES}
    hit = SOURCES.get(key) or SOURCES.get(canon.get(key.replace("_", "-"), ""))
    if hit is None:
        close = difflib.get_close_matches(key, list(SOURCES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DownloadError(f"unknown dataset {name!r}{hint} (known: {', '.join(names())})")
    return hit
