import subprocess
import sys

from stages.lib.parallel import available_cores, ordered_map


def square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_in_and_out_of_process():
    tasks = list(range(50))
    assert list(ordered_map(square, tasks, parallel=True)) == [x * x for x in tasks]
    assert list(ordered_map(square, tasks, parallel=False)) == [x * x for x in tasks]
    assert available_cores() >= 1


def test_workers_do_not_hang_after_thread_pools_ran():
    """Forking a process whose OpenMP/OpenCV pools ran can deadlock the child; pools must not."""
    code = (
        "import cv2, numpy as np, torch\n"
        "torch.ones(512, 512) @ torch.ones(512, 512)\n"
        "cv2.GaussianBlur(np.zeros((2000, 2000), np.uint8), (31, 31), 5)\n"
        "from stages.lib.sources import synthetic\n"
        "from stages.lib.params import SyntheticParams\n"
        "print(len(list(synthetic.iter_phantoms(SyntheticParams(n_patients=120)))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert int(done.stdout) >= 120
