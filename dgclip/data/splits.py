"""Protocols (DomainBed conventions): per-domain seeded in/out splits, leave-one-domain-out,
single-source DG, training-domain validation (oracle = target out-split, only when asked) and
open-set DG splits from known / unknown class lists."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .catalog import DatasetSpec
from .domainbed import DataError, Records

__all__ = ["seed_hash", "split_in_out", "Protocol", "make_protocol", "resolve_test_domains"]


def seed_hash(*args) -> int:
    """A stable integer seed from any arguments (same on every machine and Python)."""
    return int(hashlib.md5(repr(args).encode()).hexdigest(), 16) % (2 ** 31)


def split_in_out(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 with `seed`; the first `holdout_fraction` is "out", the rest "in".

    Both parts stay in the shuffled order (DomainBed's `split_dataset`), never sorted back into
    the class-by-class file listing."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    keys = np.random.RandomState(seed).permutation(n)
    n_out = int(n * holdout_fraction)  # truncated, as DomainBed (scripts/train.py:L119-129)
    return keys[n_out:], keys[:n_out]


@dataclass
class Protocol:
    """Everything one (dataset, target domains, trial seed) run needs, as index sets."""

    spec: DatasetSpec
    classnames: list[str]          # what the method classifies (known classes for open set)
    source_domains: list[str]
    target_domains: list[str]
    train: Records                 # source in-splits
    val: dict                      # source domain -> out-split Records (model selection)
    test: dict                     # target domain -> in-split Records
    oracle_val: dict = field(default_factory=dict)  # target domain -> out-split (oracle only)
    label_map: np.ndarray = None   # catalogue class -> method label (unknown -> C)
    domain_map: np.ndarray = None  # catalogue domain -> source index 0..S-1 (targets -> -1)
    open_set: bool = False
    trial_seed: int = 0
    holdout_fraction: float = 0.2
    source_classes: Optional[dict] = None  # open set: {source: [known class names it carries]}
    target_known: Optional[list] = None    # open set: known class names in the target test set
    target_unknown: Optional[list] = None  # open set: unknown (target-only) class names

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def describe(self) -> dict:
        return {"dataset": self.spec.name, "sources": self.source_domains, "targets": self.target_domains,
                "open_set": self.open_set, "num_known": self.num_classes, "trial_seed": self.trial_seed,
                "holdout_fraction": self.holdout_fraction,
                "n_train": len(self.train), "n_val": {k: len(v) for k, v in self.val.items()},
                "n_test": {k: len(v) for k, v in self.test.items()},
                **({"source_classes": self.source_classes, "target_known": self.target_known,
                    "target_unknown": self.target_unknown, "split_note": self.spec.open_set.note}
                   if self.open_set else {})}


def resolve_test_domains(spec: DatasetSpec, test_domain: str) -> list[list[str]]:
    """'all' -> every domain in turn (leave-one-domain-out); 'a,b' -> one run with both held out."""
    if test_domain in (None, "all"):
        return [[d] for d in spec.domains]
    doms = [d.strip() for d in str(test_domain).split(",") if d.strip()]
    for d in doms:
        if d not in spec.domains:
            raise DataError(f"{spec.name}: unknown test domain {d!r}; domains are {list(spec.domains)}")
    return [doms]


def _label_map(spec: DatasetSpec) -> tuple[np.ndarray, list[str]]:
    n = len(spec.classes)
    if spec.open_set is None:
        return np.arange(n, dtype=np.int64), list(spec.classes)
    os_ = spec.open_set
    for name in list(os_.known) + list(os_.unknown) + list(os_.target_known or ()) + \
            [c for v in (os_.per_source_known or {}).values() for c in v] + \
            [c for v in (os_.source_patterns or ()) for c in v]:
        if name not in spec.classes:
            raise DataError(f"{spec.name}: open-set split names unknown class {name!r}")
    stray = set(os_.target_known or ()) - set(os_.known)
    stray |= {c for v in list((os_.per_source_known or {}).values()) + list(os_.source_patterns or ())
              for c in v} - set(os_.known)
    if stray:
        raise DataError(f"{spec.name}: source/target-known classes outside the known list: {sorted(stray)}")
    overlap = set(os_.known) & set(os_.unknown)
    if overlap:
        raise DataError(f"{spec.name}: classes both known and unknown: {sorted(overlap)}")
    m = np.full(n, -1, dtype=np.int64)
    for i, c in enumerate(os_.known):
        m[spec.classes.index(c)] = i
    for c in os_.unknown:
        m[spec.classes.index(c)] = len(os_.known)
    return m, list(os_.known)


def make_protocol(spec: DatasetSpec, records: Records, test_domains: list[str], *, trial_seed: int = 0,
                  holdout_fraction: float = 0.2, train_domains: Optional[list[str]] = None,
                  oracle: bool = False) -> Protocol:
    """Build the index sets of one run.

    test_domains: held-out target domain(s). train_domains: the sources (default: every other
    domain; one name = single-source DG). Each domain's in/out split uses
    seed_hash(trial_seed, domain index), so a domain splits the same way whatever its role.
    """
    for d in list(test_domains) + list(train_domains or []):
        if d not in spec.domains:
            raise DataError(f"{spec.name}: unknown domain {d!r}; domains are {list(spec.domains)}")
    sources = list(train_domains) if train_domains else [d for d in spec.domains if d not in test_domains]
    if set(sources) & set(test_domains):
        raise DataError(f"domains {sorted(set(sources) & set(test_domains))} are both source and target")
    if not sources:
        raise DataError(f"{spec.name}: no source domain left after holding out {test_domains}")
    label_map, classnames = _label_map(spec)
    n_known = len(classnames)
    os_ = spec.open_set
    try:
        per = os_.source_classes(sources) if os_ is not None else None
    except ValueError as exc:
        raise DataError(f"{spec.name}: {exc}") from None
    if os_ is not None:  # target test set: the target's known classes plus every unknown one
        target_keep = label_map.copy()
        if os_.target_known is not None:
            dropped = [spec.classes.index(c) for c in os_.known if c not in set(os_.target_known)]
            target_keep[dropped] = -1
    else:
        target_keep = label_map
    domain_map = np.full(len(spec.domains), -1, dtype=np.int64)
    for i, d in enumerate(sources):
        domain_map[spec.domains.index(d)] = i

    def in_out(dom: str) -> tuple[np.ndarray, np.ndarray]:
        d_idx = spec.domains.index(dom)
        idx = np.flatnonzero(records.domains == d_idx)
        if idx.size == 0:
            raise DataError(f"{spec.name}: domain {dom!r} has no images")
        i_in, i_out = split_in_out(idx.size, holdout_fraction, seed_hash(trial_seed, d_idx))
        return idx[i_in], idx[i_out]

    def source_filter(dom: str, idx: np.ndarray) -> np.ndarray:
        lab = label_map[records.labels[idx]]
        keep = (lab >= 0) & (lab < n_known)  # sources never show unknown classes
        if per is not None and dom in per:
            allowed = np.isin(records.labels[idx], [spec.classes.index(c) for c in per[dom]])
            keep &= allowed
        return idx[keep]

    train_idx, val = [], {}
    for dom in sources:
        i_in, i_out = in_out(dom)
        train_idx.append(source_filter(dom, i_in))
        val[dom] = records.subset(source_filter(dom, i_out))
    test, oracle_val = {}, {}
    for dom in test_domains:
        i_in, i_out = in_out(dom)
        keep = lambda ix: ix[target_keep[records.labels[ix]] >= 0]  # noqa: E731
        test[dom] = records.subset(keep(i_in))
        if oracle:
            oracle_val[dom] = records.subset(keep(i_out))
    if os_ is not None:
        source_classes = {d: list(per[d]) if per is not None else list(os_.known) for d in sources}
        target_known = list(os_.target_known) if os_.target_known is not None else list(os_.known)
        target_unknown = list(os_.unknown)
    else:
        source_classes, target_known, target_unknown = None, None, None
    return Protocol(spec=spec, classnames=classnames, source_domains=sources, target_domains=list(test_domains),
                    source_classes=source_classes, target_known=target_known, target_unknown=target_unknown,
                    train=records.subset(np.concatenate(train_idx)), val=val, test=test, oracle_val=oracle_val,
                    label_map=label_map, domain_map=domain_map, open_set=spec.open_set is not None,
                    trial_seed=trial_seed, holdout_fraction=holdout_fraction)
