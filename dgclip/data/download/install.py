"""`dgclip download NAME --root DIR`: fetch, unpack, rebuild, verify, then move into place.

Order of work, chosen so that a failure at any point leaves nothing half-written under --root:
  1. fetch every file into ``<root>/.dgclip-downloads/<target>/`` (``.part`` files resume);
  2. unpack into a fresh staging folder ``<root>/.dgclip-staging-<target>-*`` beside the target;
  3. run the dataset's post-extraction steps there, then the same check `dgclip datasets` runs;
  4. write the manifest (every file's URL and sha256) and rename the folder into place.
A failure removes the staging folder; a corrupt archive or a digest mismatch also removes that
archive, so the next call fetches it again. Only resumable ``.part`` files stay, in the cache.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .extract import CorruptArchive, is_archive, unpack
from .remote import DownloadError, fetch, sha256_file
from .sources import DatasetDownload, RemoteFile, get_source
from .steps import BuildContext

__all__ = ["download", "check_dataset", "MANIFEST", "CACHE_DIR"]

MANIFEST = "dgclip-download.json"
CACHE_DIR = ".dgclip-downloads"


def _log(msg: str) -> None:
    print(f"[dgclip] {msg}", file=sys.stderr, flush=True)


def check_dataset(src: DatasetDownload, root: Path) -> tuple[list, list]:
    """(problems, warnings) of ``root/<target>``: the catalogue check `dgclip datasets` runs
    (missing domains, unknown class folders, unreadable images block; an empty class is a warning),
    or for the CoOp suite the files and non-empty folders its loaders open."""
    base = root / src.target
    if not base.is_dir():
        return [f"{base} does not exist"], []
    if src.catalog:
        from ..catalog import get_spec
        from ..domainbed import verify

        rep = verify(root, get_spec(src.catalog), check_images=True)
        problems = [p for p in rep["problems"] if "empty or missing class" not in p]
        warnings = [p for p in rep["problems"] if "empty or missing class" in p]
        if not problems and sum(rep["domains"].values()) == 0:
            problems.append("no images found")
        return problems, warnings
    problems = []
    for rel in src.required:
        p = base / rel.rstrip("/")
        if rel.endswith("/"):
            if not p.is_dir() or not any(p.iterdir()):
                problems.append(f"missing or empty folder {rel}")
        elif not p.is_file():
            problems.append(f"missing file {rel}")
        elif p.suffix == ".json" and p.name.startswith("split_zhou_"):
            try:
                split = json.loads(p.read_text())
                if not all(k in split for k in ("train", "val", "test")):
                    problems.append(f"{rel} lacks train/val/test")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{rel} is not valid JSON ({exc})")
    return problems, []


def _check_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DownloadError(f"--root {root} is not a folder ({exc})") from exc
    except PermissionError as exc:
        raise DownloadError(f"--root {root} cannot be created: permission denied") from exc
    if not root.is_dir():
        raise DownloadError(f"--root {root} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=root, prefix=".dgclip-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DownloadError(f"--root {root} is not writable ({exc.strerror or exc}); pick a folder you can "
                            "write to") from exc


def _url(f: RemoteFile, mirror: Optional[str]) -> str:
    return f"{mirror.rstrip('/')}/{f.name}" if mirror else f.url


def _fetch_all(src: DatasetDownload, cache: Path, mirror, verify, progress, retries, backoff) -> list:
    fetched = []
    cache.mkdir(parents=True, exist_ok=True)
    # files with a known digest first: a wrong one fails before the large unchecked archives are fetched
    for f in sorted(src.files, key=lambda f: f.sha256 is None):
        dest = cache / f.name
        url = _url(f, mirror)
        if dest.exists():  # complete from an earlier call (only complete files carry this name)
            digest = sha256_file(dest)
            if f.sha256 and digest != f.sha256 and verify:
                dest.unlink()
            else:
                _log(f"{f.name}: already fetched, reusing {dest}")
                fetched.append({"file": f.name, "url": url, "sha256": digest, "known_sha256": f.sha256,
                                "source": f.source})
                continue
        _log(f"fetching {f.name} from {url}")
        digest = fetch(url, dest, sha256=f.sha256, verify=verify, progress=progress, retries=retries,
                       backoff=backoff)
        fetched.append({"file": f.name, "url": url, "sha256": digest, "known_sha256": f.sha256, "source": f.source})
    return fetched


def _manual(src: DatasetDownload, root: Path) -> Path:
    from .sources import _CLASSNAMES

    problems, _ = check_dataset(src, root)
    if not problems:
        _log(f"{src.name}: {root / src.target} verifies")
        return root / src.target
    text = src.manual.format(target=root / src.target, classnames=f"CoOp's file, {_CLASSNAMES.url}")
    raise DownloadError(f"{src.name} cannot be downloaded automatically.\n{text}\nNow: "
                        + "; ".join(problems))


def download(name: str, root, *, mirror: Optional[str] = None, verify: bool = True, progress: bool = True,
             retries: int = 5, backoff: float = 1.0, keep_archives: bool = False) -> Path:
    """Install dataset `name` under `root`; returns its folder. Raises DownloadError."""
    src = get_source(name)
    root = Path(root).expanduser()
    _check_root(root)
    target = root / src.target
    if src.manual:
        return _manual(src, root)
    if target.exists():
        problems, _ = check_dataset(src, root)
        if problems:
            raise DownloadError(f"{target} already exists but does not verify ({'; '.join(problems[:3])}); "
                                "move it away and run this command again")
        _log(f"{src.name}: {target} is already installed and verifies")
        return target
    for dep in src.requires:
        download(dep, root, mirror=mirror, verify=verify, progress=progress, retries=retries, backoff=backoff,
                 keep_archives=keep_archives)
    cache = root / CACHE_DIR / src.target
    fetched = _fetch_all(src, cache, mirror, verify, progress, retries, backoff)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".dgclip-staging-{src.target}-"))
    try:
        raw = staging / "raw"
        raw.mkdir()
        for f in src.files:
            archive = cache / f.name
            if is_archive(f.name):
                _log(f"unpacking {f.name}")
                try:
                    unpack(archive, raw)
                except CorruptArchive:
                    archive.unlink(missing_ok=True)  # the next call fetches it again
                    raise
            else:
                shutil.copyfile(archive, raw / f.name)
        out = staging / src.target
        ctx = BuildContext(root)
        src.build(raw, out, ctx, src.name)
        if not out.is_dir():
            raise DownloadError(f"{src.name}: the archives produced no {src.target}/ folder")
        problems, warnings = check_dataset(src, staging)
        if problems:
            raise DownloadError(f"{src.name}: the unpacked dataset does not verify: {'; '.join(problems[:5])}"
                                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        for w in warnings:
            _log(f"warning: {src.name}: {w}")
        fetched.sort(key=lambda got: [f.name for f in src.files].index(got["file"]))
        manifest = {"dataset": src.name, "target": src.target, "mirror": mirror, "verified_digests": verify,
                    "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": fetched,
                    "post_extraction": ctx.notes, "warnings": warnings, "note": src.note}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(out, target)
    except DownloadError as exc:
        if "disk full" not in str(exc):
            # the archives did not give a dataset that verifies: fetch them again next time,
            # except those whose known digest matched (they are the published files)
            digests = {got["file"]: got["sha256"] for got in fetched}
            for f in src.files:
                if not (f.sha256 and digests.get(f.name) == f.sha256):
                    (cache / f.name).unlink(missing_ok=True)
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while unpacking {src.name} under {root}: free space and run the "
                                "same command again (the fetched archives are reused)") from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        shutil.rmtree(cache, ignore_errors=True)
        try:
            (root / CACHE_DIR).rmdir()
        except OSError:
            pass
    _log(f"{src.name}: installed at {target}")
    return target
