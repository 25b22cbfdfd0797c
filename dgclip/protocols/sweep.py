"""`dgclip sweep --protocol few-shot | base2new | cross-dataset | imagenet-shift`: CoOp-suite grids.

One job per (method, dataset, trial seed), each running `run_protocol` with the configuration
`dgclip train --protocol` builds from the same flags (protocols.cli.config_from_args), in its own
folder `<sweep dir>/<key>/`, through the same launchers and the same done / incomplete / not
launched bookkeeping as the leave-one-domain-out sweep (dgclip.sweep).

Trial seeds: trial t (0..N-1 with --n-trials N) runs CoOp's seed number t+1 of the preset's
`seeds` list (CoOp, CoCoOp: 1, 2, 3, `scripts/coop/main.sh` L14; GOPro: 1..5, `scripts/train.sh`
L16); beyond the list it keeps counting (last + 1, ...). A method without a suite preset
(zero-shot outside the embedded default) uses CoOp's list.

The key is readable fields plus a hash of the job's resolved settings (the preset's values with
the explicit flags on top, as the runner resolves them), so spelling out a preset value changes
nothing and a changed value is another job. A run has no mid-training checkpoint: an incomplete
job (crashed or interrupted) starts again from its first epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

__all__ = ["SuiteJob", "make_suite_grid", "run_suite_job", "trial_seeds", "DEFAULT_SEEDS"]

# CoOp's seeds for a method without a suite preset (`KaiyangZhou/CoOp/scripts/coop/main.sh` L14)
DEFAULT_SEEDS = (1, 2, 3)
# ProtocolConfig fields that do not change a run's result (or are the job's own folder)
_NOT_IN_KEY = ("output_dir", "progress", "workers")
# ProtocolConfig fields replaced in the key by their resolved values
_RESOLVED = ("shots", "epochs", "backbone", "pretrained", "eval_batch_size", "transforms", "hparams", "targets")


@dataclass
class SuiteJob:
    """One CoOp-suite run of the grid; `config` holds the ProtocolConfig fields but output_dir."""

    method: str
    dataset: str
    protocol: str
    trial_seed: int
    seed: int
    sweep_dir: str
    config: dict = field(default_factory=dict)

    def protocol_config(self, output_dir=None):
        from .runner import ProtocolConfig

        return ProtocolConfig(**{**self.config, "method": self.method, "dataset": self.dataset,
                                 "protocol": self.protocol, "seed": self.seed,
                                 "output_dir": str(output_dir if output_dir is not None else self.folder)})

    @cached_property
    def _resolved(self) -> tuple:
        """(run settings, hparams, targets) as run_protocol resolves them."""
        from ..data.coop_suite import CROSS_DATASET_TARGETS, IMAGENET_SHIFT_TARGETS
        from ..methods import get_method
        from .runner import resolve_settings

        run, hparams, _ = resolve_settings(self.protocol_config(output_dir=""), get_method(self.method))
        defaults = {"cross-dataset": CROSS_DATASET_TARGETS, "imagenet-shift": IMAGENET_SHIFT_TARGETS}
        targets = list(self.config.get("targets") or defaults.get(self.protocol, ()))
        return run, hparams, targets

    @property
    def key(self) -> str:
        run, hparams, targets = self._resolved
        stable = {k: v for k, v in self.config.items() if k not in _NOT_IN_KEY + _RESOLVED}
        stable.update(method=self.method, dataset=self.dataset, protocol=self.protocol, seed=self.seed,
                      run=run, hparams=hparams, targets=targets)
        from ..sweep import job_key

        name = f"{self.method}__{self.dataset}__{self.protocol}__k{run['shots']}__t{self.trial_seed}__s{self.seed}"
        return job_key(name, stable)

    @property
    def folder(self) -> Path:
        return Path(self.sweep_dir) / self.key


def trial_seeds(method: str, dataset: str, n_trials: int) -> list[int]:
    """CoOp-style seeds of trials 0..n_trials-1: the preset's `seeds`, then counting on."""
    from ..presets.coop_suite import PRESETS

    preset = PRESETS.get((method, dataset), {})
    seeds = list(preset["seeds"].value) if "seeds" in preset else list(DEFAULT_SEEDS)
    while len(seeds) < n_trials:
        seeds.append(seeds[-1] + 1)
    return seeds[:n_trials]


def make_suite_grid(sweep_dir, methods, datasets, protocol: str, n_trials: int, config: dict,
                    hparams=None) -> list[SuiteJob]:
    """The jobs of a suite grid. `config`: the ProtocolConfig fields shared by every job (as
    `dgclip train --protocol` builds them; method, dataset, seed and output_dir are the job's).
    hparams: {method: {name: value}} or {name: value} (every method), as `--hparams`."""
    from ..data.coop_suite import SPECS, is_suite_dataset
    from ..methods import get_method
    from . import SUITE_PROTOCOLS
    from .embedded import EMBEDDED_SUITE

    if protocol not in SUITE_PROTOCOLS:
        raise ValueError(f"protocol must be one of {SUITE_PROTOCOLS}, got {protocol!r}")
    if n_trials < 1:
        raise ValueError(f"--n-trials must be >= 1, got {n_trials}")
    shared = {k: v for k, v in config.items() if k not in ("method", "dataset", "protocol", "seed", "output_dir")}
    hparams = hparams or {}
    per_method = bool(hparams) and all(isinstance(v, dict) for v in hparams.values()) and set(hparams) <= set(methods)
    jobs = []
    for dataset in datasets:
        if dataset != EMBEDDED_SUITE and not is_suite_dataset(dataset):
            raise ValueError(f"--protocol {protocol} runs on the CoOp-suite datasets (or {EMBEDDED_SUITE}); "
                             f"{dataset!r} is not one")
        if dataset in SPECS and SPECS[dataset].test_only:
            raise ValueError(f"{dataset} is test-only (an ImageNet variant): train on imagenet "
                             "(--protocol imagenet-shift tests on it)")
        for method in methods:
            get_method(method)  # unknown methods fail before anything runs
            for t, seed in enumerate(trial_seeds(method, dataset, n_trials)):
                over = dict(hparams.get(method, {}) if per_method else hparams)
                job = SuiteJob(method, dataset, protocol, t, seed, str(sweep_dir), {**shared, "hparams": over})
                job.key  # noqa: B018 - resolves the settings now: a job without a preset fails before any runs
                jobs.append(job)
    return jobs


def run_suite_job(job: SuiteJob) -> dict:
    """Run one job in this process (from its first epoch); marks it done after its record is written."""
    from ..sweep import run_in_job_folder
    from .runner import run_protocol

    # a record left by an attempt that died before `done`: this attempt's record replaces it
    (job.folder / "results.jsonl").unlink(missing_ok=True)
    return run_in_job_folder(job, lambda: run_protocol(job.protocol_config()))
