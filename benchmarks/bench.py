"""medpipe benchmarks: print figures, in one process run, as ratios where machines are noisy.

    python benchmarks/bench.py preprocess [--sizes 5000 50000]
    python benchmarks/bench.py dvc
    python benchmarks/bench.py train [--sizes 32 64 128] [--model resnet18] [--images 768]

`preprocess` generates synthetic raw sets of the given sizes in a temporary folder and runs
`medpipe split` + `medpipe preprocess` on each, reporting images/s and the peak resident
memory of preprocess (its workers included). `dvc` times a no-op `dvc repro` and `dvc status`
in this repository (run the pipeline first). `train` compares (a) model-only training on
in-memory tensors (the limit), (b) medpipe's training loop (`train.fit`: memory-mapped
arrays, batch augmentation) and (c) a naive pipeline (torchvision ImageFolder over PNGs of
200-320 px, PIL resize + augmentation every epoch, 2 loader workers) on the same phantoms,
model and batch size, then the same for inference, and prints images/s with the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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


def timed_passes(run_pass, passes: int) -> float:
    """Median images/s over `passes` timed passes, after one untimed warm-up pass."""
    import torch

    rates = []
    for i in range(passes + 1):
        start = time.perf_counter()
        images = run_pass()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            rates.append(images / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def write_image_folder(work: Path, root: Path) -> None:
    """The training split's raw phantoms as PNG files in class folders (ImageFolder layout)."""
    from PIL import Image

    from stages.lib.images import read_image
    from stages.lib.io import read_csv

    for row in read_csv(work / "data/split/train.csv").itertuples():
        folder = root / str(row.label)
        folder.mkdir(parents=True, exist_ok=True)
        img = read_image(work / "data/raw", row.image)
        Image.fromarray(img.squeeze()).save(folder / f"{Path(str(row.image)).stem}-{row.Index}.png")


class TrainBench:
    """The three ways to feed one model, on one processed set (one image size)."""

    def __init__(self, work: Path, png_root: Path, model_name: str, batch_size: int):
        import torch

        from stages.lib.checkpoint import ModelMeta
        from stages.lib.models import build_model, select_device
        from stages.lib.params import AugmentParams, ModelParams
        from stages.lib.training import load_split

        self.device = select_device("auto")
        self.images, self.targets, data = load_split(work / "data/processed", "train")
        self.meta = ModelMeta(
            model_name,
            data["classes"],
            data["task"],
            int(self.images.shape[3]),
            int(self.images.shape[1]),
            data["mean"],
            data["std"],
            data["preprocess"],
        )
        self.size = int(self.images.shape[1])
        self.batch_size, self.png_root, self.aug = batch_size, png_root, AugmentParams()
        self.n = len(self.targets) // batch_size * batch_size  # full batches only, as in train
        self.amp = self.device.type == "cuda"  # train.amp applies on CUDA only
        channels = int(self.images.shape[3])

        def fresh_model():
            torch.manual_seed(0)
            model = build_model(
                ModelParams(pretrained=False, name=model_name), len(self.meta.classes), channels
            )
            return model.to(self.device, memory_format=torch.channels_last)

        self.fresh_model = fresh_model
        mean, std = self.meta.normalization()
        x = torch.from_numpy(self.images[: self.n].copy()).permute(0, 3, 1, 2)
        self.tensors = ((x.float() / 255 - mean) / std).to(self.device)
        self.labels = torch.from_numpy(self.targets[: self.n]).to(self.device)
        self.mean, self.std = self.meta.mean, self.meta.std

    def step(self, model, opt, x, y) -> None:
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def model_only_train(self, passes: int) -> float:
        import torch

        model = self.fresh_model().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def one_pass() -> int:
            order = torch.randperm(self.n, device=self.device)
            for i in range(0, self.n, self.batch_size):
                idx = order[i : i + self.batch_size]
                x = self.tensors[idx].contiguous(memory_format=torch.channels_last)
                self.step(model, opt, x, self.labels[idx])
            return self.n

        return timed_passes(one_pass, passes)

    def medpipe_train(self, passes: int) -> float:
        from stages.lib.params import ModelParams, TrainParams
        from stages.lib.training import Recipe, fit

        params = TrainParams(
            epochs=passes + 1, batch_size=self.batch_size, patience=passes + 1, seed=0
        )
        model_params = ModelParams(pretrained=False, name=self.meta.model_name)
        recipe = Recipe(model_params, params, self.aug)
        val = (self.images[: self.batch_size], self.targets[: self.batch_size])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _, history = fit(
                self.fresh_model(), (self.images, self.targets), val, self.meta, recipe
            )
        rates = sorted(row["images_per_second"] for row in history[1:])  # after warm-up
        return rates[len(rates) // 2]

    def naive_loader(self, train: bool, workers: int):
        import torch
        from torchvision import datasets, transforms

        steps = [transforms.Grayscale(int(self.images.shape[3]))]
        if train:
            aug = self.aug
            steps += [
                transforms.RandomResizedCrop(
                    self.size, scale=(aug.crop_scale, 1.0), ratio=(0.9, 1.1)
                ),
                transforms.RandomRotation(aug.rotation),
                transforms.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
            ]
        else:
            steps.append(transforms.Resize((self.size, self.size)))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        dataset = datasets.ImageFolder(str(self.png_root), transforms.Compose(steps))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size if train else 256,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    def naive_train(self, passes: int, workers: int) -> float:
        import torch

        model = self.fresh_model().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = self.naive_loader(True, workers)

        def one_pass() -> int:
            seen = 0
            for x, y in loader:
                x = x.to(self.device, non_blocking=True)
                x = x.contiguous(memory_format=torch.channels_last)
                self.step(model, opt, x, y.to(self.device))
                seen += len(y)
            return seen

        return timed_passes(one_pass, passes)

    def model_only_eval(self, passes: int) -> float:
        import torch

        model = self.fresh_model().eval()

        @torch.inference_mode()
        def one_pass() -> int:
            for i in range(0, self.n, 256):
                model(self.tensors[i : i + 256].contiguous(memory_format=torch.channels_last))
            return self.n

        return timed_passes(one_pass, passes)

    def medpipe_eval(self, passes: int) -> float:
        from stages.lib.inference import predict

        model = self.fresh_model().eval()
        return timed_passes(
            lambda: len(predict(model, self.images, self.meta, 256, self.device)), passes
        )

    def naive_eval(self, passes: int, workers: int) -> float:
        import torch

        model = self.fresh_model().eval()
        loader = self.naive_loader(False, workers)

        @torch.inference_mode()
        def one_pass() -> int:
            seen = 0
            for x, _ in loader:
                model(x.to(self.device).contiguous(memory_format=torch.channels_last))
                seen += len(x)
            return seen

        return timed_passes(one_pass, passes)


def bench_train(
    sizes: list[int], model: str, n_images: int, batch_size: int, passes: int, workers: int
) -> None:
    import torch

    from stages.lib.models import select_device

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)  # as the train stage does
    print(f"# train/eval throughput ({machine()})")
    print(
        f"# {model}, batch {batch_size}, ~{n_images} training phantoms, device "
        f"{select_device('auto')}, median of {passes} passes after a warm-up, naive: "
        f"{workers} loader workers"
    )
    header = "size  phase  a_model_only  b_medpipe  c_naive   b/a    b/c"
    print(header)
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
        work = Path(tmp)
        n_patients = round(n_images / STUDIES_PER_PATIENT / (1 - 0.3))  # train = 70 %
        params = {"data": {"synthetic": {"n_patients": n_patients}}}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        medpipe(work, "download")
        medpipe(work, "split")
        png_root = work / "png"
        write_image_folder(work, png_root)
        for size in sizes:
            params["preprocess"] = {"size": size}
            (work / "params.yaml").write_text(yaml.safe_dump(params))
            medpipe(work, "preprocess")
            bench = TrainBench(work, png_root, model, batch_size)
            rows = {
                "train": (
                    bench.model_only_train(passes),
                    bench.medpipe_train(passes),
                    bench.naive_train(passes, workers),
                ),
                "eval": (
                    bench.model_only_eval(passes),
                    bench.medpipe_eval(passes),
                    bench.naive_eval(passes, workers),
                ),
            }
            for phase, (a, b, c) in rows.items():
                print(
                    f"{size:<5} {phase:<6} {a:>12.0f}  {b:>9.0f}  {c:>7.0f}  "
                    f"{b / a:>5.2f}  {b / c:>5.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess")
    pre.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    sub.add_parser("dvc")
    tr = sub.add_parser("train")
    tr.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    tr.add_argument("--model", default="resnet18")
    tr.add_argument("--images", type=int, default=768, help="training images (about)")
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--passes", type=int, default=2, help="timed passes (after a warm-up)")
    tr.add_argument("--workers", type=int, default=2, help="naive pipeline's loader workers")
    args = parser.parse_args()
    if args.what == "preprocess":
        bench_preprocess(args.sizes)
    elif args.what == "train":
        bench_train(args.sizes, args.model, args.images, args.batch_size, args.passes, args.workers)
    else:
        bench_dvc()


if __name__ == "__main__":
    main()
