"""Files between stages: atomic writes, manifests, image references.

Every output is written to a temporary sibling and renamed into place, so a stage that is
interrupted leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.lib import paths
from stages.lib.errors import MissingItem
from stages.lib.labels import encode_labels

MANIFEST_COLUMNS = ("image", "label", "patient_id", "source_split")
OPTIONAL_COLUMNS = ("group", "mask")
SPLITS = ("train", "val", "test")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: same input, same bytes, same DVC hash
_UMASK = os.umask(0)
os.umask(_UMASK)


def make_parent(path: Path) -> None:
    """Create `path`'s folder; a file standing where a folder must be is named."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(
            (p for p in reversed(path.parents) if p.is_symlink() or not p.is_dir()), path.parent
        )
        kind = "a broken link" if blocker.is_symlink() and not blocker.exists() else "a file"
        reason = f"{blocker} is {kind}, not a folder (move or delete it)"
        raise NotADirectoryError(errno.ENOTDIR, reason, str(path)) from None


# errors of writing bytes (a full disk or quota, a size limit, a read-only file system): when
# they carry no file name, they are about the output being written
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def naming_errors(path: Path, rename: bool = False) -> Iterator[None]:
    """An OS error while writing an output gets the output's name: a full disk or a size
    limit (no file name), or with `rename` a temporary sibling that could not be created
    (`metrics/split.json: Permission denied`, not `metrics/.split.json.x7q.tmp`)."""
    try:
        yield
    except OSError as exc:
        unnamed_write = exc.filename is None and exc.errno in WRITE_ERRORS
        if exc.errno is None or not (rename or unnamed_write):
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


@contextlib.contextmanager
def inside_names(tmp: Path, path: Path) -> Iterator[None]:
    """Errors about files in a temporary folder name them as they will be called in `path`
    (`data/split/train.csv`, not `data/.split.x7q.tmp/train.csv`)."""
    try:
        yield
    except OSError as exc:
        name = str(exc.filename or "")
        if exc.errno is None or not name.startswith(str(tmp)):
            raise
        shown = str(path) + name[len(str(tmp)) :]
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), shown) from exc


def remove(path: Path) -> None:
    """Delete a file, link or folder tree, read-only parts included; missing is fine.

    Raises:
        OSError: naming `path`, when it cannot be removed (delete it by hand).
    """
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return

    def force(func: Callable, name: str, exc: BaseException) -> None:
        os.chmod(os.path.dirname(name) or ".", 0o700)  # a read-only parent blocks deletion
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o700)  # an unreadable folder cannot be listed
            remove(Path(name))
        else:
            os.unlink(name)

    try:
        shutil.rmtree(path, onexc=force) if sys.version_info >= (3, 12) else shutil.rmtree(
            path, onerror=lambda f, n, e: force(f, n, e[1])
        )
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot remove leftover {path} ({exc.strerror}); delete it by hand",
            str(path),
        ) from None


def remove_stale(path: Path) -> None:
    """Remove what an interrupted atomic write of `path` left beside it: `.<name>.*.tmp`
    files or folders, and `.<name>.old` (put back when `path` itself is missing). A stage
    runs under its lock (`stage_lock`), so no other run is writing these."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        remove(leftover)
    old = path.with_name(f".{path.name}.old")
    if (old.exists() or old.is_symlink()) and not (path.exists() or path.is_symlink()):
        os.replace(old, path)  # killed between the two renames: the previous output is back
    remove(old)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    make_parent(path)
    remove_stale(path)
    with naming_errors(path, rename=True):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        with naming_errors(path):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it in for `path` only on success.

    Whatever stands at `path` (a folder, a file) is replaced; leftovers of an earlier
    interrupted swap are removed first, so one never blocks the next run.
    """
    path = Path(path)
    make_parent(path)
    remove_stale(path)
    with naming_errors(path, rename=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        with naming_errors(path), inside_names(tmp, path):
            yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_name(name: str) -> str:
    """A class name as a file-name part: anything but letters, digits, `._-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON (sorted keys, 2-space indent) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_result(metrics_file: Path | str, result: dict, headline: tuple[str, ...]) -> None:
    """Split a stage's result: the `headline` keys into its metrics file (what `dvc exp show`
    and `dvc metrics diff` list: a few sortable numbers), everything else (tables, [lo, hi]
    intervals, timings, checks) into its detail file (`paths.detail_file`)."""
    metrics_file = Path(metrics_file)
    write_json(
        paths.detail_file(metrics_file), {k: v for k, v in result.items() if k not in headline}
    )
    write_json(metrics_file, {k: v for k, v in result.items() if k in headline})


def read_result(metrics_file: Path | str) -> dict:
    """A stage's whole result: its metrics file joined with its detail file (if any)."""
    metrics_file = Path(metrics_file)
    detail = paths.detail_file(metrics_file)
    return {**read_json(metrics_file), **(read_json(detail) if detail.is_file() else {})}


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def write_csv(path: Path | str, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_csv(path: Path | str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV with string columns kept as strings; check required columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    frame = pd.read_csv(path, dtype={"patient_id": str, "label": str}, keep_default_na=False)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


@contextlib.contextmanager
def npz_writer(
    path: Path | str, compress: bool = False
) -> Iterator[Callable[[str, np.ndarray], None]]:
    """Yield `add(name, array)` that streams arrays into an .npz (what np.load reads), so a
    large set never sits in memory; the file appears atomically when the block ends.
    Uncompressed by default: members are then read back without inflating."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", method, allowZip64=True) as archive:

        def add(name: str, array: np.ndarray) -> None:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

        yield add


@contextlib.contextmanager
def npy_writer(
    path: Path | str, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8
) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield `append(rows)` that streams rows, in order, into a .npy of the given shape
    (what np.load and mmap_mode read). Plain sequential writes: unlike filling a memory map,
    written pages do not count against this process's memory, so it stays flat however large
    the array. Fewer rows than `shape[0]` is an error; the file appears atomically."""
    dtype = np.dtype(dtype)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": tuple(shape)})

        def append(rows: np.ndarray) -> None:
            nonlocal written
            rows = np.ascontiguousarray(rows, dtype=dtype)
            if rows.shape[1:] != tuple(shape[1:]) or written + len(rows) > shape[0]:
                raise ValueError(f"{path}: rows {rows.shape} do not fit {shape} after {written}")
            f.write(rows.tobytes())
            written += len(rows)

        yield append
        if written != shape[0]:
            raise ValueError(f"{path}: {written} rows written, {shape[0]} expected")


def save_npz(path: Path | str, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write a dict of arrays as an .npz atomically."""
    with npz_writer(path, compress) as add:
        for name, array in arrays.items():
            add(name, array)


@lru_cache(maxsize=8)
def _open_npz(path: str, mtime_ns: int, pid: int) -> Any:
    """Open array files once per process: the pid keeps forked workers off the parent's file
    handle (a shared offset corrupts reads); the mtime drops stale handles."""
    return np.load(path, allow_pickle=False)


@lru_cache(maxsize=8)
def _npz_member(path: str, mtime_ns: int, name: str) -> np.ndarray:
    """One array of an .npz, memory-mapped when stored uncompressed (else read once).

    `NpzFile[name]` reads the whole member on every access; indexing one image of a
    MedMNIST split that way costs the whole split each time.
    """
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            raise MissingItem(f"{path}: no array {name!r}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)  # local header: name and extra lengths at byte 26
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"{path}: array {name!r} has .npy format {version}; re-save it")
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: array {name!r} holds Python objects; not an image array")
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def npz_array(path: Path | str, name: str) -> np.ndarray:
    """Array `name` of an .npz file, memory-mapped when stored uncompressed."""
    path = Path(path)
    return _npz_member(str(path.resolve()), path.stat().st_mtime_ns, name)


@lru_cache(maxsize=8)
def _open_zip(path: str, mtime_ns: int, pid: int) -> zipfile.ZipFile:
    """Open archives once per process (pid and mtime as for `_open_npz`)."""
    return zipfile.ZipFile(path)


def open_zip(path: Path) -> zipfile.ZipFile:
    """`path` as an open archive, cached per process and file version."""
    return _open_zip(str(path.resolve()), path.stat().st_mtime_ns, os.getpid())


def open_npz(path: Path) -> Any:
    """`path` as an open NpzFile, cached per process and file version."""
    return _open_npz(str(path.resolve()), path.stat().st_mtime_ns, os.getpid())


class ArrayRows:
    """Rows of a memory-mapped .npy array read with `os.preadv` into fresh memory.

    Reading through the mapping would make every page touched resident in this process,
    and the kernel maps whole folios around each fault (64 KiB, up to 2 MiB with large
    folios), so a scattered batch of 256 rows maps hundreds of MB and peak RSS grows with
    the dataset. `preadv` copies just the rows; the file stays in the kernel's page cache,
    which is not this process's memory. Arrays in memory, views of part of a file, and
    systems without `os.preadv` are indexed as usual.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array: np.ndarray | None = array
        self.shape, self.dtype = array.shape, array.dtype
        origin = _whole_file(array) if hasattr(os, "preadv") else None
        self.path = None if origin is None else str(origin.filename)
        self.offset = 0 if origin is None else int(origin.offset)
        self.row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
        self._fd: tuple[int, int] | None = None  # (pid, fd): loader workers open their own

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def _read(self, target: memoryview, position: int) -> None:
        """Fill `target` from byte `position` of the array's data (reads may come short)."""
        done = 0
        while done < len(target):
            n = os.preadv(self._file(), [target[done:]], self.offset + position + done)
            if n == 0:
                raise OSError(f"{self.path}: ends before byte {position + done} (truncated?)")
            done += n

    def take(self, indices: Any) -> np.ndarray:
        """Rows at `indices`, as a new (len(indices), ...) array."""
        if self.path is None:
            return np.take(self.array, indices, axis=0)
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        view, size = memoryview(out).cast("B"), self.row_bytes
        for j, i in enumerate(np.asarray(indices, dtype=np.int64)):
            self._read(view[j * size : (j + 1) * size], int(i) * size)
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in one read."""
        stop = min(stop, len(self))
        if self.path is None:
            return self.array[start:stop]
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        if out.nbytes:
            self._read(memoryview(out).cast("B"), start * self.row_bytes)
        return out

    def __del__(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd[1])

    def __getstate__(self) -> dict:
        """Pickled (spawned loader workers): a file-backed reader travels as its path, not
        as a copy of the array; the worker opens the file itself."""
        state = {**self.__dict__, "_fd": None}
        if self.path is not None:
            state["array"] = None
        return state


def _whole_file(array: np.ndarray) -> np.memmap | None:
    """The np.memmap of a whole .npy file that `array` views entirely (same first byte,
    shape and C order), else None. Slices of a memmap are memmaps too and keep the file's
    `offset`, so the data pointer is what tells a part from the whole."""
    root, obj = None, array
    while obj is not None:  # the outermost memmap, the one created over the file
        if isinstance(obj, np.memmap) and getattr(obj, "filename", None):
            root = obj
        obj = getattr(obj, "base", None)
    if root is None or not (root.flags.c_contiguous and array.flags.c_contiguous):
        return None
    same = array.shape == root.shape and array.dtype == root.dtype
    return root if same and array.ctypes.data == root.ctypes.data else None


def read_processed(processed_dir: Path | str, split: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Memory-mapped (N, S, S, C) uint8 images, the index frame with a `y` column, and meta."""
    processed_dir = Path(processed_dir)
    meta = read_json(processed_dir / paths.PROCESSED_META_NAME)
    frame = read_csv(paths.split_table(processed_dir, split), required=("image", "label"))
    images = np.load(paths.split_images(processed_dir, split), mmap_mode="r")
    if len(images) != len(frame):
        raise ValueError(
            f"{processed_dir}: {split} has {len(images)} images but "
            f"{len(frame)} index rows; rerun `medpipe preprocess`"
        )
    if meta.get("task") != "multilabel":  # multilabel targets: encode_labels(..., True)
        try:
            frame = frame.assign(y=encode_labels(frame["label"], meta["classes"], False))
        except ValueError as exc:
            raise ValueError(f"{processed_dir}/{split}.csv: {exc}") from None
    return images, frame, meta


def check_model_matches_data(model_meta: dict, data_meta: dict, processed_dir: Path | str) -> None:
    """A model must be scored on data with its own classes, in its order, and task."""
    for key in ("classes", "task"):
        if model_meta.get(key) != data_meta.get(key):
            raise ValueError(
                f"{processed_dir}: {key} {data_meta.get(key)} differ from the model's "
                f"{model_meta.get(key)}; rerun `medpipe train` (or `dvc repro`)"
            )
