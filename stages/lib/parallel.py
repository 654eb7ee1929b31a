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
