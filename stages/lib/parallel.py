"""Process pools sized to the machine, for the stages that work image by image."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (affinity and container limits respected on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def core_slices(jobs: int) -> list[list[int] | None]:
    """This process's cores dealt out to `jobs` child processes run side by side (as
    `dvc queue` would run them), one slice each; None (unpinned) for a single job."""
    if jobs <= 1 or not hasattr(os, "sched_getaffinity"):
        return [None] * max(jobs, 1)
    cores = sorted(os.sched_getaffinity(0))
    per_job = max(1, len(cores) // jobs)
    return [cores[(i * per_job) % len(cores) :][:per_job] for i in range(jobs)]


def pin(cores: list[int] | None) -> Callable[[], None] | None:
    """preexec_fn: run a child on these cores only (Linux; elsewhere, or None, unpinned).
    medpipe's train stage then uses as many threads as it has cores."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None

    def apply() -> None:
        os.sched_setaffinity(0, cores)

    return apply


@contextlib.contextmanager
def worker_pool(
    n_tasks: int, preload: str | None = None
) -> Iterator[multiprocessing.pool.Pool | None]:
    """A process per core when there are several tasks; None: work in this process.

    Workers are forked from a fresh fork server (which imports `preload` once), not from this
    process: a fork of a process whose OpenMP/OpenCV thread pools have run (torch, cv2) can
    hang in the child. Where there is no fork server (Windows, macOS spawn), they are spawned.
    """
    workers = min(available_cores(), n_tasks)
    if workers < 2:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if preload and context.get_start_method() == "forkserver":
        context.set_forkserver_preload([preload])  # only read when the server starts
    with context.Pool(workers) as pool:
        yield pool


def ordered_map(func: Callable[[T], R], tasks: list[T], parallel: bool = True) -> Iterator[R]:
    """`map` over tasks, in order, on a process per core when `parallel` and worthwhile.

    Results are yielded as they come, so a caller that writes them out keeps memory flat.
    `func` must be importable by the workers (defined at the top level of a module).
    """
    preload = func.__module__ if func.__module__ != "__main__" else None
    with worker_pool(len(tasks) if parallel else 1, preload) as pool:
        results: Iterable[R] = pool.imap(func, tasks) if pool else map(func, tasks)
        yield from results
