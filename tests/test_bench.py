"""The benchmark script runs end to end on tiny settings and prints its figures (it is not
timed here: speed targets are read from its output on a quiet machine, benchmarks/RESULTS.md)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
ROW = r"^{size}\s+{phase}\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$"


def bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_benchmark_prints_three_rates_and_ratios_per_size():
    out = bench("train", "--sizes", "16", "--images", "160", "--passes", "1", "--batch-size", "32")
    assert "cores" in out  # machine info
    for phase in ("train", "eval"):
        row = re.search(ROW.format(size=16, phase=phase), out, re.M)
        assert row, out
        a, b, c, b_a, b_c = (float(v) for v in row.groups())
        assert min(a, b, c) > 0
        # ratios of the unrounded rates; the printed rates are rounded to whole img/s
        for ratio, num, den in ((b_a, b, a), (b_c, b, c)):
            assert abs(ratio - num / den) <= 0.005 + ratio * (0.5 / num + 0.5 / den)


def test_preprocess_benchmark_reports_throughput_and_peak_memory():
    out = bench("preprocess", "--sizes", "120")
    images, _, _, per_second, rss_mb = out.strip().splitlines()[-1].split()
    assert int(images) > 100 and float(per_second) > 0 and 50 < float(rss_mb) < 4000
