"""Data larger than memory: peak RSS of `medpipe train` from 5,000 to 200,000 images.

For each size, a MedMNIST-format .npz of generated 64 px images (train N, val and test N/10
each) goes through the real pipeline in a temporary git + DVC project: `dvc repro
preprocess` (download, split, preprocess), then `python -m stages train` (1 epoch of a tiny
timm model, batch 256) while its /proc status is sampled: peak RSS (VmHWM), and the
largest anonymous (RssAnon: what the process allocated) and file-backed (RssFile: mapped
pages of the arrays) parts. It also counts the files DVC tracks for the outputs.

    python benchmarks/bench_memory.py                      # 5000 50000 200000
    python benchmarks/bench_memory.py --sizes 5000 20000

Figures of the last run are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.lib.params import Params  # noqa: E402

SIZE = 64


def write_npz(path: Path, n: int, seed: int = 0) -> None:
    """Binary labels and distinct random images, written split by split (no 2x copy)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 10), ("test", n // 10)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, SIZE, SIZE), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)


def project(root: Path, npz: Path) -> Path:
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    params = Params().model_dump(mode="json")
    params["data"].update(source="npz", path=str(npz))
    params["split"]["strategy"] = "official"
    params["preprocess"].update(size=SIZE)
    params["model"]["name"] = "test_efficientnet"
    params["train"].update(epochs=1, batch_size=256, warmup_epochs=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def train_peak(root: Path) -> tuple[dict[str, float], float]:
    """Peak VmHWM, RssAnon and RssFile (MB) of the train stage, and its wall time."""
    start = time.perf_counter()
    log = root / "train.log"  # a file, not a pipe: a full pipe would stall the progress bar
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages", "train"], cwd=root, stdout=out, stderr=out
        )
        peak: dict[str, int] = {}
        while proc.poll() is None:
            for key, kb in status_kb(proc.pid).items():
                peak[key] = max(peak.get(key, 0), kb)
            time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"train failed:\n{log.read_text()[-3000:]}")
    return {k: v / 1024 for k, v in peak.items()}, time.perf_counter() - start


def tracked_files(root: Path) -> int:
    """Files DVC tracks in the data outputs (what it hashes, stores and checks out)."""
    return sum(1 for p in (root / "data").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000, 200_000])
    args = parser.parse_args()
    print(
        "| train images | npz MB | dvc repro preprocess s | files in data/ | train s | "
        "peak RSS MB | peak RssAnon MB | peak RssFile MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    env_path = str(Path(sys.executable).parent)
    os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            npz = tmp / "pneumoniamnist_64.npz"
            write_npz(npz, n)
            root = project(tmp / "project", npz)
            start = time.perf_counter()
            subprocess.run(
                ["dvc", "repro", "-q", "preprocess"], cwd=root, check=True, capture_output=True
            )
            data_seconds = time.perf_counter() - start
            peak, seconds = train_peak(root)
            print(
                f"| {n:,} | {npz.stat().st_size / 1e6:,.0f} | {data_seconds:.0f} | "
                f"{tracked_files(root)} | {seconds:.0f} | {peak.get('VmHWM', 0):,.0f} | "
                f"{peak.get('RssAnon', 0):,.0f} | {peak.get('RssFile', 0):,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
