"""DomainBed's protocol details, each compared with a re-implementation written from DomainBed's
definition (facebookresearch/DomainBed: lib/misc.py split_dataset + seed_hash, scripts/train.py,
model_selection.py, lib/query.py, scripts/collect_results.py), on generated trees and synthetic
sweeps: the truncated validation split, the earliest-step and larger-hparams-seed tie-breaks,
the oracle at the last step, and the population-std error bars."""
import hashlib
import math
import random

import numpy as np
import pytest
from PIL import Image

from dgclip.data.catalog import DatasetSpec
from dgclip.data.domainbed import scan
from dgclip.data.splits import make_protocol
from dgclip.results import select_sweep, summarise
from dgclip.selection import best_step, last_step, mean_and_error, select_hparams_seed, select_in_run


# ---- DomainBed, re-implemented from its definitions -------------------------------------------
def db_seed_hash(*args):
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def db_split_dataset(n, n_out, seed):
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    return keys[:n_out], keys[n_out:]  # (out, in): train.py passes int(len(env) * holdout_fraction)


def db_run_acc_iid(records):  # IIDAccuracySelectionMethod.run_acc: Python max keeps the first maximum
    return max(records, key=lambda r: r["val_acc"])


def db_run_acc_oracle(records):  # OracleSelectionMethod.run_acc: the last checkpoint
    return sorted(records, key=lambda r: r["step"])[-1]


def db_sweep_choice(runs):
    """hparams_accs + sweep_acc: groups ordered by sorted hparams seed, stable ascending sort on
    val (NaN -> -inf), reversed, first entry."""
    accs = [(h, runs[h]) for h in sorted(runs)]
    accs = sorted(accs, key=lambda x: -math.inf if math.isnan(x[1]) else x[1])[::-1]
    return accs[0][0]


def db_format_mean(data):
    data = np.asarray(data)
    return float(np.mean(data)), float(np.std(data / math.sqrt(len(data))))


# ---- the split on a generated tree ------------------------------------------------------------
@pytest.fixture()
def tree(tmp_path):
    rng = random.Random(0)
    domains, classes = ("art", "cartoon", "photo"), ("dog", "horse", "person")
    sizes = {}
    for d in domains:
        for c in classes:
            n = rng.randint(3, 17)
            folder = tmp_path / "Gen" / d / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4)).save(folder / f"{i:03d}.png")
            sizes[(d, c)] = n
    return tmp_path, DatasetSpec("gen", "Gen", domains, classes), sizes


@pytest.mark.parametrize("trial_seed", [0, 1, 7])
def test_split_is_domainbeds_truncated_split(tree, trial_seed):
    root, spec, sizes = tree
    records = scan(root, spec)
    proto = make_protocol(spec, records, ["photo"], trial_seed=trial_seed)
    for env_i, d in enumerate(spec.domains):
        # torchvision ImageFolder order: sorted class folders, sorted files
        env = [str(root / "Gen" / d / c / f"{i:03d}.png") for c in sorted(spec.classes) for i in range(sizes[(d, c)])]
        out_keys, in_keys = db_split_dataset(len(env), int(len(env) * 0.2), db_seed_hash(trial_seed, env_i))
        want_out = sorted(env[k] for k in out_keys)
        if d == "photo":
            got_out = sorted(proto.oracle_val[d].paths) if proto.oracle_val else None
            got_in = sorted(proto.test[d].paths)
            assert got_in == sorted(env[k] for k in in_keys)
        else:
            got_out = sorted(proto.val[d].paths)
        if got_out is not None:
            assert got_out == want_out, d
    # PACS art_painting has 2048 images: DomainBed keeps 409 for validation, not round()'s 410
    from dgclip.data.splits import split_in_out

    assert len(split_in_out(2048, 0.2, 0)[1]) == int(2048 * 0.2) == 409


# ---- selection on synthetic sweeps ------------------------------------------------------------
def _history(rng, n_steps, ties=False):
    vals = rng.choice([0.5, 0.6, 0.7], size=n_steps) if ties else rng.random(n_steps)
    return [{"step": 50 * (i + 1), "val_acc": float(v), "oracle_acc": float(rng.random()), "test_acc": float(rng.random())}
            for i, v in enumerate(vals)]


def test_within_run_selection_matches_domainbed():
    rng = np.random.default_rng(0)
    for trial in range(200):
        hist = _history(rng, int(rng.integers(1, 8)), ties=trial % 2 == 0)
        assert best_step(hist) is db_run_acc_iid(hist)
        assert select_in_run(hist, "training-domain") is db_run_acc_iid(hist)
        assert select_in_run(hist, "oracle") is db_run_acc_oracle(hist) is last_step(hist)


def test_hparams_seed_choice_matches_domainbed_on_ties():
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(1, 7))
        seeds = rng.permutation(20)[:n].tolist()
        vals = rng.choice([0.4, 0.5, float("nan")] if trial % 3 == 0 else [0.4, 0.5], size=n).tolist()
        runs = dict(zip(seeds, vals))
        assert select_hparams_seed(runs.items()) == db_sweep_choice(runs), runs
    assert select_hparams_seed([(0, 0.5), (3, 0.5), (1, 0.5)]) == 3  # the LARGER seed wins a tie


def test_select_sweep_matches_domainbed():
    """Whole sweep: per (method, domain, trial), each hparam seed's run selected within, then across."""
    rng = np.random.default_rng(2)
    records = []
    for method in ("a", "b"):
        for dom in ("rot0", "rot15"):
            for seed in range(3):
                for h in range(4):
                    records.append({"dataset": "d", "method": method, "test_domain": dom, "seed": seed,
                                    "hparams_seed": h, "history": _history(rng, 4, ties=True)})
    got = {(r["method"], r["test_domain"], r["seed"], r["selection"][:6]): r for r in select_sweep(records)}
    for r0 in records:
        key = (r0["method"], r0["test_domain"], r0["seed"])
        runs = [r for r in records if (r["method"], r["test_domain"], r["seed"]) == key]
        iid = {r["hparams_seed"]: db_run_acc_iid(r["history"]) for r in runs}
        h = db_sweep_choice({k: v["val_acc"] for k, v in iid.items()})
        assert got[key + ("traini",)]["test_acc"] == iid[h]["test_acc"]
        orc = {r["hparams_seed"]: db_run_acc_oracle(r["history"]) for r in runs}
        h = db_sweep_choice({k: v["oracle_acc"] for k, v in orc.items()})
        assert got[key + ("oracle",)]["test_acc"] == orc[h]["test_acc"]
        assert got[key + ("oracle",)]["selected_step"] == 200  # the last step, never early-stopped


def test_error_bars_are_domainbeds():
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 5):
        accs = rng.random(n).tolist()
        m, e, k = mean_and_error(accs)
        assert (m, e) == pytest.approx(db_format_mean(accs), abs=1e-15) and k == n
    # 3 seeds: sample-std s.e. is sqrt(3/2) = 1.22x larger than DomainBed's
    accs = [0.5, 0.6, 0.8]
    assert np.std(accs, ddof=1) / math.sqrt(3) / mean_and_error(accs)[1] == pytest.approx(math.sqrt(1.5))
    rows = summarise([{"dataset": "d", "method": "m", "selection": "s", "seed": s, "test_domain": "x", "test_acc": a}
                      for s, a in enumerate(accs)])
    assert rows[0]["cells"]["x"][:2] == pytest.approx(db_format_mean(accs))
    assert math.isnan(mean_and_error([])[0])
