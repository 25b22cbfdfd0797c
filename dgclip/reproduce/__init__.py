"""`dgclip reproduce TABLE`: a published table's grid, run through `dgclip sweep` with the paper presets.

`plan()` turns a table (dgclip.reproduce.tables) into rows: one per (group, method, dataset) with
its test-domain groups, trial seeds, runs, training steps per run and where the steps come from.
`--dry-run` prints them with the number of runs and, where a measured per-step time exists
(`step_times.json`, or `--step-seconds`), the GPU hours. `launch()` issues one
`dgclip sweep launch` per group into the table's sweep folder: `--preset paper` for the
leave-one-domain-out tables, `--protocol P --shots K [--targets ...]` for the CoOp-suite ones
(which apply their paper configuration themselves).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .tables import TABLES, Group, Table, get_table

__all__ = ["plan", "format_plan", "launch", "sweep_argv", "step_seconds", "TABLES", "get_table", "Row"]

_STEP_TIMES = Path(__file__).with_name("step_times.json")


@dataclass
class Row:
    group: int
    method: str
    dataset: str
    test_groups: int          # held-out domain groups (loo) or 1
    trials: int
    steps: Optional[int]      # training steps per run (None: not known before the data is there)
    steps_how: str
    backbone: str

    @property
    def runs(self) -> int:
        return self.test_groups * self.trials


def step_seconds(sweep_dir=None) -> dict:
    """{(method, backbone): (seconds per step, where measured)} for GPU runs: the entries of
    step_times.json, overridden by finished CUDA runs already under `sweep_dir` (their
    train_seconds / steps, evaluations included; the median over runs)."""
    import statistics

    times = {}
    for e in json.loads(_STEP_TIMES.read_text()).get("entries", []):
        if e.get("device_kind") == "gpu":
            times[(e["method"], e["backbone"])] = (float(e["seconds_per_step"]),
                                                   f"dgclip/reproduce/step_times.json: {e.get('measured', '')}")
    if sweep_dir is None or not Path(sweep_dir).is_dir():
        return times
    from ..results import load_results

    try:
        records = load_results(sweep_dir)
    except FileNotFoundError:
        return times
    per: dict = {}
    for r in records:
        cfg = r.get("config") or {}
        if str(cfg.get("device", "")).startswith("cuda") and cfg.get("steps") and r.get("train_seconds"):
            per.setdefault((r["method"], cfg.get("backbone")), []).append(r["train_seconds"] / cfg["steps"])
    for key, vals in per.items():
        times[key] = (statistics.median(vals), f"median of {len(vals)} CUDA run(s) under {sweep_dir}")
    return times


def _test_groups(dataset: str, test_domains: tuple) -> int:
    from ..data.catalog import UnknownDatasetError, get_spec
    from ..data.splits import resolve_test_domains

    if not test_domains:
        return 1
    try:
        spec = get_spec(dataset)
    except UnknownDatasetError:
        return 1
    return sum(len(resolve_test_domains(spec, td)) for td in test_domains)


def _backbone_or_unknown(dataset: str) -> str:
    from ..presets import UnknownPresetError, resolve

    try:
        return resolve("paper", "zero-shot", dataset)["backbone"].value
    except (UnknownPresetError, KeyError):
        return "?"


def _preset_steps(method: str, dataset: str, root, overrides: dict) -> tuple:
    """(steps, how, backbone) of the paper preset, without failing when it or the data is missing."""
    from ..presets import UnknownPresetError, resolve
    from ..presets.apply import epochs_to_steps

    if method == "zero-shot":
        return 0, "no training (one evaluation)", overrides.get("backbone", _backbone_or_unknown(dataset))
    try:
        table = resolve("paper", method, dataset)
    except UnknownPresetError:
        return overrides.get("steps"), ("--steps" if "steps" in overrides else
                                        "no paper preset in this build"), overrides.get("backbone", "?")
    backbone = overrides.get("backbone", table["backbone"].value if "backbone" in table else "?")
    if "steps" in overrides:
        return overrides["steps"], "--steps", backbone
    if "steps" in table:
        return table["steps"].value, table["steps"].source, backbone
    if "epochs" in table:
        epochs = table["epochs"].value
        batch = table["batch_size"].value if "batch_size" in table else 32
        hold = table["holdout_fraction"].value if "holdout_fraction" in table else 0.2
        try:
            steps, how = epochs_to_steps(dataset, root, epochs, batch, hold)
            return steps, how, backbone
        except Exception:  # noqa: BLE001 - the data is not there yet: say so instead
            return None, f"{epochs} epochs at batch {batch}; steps computed from the data at launch", backbone
    return None, "preset without steps", backbone


def plan(table: Table, *, root=None, methods=None, datasets=None, n_trials=None, test_domains=None,
         overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    all_methods = {m for g in table.groups for m in g.methods}
    all_datasets = {d for g in table.groups for d in g.datasets}
    for name, given, known in (("method", methods, all_methods), ("dataset", datasets, all_datasets)):
        bad = sorted(set(given or ()) - known)
        if bad:
            raise ValueError(f"{table.id} has no {name} {', '.join(bad)}; its {name}s: {', '.join(sorted(known))}")
    rows = []
    for gi, g in enumerate(table.groups):
        for d in g.datasets:
            if datasets and d not in datasets:
                continue
            for m in g.methods:
                if methods and m not in methods:
                    continue
                steps, how, backbone = _preset_steps(m, d, root, overrides)
                tds = tuple(test_domains) if test_domains and g.protocol == "loo" else g.test_domains
                rows.append(Row(gi, m, d, _test_groups(d, tds), n_trials or g.n_trials, steps, how, backbone))
    return rows


def format_plan(table: Table, rows: list, *, step_s: Optional[float] = None, times: Optional[dict] = None) -> str:
    """The dry-run text. GPU hours come from `step_s` (--step-seconds) or else from `times`
    (step_seconds()); without a measured time for a row the hours are not estimated."""
    times = times or {}
    lines = [f"{table.id}: {table.title}"]
    for gi, g in enumerate(table.groups):
        if any(r.group == gi for r in rows):
            extra = f", protocol {g.protocol}" + (f", {g.shots} shots" if g.shots else "") + \
                (f", targets {', '.join(g.targets)}" if g.targets else "")
            lines.append(f"  group {gi + 1}: test domains {', '.join(g.test_domains) or '-'}{extra}"
                         + (f" ({g.note})" if g.note else ""))
    head = f"  {'method':10s} {'dataset':24s} {'held-out':>8s} {'trials':>6s} {'runs':>5s} {'steps/run':>9s}  backbone   steps from"
    lines += [head, "  " + "-" * (len(head) + 20)]
    total_runs, total_steps, unknown, hours, missing, used = 0, 0, 0, 0.0, set(), set()
    for r in rows:
        total_runs += r.runs
        lines.append(f"  {r.method:10s} {r.dataset:24s} {r.test_groups:8d} {r.trials:6d} {r.runs:5d} "
                     f"{'?' if r.steps is None else r.steps:>9}  {r.backbone:10s} {r.steps_how}")
        if r.steps is None:
            unknown += r.runs
            continue
        total_steps += r.steps * r.runs
        if r.steps:
            if step_s is not None:
                per, how = step_s, "--step-seconds"
            elif (r.method, r.backbone) in times:
                per, how = times[(r.method, r.backbone)]
            else:
                missing.add(f"{r.method}/{r.backbone}")
                continue
            used.add(f"{r.method}/{r.backbone}: {per:.3g} s/step ({how})")
            hours += per * r.steps * r.runs / 3600
    lines.append(f"  runs: {total_runs}; training steps: {total_steps}"
                 + (f" (+ {unknown} run(s) whose steps are not known yet)" if unknown else ""))
    if unknown:
        lines.append("  GPU hours: not estimated: the steps of some runs follow from data not under --root "
                     "or from presets not in this build")
    elif missing:
        lines.append("  GPU hours: not estimated: no measured GPU per-step time for "
                     f"{', '.join(sorted(missing))} (none in dgclip/reproduce/step_times.json or among "
                     "finished CUDA runs in the sweep folder); pass --step-seconds S with a time you measured")
    else:
        lines.append(f"  GPU hours: {hours:.1f}" + "".join(f"\n    per-step time {u}" for u in sorted(used)))
    for row, why in table.not_run.items():
        lines.append(f"  not run: {row}: {why}")
    for n in table.notes:
        lines.append(f"  note: {n}")
    lines.append(f"  published numbers: dgclip/published/{table.id}.json")
    return "\n".join(lines)


def sweep_argv(table: Table, group: Group, *, sweep_dir: str, methods, datasets, n_trials, test_domains,
               passthrough: list) -> list:
    """The `dgclip sweep launch` command line of one group."""
    ms = [m for m in group.methods if not methods or m in methods]
    ds = [d for d in group.datasets if not datasets or d in datasets]
    if not ms or not ds:
        return []
    argv = ["sweep", "launch", "--sweep-dir", sweep_dir, "--methods", *ms, "--datasets", *ds,
            "--n-trials", str(n_trials or group.n_trials)]
    if group.protocol == "loo":
        argv += ["--preset", "paper"]
        tds = list(test_domains) if test_domains else list(group.test_domains)
        if tds:
            argv += ["--test-domains", *tds]
    else:  # a CoOp-suite protocol applies its paper configuration (presets/coop_suite.py) by itself
        argv += ["--protocol", group.protocol] + (["--shots", str(group.shots)] if group.shots else [])
        if group.targets:
            argv += ["--targets", *group.targets]
    return argv + list(passthrough)


def _sweep_has_protocol() -> bool:
    from ..cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return any("--protocol" in a.option_strings for a in sub.choices["sweep"]._actions)


def launch(table: Table, argvs: list) -> int:
    from ..cli import main

    for group, argv in argvs:
        if group.protocol != "loo" and not _sweep_has_protocol():
            raise ValueError(f"{table.id} needs `dgclip sweep --protocol {group.protocol}`, which this build does "
                             "not have yet; `--dry-run` shows the grid")
    rc = 0
    for _, argv in argvs:
        print("[reproduce] dgclip " + " ".join(argv), flush=True)
        rc = max(rc, main(argv))
    return rc
