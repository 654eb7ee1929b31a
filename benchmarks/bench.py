"""medpipe benchmarks: print figures, in one process run, as ratios where machines are noisy.

    python benchmarks/bench.py preprocess [--sizes 5000 50000]
    python benchmarks/bench.py dvc
    python benchmarks/bench.py train [--image-sizes 32 64 128]

`preprocess` generates synthetic raw sets of the given sizes in a temporary folder and runs
`medpipe split` + `medpipe preprocess` on each, reporting images/s and the peak resident
memory of preprocess (its workers included). `dvc` times a no-op `dvc repro` and `dvc status`
in this repository (run the pipeline first). `train` compares (a) model-only training on
in-memory tensors, (b) medpipe's training loop and (c) a naive ImageFolder + PIL pipeline.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDIES_PER_PATIENT = 1.7  # mean of the phantom generator's 1-3 studies


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {device}"
    )


def child_env() -> dict[str, str]:
    """This interpreter's bin first on PATH, so `medpipe` and `dvc` are the installed ones."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def medpipe(cwd: Path, *args: str) -> float:
    """Run `medpipe ARGS` in cwd; return seconds. Raises on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        ["medpipe", *args], cwd=cwd, env=child_env(), capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"medpipe {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def bench_preprocess(sizes: list[int]) -> None:
    print(f"# preprocess ({machine()})")
    print("images   download_s  preprocess_s  preprocess_img_per_s  peak_rss_mb")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
            work = Path(tmp)
            params = {
                "data": {
                    "synthetic": {
                        "n_patients": round(n / STUDIES_PER_PATIENT),
                        "image_size": [200, 320],
                    }
                }
            }
            (work / "params.yaml").write_text(yaml.safe_dump(params))
            download_s = medpipe(work, "download")
            medpipe(work, "split")
            # RUSAGE_CHILDREN is a running max over all children: measure preprocess from a
            # fresh intermediate process, whose children are preprocess and its workers only
            code = (
                "import resource, subprocess; subprocess.run(['medpipe', 'preprocess'], "
                "check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code],
                cwd=work,
                env=child_env(),
                check=True,
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            rss_mb = int(out.stdout.split()[-1]) / 1024  # Linux reports KiB
            images = len((work / "data/raw/manifest.csv").read_text().splitlines()) - 1
            print(
                f"{images:<8} {download_s:>10.1f}  {seconds:>12.1f}  "
                f"{images / seconds:>20.0f}  {rss_mb:>11.0f}",
                flush=True,
            )


def bench_dvc(repeats: int = 5) -> None:
    print(f"# dvc overhead ({machine()})")
    env = child_env()
    for cmd in (["dvc", "repro"], ["dvc", "status"]):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            done = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            times.append(time.perf_counter() - start)
            if "Running stage" in done.stdout:
                raise RuntimeError(f"{' '.join(cmd)} ran stages: run `dvc repro` first")
        times.sort()
        print(
            f"{' '.join(cmd):<12} median {times[len(times) // 2]:.2f} s  "
            f"(min {times[0]:.2f}, max {times[-1]:.2f}, {repeats} runs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess")
    pre.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    sub.add_parser("dvc")
    args = parser.parse_args()
    if args.what == "preprocess":
        bench_preprocess(args.sizes)
    else:
        bench_dvc()


if __name__ == "__main__":
    main()
