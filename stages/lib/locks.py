"""One run of a stage at a time per workspace: two `medpipe train` in one folder would mix
their outputs (model.pt of one, history.csv of the other). DVC-launched runs are unaffected:
`dvc repro` runs stages one after another, and queued experiments run in their own copies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from stages.lib import paths
from stages.lib.errors import Busy

# errors of a file system that has no advisory locks at all (not a busy lock)
NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs are not guarded
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def stage_lock(stage: str, lock_dir: Path = paths.LOCKS) -> Iterator[None]:
    """Hold `<lock_dir>/<stage>.lock` while the block runs; a second holder fails at once.

    The kernel releases the lock when the process ends, however it ends (no stale lock after
    a kill). Under torchrun only rank 0 writes outputs, so only rank 0 locks.

    Raises:
        Busy: naming the process that holds the lock.
    """
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{stage}.lock"
    with open(path, "a+") as handle:
        if not acquire(handle, path, stage):  # a file system without locks: unguarded
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def acquire(handle: TextIO, path: Path, stage: str) -> bool:
    """Take the lock at once; False where the file system has no locks (NFS, SMB, Lustre
    without flock), after a note on stderr.

    Raises:
        Busy: another process holds it, named from the lock file.
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise Busy(
            f"another `medpipe {stage}` is running in this workspace ({holder}); wait for "
            f"it to finish or stop it, then run again (lock: {path})"
        ) from None
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        print(
            f"note: {path}: no file locks here ({exc.strerror}); runs are not guarded",
            file=sys.stderr,
        )
        return False


@contextlib.contextmanager
def folder_lock(folder: Path, name: str = ".medpipe.lock") -> Iterator[None]:
    """Hold `<folder>/<name>` while the block runs, waiting for another holder (two
    downloads into one cache take turns instead of fetching the same file twice). Inside,
    the folder's temporary files belong to no live writer: they are leftovers of a kill."""
    if fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: waiting for another download into {folder}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
