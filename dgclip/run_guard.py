"""What a training run checks before its first step and how it stops when asked to.

* `checked_records`: the images of the domains a run reads, decoded once up front (cached by the
  files' fingerprint, dgclip.data.verify); unreadable ones stop the run with the full list, or
  with `skip_unreadable` are left out and named in the record. The fingerprint of the files the
  run reads enters its identity: `--resume` refuses a record or checkpoint made on other data.
* `InterruptGuard`: SIGINT / SIGTERM during the training loop set a flag; the loop finishes the
  step, writes a checkpoint at it and raises `RunInterrupted`, which the CLI turns into one line
  on how to resume and exit status 130 / 143 (128 + the signal, the shell's convention).
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import numpy as np

__all__ = ["checked_records", "data_identity_diff", "InterruptGuard", "RunInterrupted"]


class RunInterrupted(BaseException):
    """Like KeyboardInterrupt, not an Exception: a sweep's "a failed job must not stop the sweep"
    handlers let it through."""

    def __init__(self, signum: int, step: Optional[int], checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        where = f"checkpoint at step {step}: {checkpoint}" if checkpoint else "before its first step; nothing saved"
        super().__init__(f"{name}: stopped, {where}")


def checked_records(spec, records, domains: list[str], *, cache_dir, skip_unreadable: bool):
    """(records of `domains` that decode, data identity for the record / resume check).

    Raises UnreadableImagesError (listing every file) unless skip_unreadable."""
    from .data.verify import UnreadableImagesError, find_unreadable, fingerprint

    idx = [spec.domains.index(d) for d in domains]
    used = records.subset(np.flatnonzero(np.isin(records.domains, idx)))
    fp = fingerprint(used.paths)
    bad = find_unreadable(used.paths, cache_dir=cache_dir, fp=fp)
    if bad and not skip_unreadable:
        raise UnreadableImagesError(bad, "nothing was trained; fix or remove them, or pass --skip-unreadable "
                                         "to leave them out (they are then named in the record)")
    if bad:
        drop = {p for p, _ in bad}
        used = used.subset([i for i, p in enumerate(used.paths) if p not in drop])
    identity = {"fingerprint": fp, "n_images": len(used.paths) + len(bad), "domains": list(spec.domains),
                "classes": list(spec.classes), "folder": spec.dirname,
                "unreadable_skipped": [p for p, _ in bad]}
    return used, identity


def data_identity_diff(stored: dict, current: dict) -> list[str]:
    """Why a stored run's data is not this run's data ([] when it is the same)."""
    old = stored.get("data") or {}
    if "fingerprint" not in old:
        return ["the stored run does not record the fingerprint of its data"]
    if old["fingerprint"] != current["fingerprint"]:
        return [f"the data changed (fingerprint of files, sizes and times: {old['fingerprint'][:12]} -> "
                f"{current['fingerprint'][:12]}; {old.get('n_images')} -> {current['n_images']} images)"]
    return []


class InterruptGuard:
    """Within the block, SIGINT/SIGTERM only set `self.signum` (checked by the loop between steps).
    A second signal while the first is pending restores the default behaviour at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signum is not None:  # asked twice: stop now
            self.__exit__(None, None, None)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only exist there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False
