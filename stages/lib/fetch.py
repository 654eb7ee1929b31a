"""Downloads for the download stage: pooch with a hash check and retries, mirrors, a cache
outside the repository, MedMNIST's own URL/MD5 table, and safe archive extraction."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from stages.lib import catalog
from stages.lib.catalog import medmnist_flags, medmnist_info
from stages.lib.errors import ToolFailed
from stages.lib.io import atomic_dir, safe_name
from stages.lib.locks import folder_lock

CACHE_ENV = "MEDPIPE_CACHE"
MIRROR_ENV = "MEDPIPE_MIRROR"
CHUNK = 1 << 20  # bytes per read while downloading and extracting
TIMEOUT_S = 60


def medmnist_source(flag: str, size: int) -> tuple[str, str]:
    """(url, "md5:<hash>") of one MedMNIST file, from INFO (`url`/`MD5`, `url_64`/`MD5_64`...)."""
    entry = medmnist_info().get(flag)
    if entry is None or flag not in medmnist_flags():
        raise ValueError(
            f"data.flag: {flag!r} is not a 2D MedMNIST flag; one of {medmnist_flags()}"
        )
    suffix = "" if size == 28 else f"_{size}"
    url, md5 = entry.get(f"url{suffix}"), entry.get(f"MD5{suffix}")
    if not url or not md5:
        raise ValueError(f"data.size: medmnist has no {size} px version of {flag}")
    return url, f"md5:{md5}"


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


def archive_name(url: str, sha256: str) -> str:
    """Cache file name of an archive: hash prefix (no collisions) + the URL's file name."""
    base = posixpath.basename(urlsplit(url).path) or "archive"
    return f"{sha256[:12]}-{safe_name(base)}"


def extract_archive(archive: Path, dest: Path, max_bytes: float) -> Path:
    """Unpack a zip or tar(.gz/.bz2/.xz) archive into `dest` safely, once.

    Every member is checked before anything is written: absolute paths, `..`, links
    that leave the archive, device files and archives that unpack to more than
    `max_bytes` are refused with an error naming the member. `dest` appears only when
    complete (it is named after the archive's hash, so an existing one is reused).
    """
    if dest.is_dir():
        return dest
    with atomic_dir(dest) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _extract_zip(zf, tmp, max_bytes)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _extract_tar(tf, tmp, max_bytes)
        else:
            raise ValueError(f"{archive}: neither a zip nor a tar archive")
    return dest


def _member_path(name: str) -> PurePosixPath:
    """Relative path of an archive member; ValueError for anything that could leave the root."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise ValueError(f"archive member {name!r}: absolute path refused")
    path = PurePosixPath(clean)
    if ".." in path.parts:
        raise ValueError(f"archive member {name!r}: '..' (path outside the archive) refused")
    return path


def _link_target(member: PurePosixPath, target: str, relative_to_member: bool) -> PurePosixPath:
    """Where a link points, as a path inside the archive; ValueError if it leaves it."""
    base = posixpath.dirname(str(member)) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise ValueError(f"archive member {str(member)!r}: link to {target!r} leaves the archive")
    return PurePosixPath(resolved)


def _check_size(total: int, max_bytes: float) -> None:
    if total > max_bytes:
        raise ValueError(
            f"archive unpacks to {total / 1e6:,.1f} MB, above data.max_extract_mb "
            f"({max_bytes / 1e6:,.1f} MB); raise it if the archive is trusted"
        )


def _copy(src: IO[bytes], dest: Path, budget: list[int], max_bytes: float) -> None:
    """Stream one member to `dest`, counting bytes against the whole archive's budget."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            budget[0] += len(chunk)
            _check_size(budget[0], max_bytes)
            out.write(chunk)


def _extract_zip(zf: zipfile.ZipFile, root: Path, max_bytes: float) -> None:
    members, links = [], []
    for info in zf.infolist():
        path = _member_path(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink entry
            links.append((path, _link_target(path, zf.read(info).decode(), True)))
        elif not info.is_dir():
            members.append((info, path))
    _check_size(sum(info.file_size for info, _ in members), max_bytes)
    budget = [0]
    for info, path in members:
        with zf.open(info) as src:
            _copy(src, root / path, budget, max_bytes)
    _make_links(links, root)


def _extract_tar(tf: tarfile.TarFile, root: Path, max_bytes: float) -> None:
    members, links = [], []
    for info in tf.getmembers():
        path = _member_path(info.name)
        if info.issym():
            links.append((path, _link_target(path, info.linkname, True)))
        elif info.islnk():
            links.append((path, _link_target(path, info.linkname, False)))
        elif info.isfile():
            members.append((info, path))
        elif not info.isdir():
            raise ValueError(f"archive member {info.name!r}: special file (device/fifo) refused")
    _check_size(sum(info.size for info, _ in members), max_bytes)
    budget = [0]
    for info, path in members:
        src = tf.extractfile(info)
        assert src is not None  # regular file
        with src:
            _copy(src, root / path, budget, max_bytes)
    _make_links(links, root)


def _make_links(links: list[tuple[PurePosixPath, PurePosixPath]], root: Path) -> None:
    """Links inside the archive become copies of their targets (no link is ever written)."""
    for path, target in links:
        source = root / target
        if not source.is_file():
            raise ValueError(f"archive member {str(path)!r}: link to missing file {str(target)!r}")
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / path)
