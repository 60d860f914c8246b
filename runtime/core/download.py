"""Fetch a file from a local path or an http(s) URL into a cache, with progress and a checksum.

Used for official EDM pickles (`edm-deploy convert URL`) and the FID detector. The cache lives in
``$EDM_DEPLOY_CACHE`` or ``~/.cache/edm-deploy/downloads``; a download is written to a temporary
name and renamed only after its size and (optional) sha256 check out, so an interrupted download
never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

from .errors import InputError
from .fileio import sha256_file

# A caller's test that a file is what it reads: raises InputError when it is not.
Check = Callable[[str], None]


def cache_dir() -> str:
    root = os.environ.get("EDM_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edm-deploy")
    return os.path.join(root, "downloads")


def is_url(path_or_url: str) -> bool:
    return bool(re.match(r"^https?://", str(path_or_url)))


def _cache_name(url: str) -> str:
    digest = hashlib.md5(url.encode()).hexdigest()
    base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    return f"{digest}_{base}"


def _usable(path: str, check: Optional[Check]) -> bool:
    if check is None:
        return True
    try:
        check(path)
    except InputError:
        return False
    return True


def fetch(path_or_url: str, sha256: Optional[str] = None, progress: bool = True, timeout: float = 60.0,
          check: Optional[Check] = None) -> str:
    """Return a local path for `path_or_url`, downloading URLs into the cache once.

    With `sha256`, the file (cached or local) must match it, otherwise an InputError is raised
    and a mismatching download is discarded. Only a download that is the file asked for enters
    the cache, so a failed one is never reused: a web page served in its place (an error or
    login page, text/html) is refused, and `check(path)`, which raises InputError for a file that
    is not what the caller reads (an .npz that does not open), runs on the download before it is
    cached and on a cached file before it is reused (one that fails is fetched again).
    """
    if not is_url(path_or_url):
        if not os.path.exists(path_or_url):
            raise InputError(f"file not found: {path_or_url}")
        if sha256 and sha256_file(path_or_url) != sha256.lower():
            raise InputError(f"{path_or_url}: sha256 does not match the expected {sha256}")
        return path_or_url

    url = str(path_or_url)
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, _cache_name(url))
    if os.path.exists(target):
        if (not sha256 or sha256_file(target) == sha256.lower()) and _usable(target, check):
            return target
        os.unlink(target)  # stale, corrupted or unusable cache entry: fetch again

    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - http(s) only, checked above
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"could not download {url}: {reason}") from exc
    kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if kind == "text/html" and not urllib.parse.urlparse(url).path.lower().endswith((".html", ".htm")):
        response.close()
        raise InputError(f"{url} answered with a web page (text/html), not the file: an error or login page, or "
                         "a wrong address; nothing was cached")
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=directory)
    digest = hashlib.sha256()
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target).split("_", 1)[-1], leave=False)
        received = 0
        with os.fdopen(fd, "wb") as f, response:
            while True:
                try:
                    block = response.read(1 << 20)
                except OSError as exc:
                    raise InputError(f"download of {url} broke off: {exc}") from exc
                if not block:
                    break
                f.write(block)
                digest.update(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
        if bar is not None:
            bar.close()
        if total is not None and received != total:
            raise InputError(f"download of {url} is incomplete ({received} of {total} bytes)")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise InputError(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}")
        if check is not None:
            try:
                check(tmp)
            except InputError as exc:
                raise InputError(f"download of {url} is not the file expected, so it was not cached: {exc}") from None
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of a shared cache
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
