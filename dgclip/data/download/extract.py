"""Unpack an archive into a folder, refusing corrupt archives and members that would escape it."""
from __future__ import annotations

import errno
import gzip
import lzma
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path

from .remote import DownloadError

__all__ = ["ARCHIVE_SUFFIXES", "is_archive", "unpack", "CorruptArchive"]

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class CorruptArchive(DownloadError):
    """The archive cannot be read to its end (truncated, bad CRC, not an archive)."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _inside(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root or root in target.parents


def _unzip(archive: Path, out: Path) -> None:
    root = out.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not _inside(root, info.filename):
                raise CorruptArchive(f"{archive.name}: member {info.filename!r} would be written outside {out}")
        for info in zf.infolist():  # CRCs are checked as each member is read
            zf.extract(info, out)


def _untar(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        # the "data" filter refuses absolute paths, "..", links leaving the folder and device files
        tf.extractall(out, filter="data")
        # tarfile stops quietly at the first unreadable header and never reads a compressed stream
        # to its end (where gzip keeps its CRC): read what follows the last member, which must be
        # the zero blocks that end every tar archive.
        tf.fileobj.seek(tf.offset)
        tail = 0
        while True:
            block = tf.fileobj.read(1 << 20)
            if not block:
                break
            if block.count(0) != len(block):
                raise CorruptArchive(f"{archive.name} is corrupt: unreadable data at byte {tf.offset} of the "
                                     "tar stream (a damaged header or stream)")
            tail += len(block)
        if tail < tarfile.BLOCKSIZE:
            raise CorruptArchive(f"{archive.name} is truncated: it ends without the tar end-of-archive marker")


def unpack(archive: Path, out: Path) -> None:
    """Extract `archive` into `out` (created). Raises CorruptArchive for anything unreadable."""
    out.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            _unzip(archive, out)
        elif is_archive(name):
            _untar(archive, out)
        else:
            raise DownloadError(f"{archive.name}: not an archive this tool extracts ({', '.join(ARCHIVE_SUFFIXES)})")
    except (gzip.BadGzipFile, lzma.LZMAError, EOFError, zlib.error) as exc:
        raise CorruptArchive(f"{archive.name} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while extracting {archive.name} into {out}: free space and run "
                                "the same command again") from exc
        raise DownloadError(f"could not extract {archive.name} into {out}: {exc}") from exc
    except CorruptArchive:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise CorruptArchive(f"{archive.name} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def place(src: Path, dst: Path) -> None:
    """Move a file or folder (same filesystem: a rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst) if not dst.exists() else shutil.move(str(src), str(dst))
