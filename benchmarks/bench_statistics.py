"""Time the patient-level bootstrap: 1,000 resamples of 10,000 test images, 3 classes.

    python benchmarks/bench_statistics.py [--images 10000] [--resamples 1000] [--repeats 3]

Patients hold 1-3 images (2 on average). Prints the best of `--repeats` wall times of
`stages.lib.statistics.bootstrap_metrics` with all five headline metrics, and the same for
`paired_bootstrap_difference` (two runs on the same resamples).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stages.lib import statistics


def synthetic_test_set(n_images: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels (N,), two runs' probabilities (N, 3) and patient ids (N,), ~2 images a patient."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_images)  # 1-3 images per patient, mean 2
    groups = np.repeat(np.arange(n_images), sizes)[:n_images]
    y = rng.integers(0, 3, n_images)
    runs = []
    for skill in (1.0, 1.2):
        logits = rng.normal(size=(n_images, 3))
        logits[np.arange(n_images), y] += skill
        runs.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return y, runs[0], runs[1], groups


def best_time(repeats: int, call) -> float:
    """Shortest wall time of `repeats` calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    y, base, head, groups = synthetic_test_set(args.images)
    n_patients = len(np.unique(groups))
    size = f"{args.resamples:,} resamples x {args.images:,} images ({n_patients:,} patients)"

    seconds = best_time(
        args.repeats, lambda: statistics.bootstrap_metrics(y, head, groups, args.resamples, 0)
    )
    print(f"bootstrap: {size} in {seconds:.2f} s")
    seconds = best_time(
        args.repeats,
        lambda: statistics.paired_bootstrap_difference(y, base, head, groups, args.resamples, 0),
    )
    print(f"paired bootstrap: {size} in {seconds:.2f} s")


if __name__ == "__main__":
    main()
