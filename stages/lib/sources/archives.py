"""The url source's archive: a zip or tar with a known SHA-256, named in the cache and
extracted safely (no member can leave the folder, links become copies, a size limit)."""

from __future__ import annotations

import posixpath
import re
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urlsplit

from stages.lib.io import atomic_dir, safe_name
from stages.lib.sources.remote import CHUNK


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
