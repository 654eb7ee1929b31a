"""Downloads into the cache for the medmnist and url sources: pooch with a hash check and
retries, mirrors, a cache outside the repository."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from stages.lib import catalog
from stages.lib.errors import ToolFailed
from stages.lib.locks import folder_lock

CACHE_ENV = "MEDPIPE_CACHE"
MIRROR_ENV = "MEDPIPE_MIRROR"
CHUNK = 1 << 20  # bytes per read while downloading and extracting
TIMEOUT_S = 60


def mirror_url(url: str, mirror: str | None) -> str:
    """Replace scheme and host of `url` by the mirror's (keeping its path prefix).

    `https://zenodo.org/records/1/files/x.npz` with mirror `http://host:8080/zenodo`
    becomes `http://host:8080/zenodo/records/1/files/x.npz`.
    """
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if not mirror:
        return url
    base = urlsplit(mirror)
    if base.scheme not in ("http", "https", "ftp") or not base.netloc:
        raise ValueError(
            f"data.mirror / ${MIRROR_ENV}: {mirror!r} is not a base URL like http://host[:port]"
        )
    parts = urlsplit(url)
    return urlunsplit(
        (base.scheme, base.netloc, base.path.rstrip("/") + parts.path, parts.query, "")
    )


def cache_dir(param: str | None) -> Path:
    """data.cache, else $MEDPIPE_CACHE, else the user cache (~/.cache/medpipe on Linux)."""
    return Path(param).expanduser() if param else catalog.cache_dir()


class _Downloader:
    """pooch's HTTP downloader, except that client errors (404, 403, ...) are final.

    pooch retries every requests error; retrying a 404 only delays the message. Server
    errors (5xx), timeouts and broken connections are still retried.
    """

    def __init__(self) -> None:
        import pooch

        self.http = pooch.HTTPDownloader(progressbar=True, chunk_size=CHUNK, timeout=TIMEOUT_S)

    def __call__(self, url: str, output_file: Any, store: Any, check_only: bool = False) -> Any:
        import requests

        try:
            return self.http(url, output_file, store, check_only=check_only)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if 400 <= status < 500 and status not in (408, 429):
                raise FileNotFoundError(f"HTTP {status} {exc.response.reason}") from None
            raise


def fetch(url: str, known_hash: str, fname: str, cache: Path, retries: int) -> Path:
    """Download `url` to `cache/fname`, or reuse the file there if its hash matches.

    The transfer goes to a temporary file that is renamed only after the hash matched, so
    a failed, interrupted or tampered download never leaves a file a rerun would trust.
    """
    import pooch

    store = pooch.create(
        path=cache,
        base_url="",
        registry={fname: known_hash},
        urls={fname: url},
        retry_if_failed=0,  # retried below: network errors only, never a wrong hash
    )
    with folder_lock(cache):
        remove_partial_downloads(cache)
        return _fetch(store, url, retries)


# pooch streams into tempfile.NamedTemporaryFile(dir=cache): "tmp" + 8 characters
PARTIAL = re.compile(r"tmp[a-z0-9_]{8}")


def remove_partial_downloads(cache: Path) -> None:
    """Delete what killed downloads left in `cache` (pooch's temporary files; called under
    the cache's lock, so no live download is writing them)."""
    for path in cache.iterdir():
        if PARTIAL.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _fetch(store: Any, url: str, retries: int) -> Path:
    import requests

    fname = next(iter(store.registry))
    attempts = f"{retries + 1} attempt(s)"
    for attempt in range(retries + 1):
        try:
            return Path(store.fetch(fname, downloader=_Downloader()))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"download {url}: {exc} (check data.flag/data.size or data.url, and that a "
                f"mirror serves the same path)"
            ) from None
        except requests.RequestException as exc:
            if attempt == retries:
                raise ToolFailed(f"download {url}: failed after {attempts}: {exc}") from None
            time.sleep(min(attempt + 1, 10))  # as pooch waits between its own retries
        except ValueError as exc:  # pooch: hash mismatch; the bytes arrived, so it is final
            raise ValueError(
                f"download {url}: the downloaded file does not have the expected hash; nothing "
                f"was kept (check data.sha256, or that the server still serves that file; a "
                f"rerun downloads it again): {exc}"
            ) from None
    raise AssertionError("unreachable")  # the loop returns or raises
