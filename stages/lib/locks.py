"""One run of a stage at a time per workspace: two `medpipe train` in one folder would mix
their outputs (model.pt of one, history.csv of the other). DVC-launched runs are unaffected:
`dvc repro` runs stages one after another, and queued experiments run in their own copies.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import Busy

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
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Busy(
                f"another `medpipe {stage}` is running in this workspace ({holder}); wait for "
                f"it to finish or stop it, then run again (lock: {path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
