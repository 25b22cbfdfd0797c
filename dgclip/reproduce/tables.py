"""The grids behind the published tables `dgclip reproduce` runs, as data.

A table is one or more sweep groups (methods x datasets x test domains x trial seeds) run with
`--preset paper`; each group becomes one `dgclip sweep launch` into the table's sweep folder.
Rows of a published table that no method here implements (ERM, CORAL, DANN, MEDIC, ODG-CLIP,
MaPLe) are listed as such and not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..presets.domainbed import DOMAINBED_DATASETS, OPEN_SET_DATASETS

__all__ = ["Group", "Table", "TABLES", "COOP_SUITE_TARGETS", "get_table"]

COOP_SUITE_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                      "sun397", "dtd", "eurosat", "ucf101")


@dataclass(frozen=True)
class Group:
    methods: tuple
    datasets: tuple
    test_domains: tuple = ("all",)      # sweep --test-domains (domains, 'a,b' groups, or 'all'); () for few-shot
    targets: tuple = ()                 # cross-dataset: the datasets the trained model is evaluated on
    n_trials: int = 3
    protocol: str = "loo"               # sweep --protocol (few-shot protocols: base2new, cross-dataset)
    shots: int = 0                      # sweep --shots (0: the protocol does not sample shots)
    note: str = ""


@dataclass(frozen=True)
class Table:
    id: str                             # also dgclip/published/<id>.json
    title: str
    groups: tuple
    not_run: dict = field(default_factory=dict)   # published row -> why it is not in the grid
    notes: tuple = ()


_DPL_DATASETS = tuple(d for d in DOMAINBED_DATASETS if d != "domainnet")  # Table 1 has no DomainNet column

TABLES = {t.id: t for t in [
    Table("dpl-table1", "DPL Table 1: DomainBed, CLIP ViT-B/16, training-domain validation",
          (Group(("zero-shot", "dpl"), _DPL_DATASETS, n_trials=3,
                 note="zero-shot with DPL's template prompt 'a photo of a {}.'; trial seeds 0-2 stand for "
                      "DPL's seeds 1-3 (DomainBed's trial-seed splits)"),),
          not_run={"ERM (CLIP)": "full fine-tuning of CLIP: not a method here",
                   "CORAL": "not a method here", "DANN": "not a method here",
                   "CLIP": "zero-shot with the bare class name: run `zero-shot` with --hparams "
                           "'{\"template\": \"{}\"}' by hand"}),
    Table("odgclip-open", "ODG-CLIP main table: open-set DG, (C+1)-way known accuracy and H-score",
          (Group(("zero-shot", "coop", "cocoop", "seeclip"), ("pacs-open-odgclip", "vlcs-open-odgclip"),
                 note="every domain held out in turn (the released scripts' target is not stated)"),
           Group(("zero-shot", "coop", "cocoop", "seeclip"), ("officehome-open",), ("Real World",),
                 note="Art, Clipart, Product -> Real World as in the released scripts"),
           Group(("zero-shot", "coop", "cocoop", "seeclip"), ("digits-dg-open-odgclip",), ("syn",),
                 note="mnist, mnist_m, svhn -> syn"),
           Group(("zero-shot", "coop", "cocoop", "seeclip"), ("mini-domainnet-open",), ("real",),
                 note="clipart, painting, sketch -> real")),
          not_run={"ODG-CLIP": "not a method here; its code feeds the label at test time",
                   "MEDIC": "not a method here"},
          notes=("Multi-Dataset is not in the catalogue: its column is not run",
                 "selection: training-domain validation here; ODG-CLIP and SeeCLIP select the epoch on the target",)),
    Table("gopro-base2new", "GOPro base-to-new: 16 shots, CLIP ViT-B/16 (Base / New / HM)",
          (Group(("zero-shot", "coop", "cocoop", "gopro"), ("imagenet",) + COOP_SUITE_TARGETS, (),
                 protocol="base2new", shots=16,
                 note="train on the base half, evaluate base and new; GOPro's published rows use seeds 1-5 and "
                      "the best test epoch, here 3 seeds and the last epoch"),),
          not_run={"MaPLe": "not a method here"}),
    Table("gopro-cross-dataset", "GOPro cross-dataset transfer: 16-shot ImageNet -> 10 datasets",
          (Group(("zero-shot", "coop", "cocoop", "gopro"), ("imagenet",), (), targets=COOP_SUITE_TARGETS,
                 protocol="cross-dataset", shots=16,
                 note="one training run per method and seed on ImageNet (all classes), evaluated on each target"),),
          not_run={"MaPLe": "not a method here"}),
]}


# every open-set dataset with paper presets is a column of the ODG-CLIP table
assert {d for g in TABLES["odgclip-open"].groups for d in g.datasets} == set(OPEN_SET_DATASETS)


def get_table(name: str) -> Table:
    import difflib

    if name not in TABLES:
        close = difflib.get_close_matches(name, list(TABLES), n=3, cutoff=0.4)
        raise ValueError(f"unknown table {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" (tables: {', '.join(TABLES)})")
    return TABLES[name]
