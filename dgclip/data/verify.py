"""Images checked before work starts, and the data's fingerprint.

Every image a run will read is decoded once up front (`find_unreadable`), so one corrupt file
stops a job before its first step with the complete list, never midway through a multi-domain
run. The answer is cached under the fingerprint of the files (path, size, modification time),
so a second run over unchanged data costs one `stat` per file. The same fingerprint identifies
the data a record or checkpoint was made on (`--resume` refuses other data: dgclip.engine).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["fingerprint", "check_image", "find_unreadable", "UnreadableImagesError"]

_CHECK_VERSION = 1  # bump when check_image changes what it accepts (old cache entries then miss)


class UnreadableImagesError(RuntimeError):
    def __init__(self, bad: list[tuple[str, str]], hint: str = ""):
        self.bad = bad
        shown = "\n".join(f"  {p}: {why}" for p, why in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(f"{len(bad)} unreadable image(s):\n{shown}{more}" + (f"\n{hint}" if hint else ""))


def fingerprint(paths: Iterable[str]) -> str:
    """sha256 over (path, size, mtime in ns) of every file, in sorted path order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_image(path: str) -> Optional[str]:
    """None if the image decodes completely (what the loaders will do), else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() alone misses truncated files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _cache_file(cache_dir: Optional[os.PathLike], fp: str) -> Optional[Path]:
    return None if cache_dir is None else Path(cache_dir) / "verified" / f"v{_CHECK_VERSION}-{fp}.json"


def find_unreadable(paths: list[str], *, cache_dir: Optional[os.PathLike] = None, fp: Optional[str] = None,
                    threads: Optional[int] = None) -> list[tuple[str, str]]:
    """[(path, reason)] of the images that do not decode; cached by the files' fingerprint."""
    fp = fp or fingerprint(paths)
    cached = _cache_file(cache_dir, fp)
    if cached is not None and cached.exists():
        try:
            return [tuple(x) for x in json.loads(cached.read_text())["unreadable"]]
        except (ValueError, KeyError, OSError):
            pass  # a damaged cache entry: check again
    threads = threads or min(8, (os.cpu_count() or 1) * 2)  # decoding releases the GIL
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(check_image, paths, chunksize=64))
    bad = [(p, why) for p, why in zip(paths, reasons) if why is not None]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"n_images": len(paths), "unreadable": bad}))
        os.replace(tmp, cached)
    return bad
