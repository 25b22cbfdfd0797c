"""Fetch one file over HTTP(S): streamed, resumable, retried, checksummed.

A file is written to ``<dest>.part`` and renamed to ``<dest>`` only once it is complete (its
length matches what the server announced) and, where a digest is known, once its sha256 matches.
An interrupted transfer leaves only the ``.part`` file, which the next call resumes with an HTTP
Range request. Google Drive answers large files with an HTML confirmation page instead of the file;
that page's form (or its ``confirm=`` link, or its ``download_warning`` cookie) is followed here,
so no third-party client is needed.
"""
from __future__ import annotations

import errno
import hashlib
import html.parser
import http.client
import http.cookiejar
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

__all__ = ["DownloadError", "fetch", "sha256_file", "CHUNK"]

CHUNK = 1 << 20
_USER_AGENT = "dgclip-download/1 (+python urllib)"
# Status codes worth another try: the server or a proxy had a moment, or asked us to slow down.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download, extraction or verification failed; the message says what and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _ConfirmPage(html.parser.HTMLParser):
    """Collects what a Google-Drive "can't scan this file for viruses" page offers to proceed."""

    def __init__(self):
        super().__init__()
        self.form_action: Optional[str] = None
        self.form_inputs: dict = {}
        self.confirm_href: Optional[str] = None
        self._in_form = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and (a.get("id") == "download-form" or "download" in (a.get("action") or "")):
            self.form_action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("name") and a.get("type", "hidden") == "hidden":
            self.form_inputs[a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in (a.get("href") or ""):
            self.confirm_href = self.confirm_href or a["href"]

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def _confirm_url(page: str, url: str, cookies: http.cookiejar.CookieJar) -> Optional[str]:
    """The URL that downloads the file behind a confirmation page, or None if the page has none."""
    parser = _ConfirmPage()
    parser.feed(page)
    if parser.form_action and parser.form_inputs.get("confirm"):
        base = urllib.parse.urljoin(url, parser.form_action)
        return base + ("&" if "?" in base else "?") + urllib.parse.urlencode(parser.form_inputs)
    if parser.confirm_href:
        return urllib.parse.urljoin(url, parser.confirm_href)
    for c in cookies:
        if c.name.startswith("download_warning"):
            parts = urllib.parse.urlsplit(url)
            query = dict(urllib.parse.parse_qsl(parts.query))
            query["confirm"] = c.value
            return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return None


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _disk_full(path: Path, exc: Optional[OSError] = None, need: Optional[int] = None) -> DownloadError:
    what = f" ({need / 1e9:.2f} GB still to fetch, {_free_bytes(path.parent) / 1e9:.2f} GB free)" if need else ""
    return DownloadError(f"disk full writing {path}{what}: free space on {path.parent} (or pass another "
                         f"--root) and run the same command again; the partial file is resumed"
                         + (f" [{exc}]" if exc else ""))


def _content_range_start(value: Optional[str]) -> Optional[int]:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0]) if value else None
    except (IndexError, ValueError):
        return None


def fetch(url: str, dest: Path, *, sha256: Optional[str] = None, verify: bool = True, progress: bool = True,
          retries: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> str:
    """Download `url` to `dest`; returns the sha256 of what was written.

    sha256: the expected digest (None = not known: the caller records the returned one).
    verify: False accepts a digest mismatch (with a warning). A transfer that ends short of the
    announced length is retried from where it stopped; after `retries` failed attempts the
    ``.part`` file stays for the next call to resume.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
    current, attempt, confirms = url, 0, 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(current, headers={"User-Agent": _USER_AGENT})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            with opener.open(req, timeout=timeout) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if ctype.startswith("text/html"):
                    page = resp.read(2 << 20).decode("utf-8", "replace")
                    nxt = _confirm_url(page, current, cookies)
                    if nxt is None or confirms >= 3:
                        raise DownloadError(
                            f"{url} answered with an HTML page instead of the file (Google Drive's quota or "
                            f"sign-in page, or a wrong URL). Fetch the file in a browser and put it at {dest}, "
                            f"or use --mirror URL with a copy")
                    current, confirms = nxt, confirms + 1
                    continue
                status = resp.status
                length = resp.headers.get("Content-Length")
                if status == 206 and _content_range_start(resp.headers.get("Content-Range")) != offset:
                    part.unlink(missing_ok=True)  # a range we did not ask for: ask for the whole file
                    continue
                if status == 206:
                    mode = "ab"
                else:  # the server ignored the range: start over
                    offset, mode = 0, "wb"
                total = offset + int(length) if length is not None else None
                if total is not None and _free_bytes(dest.parent) < total - offset:
                    raise _disk_full(part, need=total - offset)
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=dest.name, file=sys.stderr, leave=False)
                try:
                    with open(part, mode) as f:
                        while True:
                            block = resp.read(CHUNK)
                            if not block:
                                break
                            f.write(block)
                            if bar is not None:
                                bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
                got = part.stat().st_size
                if total is not None and got < total:
                    raise http.client.IncompleteRead(b"", total - got)
                if total is not None and got > total:
                    part.unlink()
                    raise DownloadError(f"{url}: received {got} bytes, more than the {total} announced; "
                                        "the partial file was removed, run the command again")
        except DownloadError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                # "bytes */N": N == what we hold means the transfer had finished (interrupted before
                # the rename); anything else means our partial file is not a prefix to continue
                announced = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
                if announced.isdigit() and int(announced) == offset:
                    break
                part.unlink()
                continue
            if exc.code not in _RETRY_STATUS:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}"
                                    + (" (the mirror has no file of that name)" if exc.code == 404 else "")) from exc
            attempt = _retry_or_fail(url, part, exc, _progressed(part, offset, attempt), retries, backoff)
            continue
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(part, exc) from exc
            if isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError)) or \
                    isinstance(getattr(exc, "reason", None), (ConnectionError, socket.timeout, OSError)):
                attempt = _retry_or_fail(url, part, exc, _progressed(part, offset, attempt), retries, backoff)
                continue
            raise
        except http.client.HTTPException as exc:  # IncompleteRead, RemoteDisconnected, ...
            attempt = _retry_or_fail(url, part, exc, _progressed(part, offset, attempt), retries, backoff)
            continue
        break
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        if verify:
            part.unlink()
            raise DownloadError(
                f"{dest.name}: sha256 {digest} does not match the known {sha256}; the file was removed. "
                "If this is a re-packed copy you trust (a mirror), pass --no-verify")
        print(f"[dgclip] warning: {dest.name}: sha256 {digest} differs from the known {sha256} "
              "(accepted: --no-verify)", file=sys.stderr)
    part.replace(dest)
    return digest


def _progressed(part: Path, offset: int, attempt: int) -> int:
    """The retry count to go on with: a transfer that moved forward starts a fresh count, so a
    long download survives many brief cuts while a dead server still gives up."""
    return 0 if part.exists() and part.stat().st_size > offset else attempt


def _retry_or_fail(url, part: Path, exc, attempt: int, retries: int, backoff: float) -> int:
    attempt += 1
    if attempt > retries:
        have = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"{url}: giving up after {retries} retries ({type(exc).__name__}: {exc}); "
                            f"{have} bytes kept in {part}, which the next call resumes") from exc
    wait = backoff * 2 ** (attempt - 1)
    print(f"[dgclip] {url}: {type(exc).__name__}: {exc}; retry {attempt}/{retries} in {wait:.1f} s",
          file=sys.stderr)
    time.sleep(wait)
    return attempt
