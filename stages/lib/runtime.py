"""Training plumbing: torchrun/DDP context, RNG snapshots and the per-epoch resume checkpoint.

The resume checkpoint (models/last.pt) holds everything that changes during training —
weights, optimiser and schedule state, every RNG state, the history and the best epoch so
far — so that a killed run continues exactly where its last finished epoch ended. It is
only reused when its fingerprint (params, data, code) matches the current run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from stages.lib.checkpoint import save_torch
from stages.lib.io import atomic_path

RESUME_FORMAT = 1


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read torchrun's environment variables."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    return DistInfo(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("LOCAL_WORLD_SIZE", "1")),
    )


def init_distributed(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPU, gloo on CPU); each process gets its own GPU."""
    if info.world == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that `finally` blocks remove temporary outputs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def torchrun_command(params_file: Path | str, nproc: int) -> list[str]:
    """`medpipe train` relaunched as `nproc` local processes under torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stages",
        "train",
        "--params",
        str(params_file),
    ]


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if info.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random state training touches (torch, CUDA, numpy, python, and the given
    generators: the data loader's, the batch augmentation's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


def fingerprint(params: dict[str, Any], data_files: list[Path], code_files: list[Path]) -> str:
    """Hash of what determines a training run: params, data index files and the code."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in [*data_files, *code_files]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()


def save_resume(path: Path, state: dict[str, Any]) -> None:
    """Write the resume checkpoint atomically (a kill mid-write keeps the previous one)."""
    with atomic_path(path) as tmp:
        save_torch(tmp, {"format": RESUME_FORMAT, **state})


def load_resume(path: Path, expected: str, remove_stale: bool = True) -> dict[str, Any] | None:
    """The unfinished checkpoint of this very run, else None (a stale one is deleted)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:
        tqdm.write(f"ignoring {path}: unreadable ({exc})")
        state = None
    if state and state.get("fingerprint") == expected and not state.get("finished"):
        return state
    if state and not state.get("finished") and remove_stale:
        tqdm.write(f"ignoring {path}: params, data or code changed since it was written")
    if remove_stale:
        path.unlink(missing_ok=True)
    return None


def hardware(device: torch.device) -> dict[str, Any]:
    """What produced a run, for a reviewer comparing runs: results differ across CPUs and
    GPUs (float rounding), so a difference between two machines may be no difference."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux, else what the platform module says)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels on GPU (cuBLAS needs a fixed workspace for that)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
