"""Every file and folder the pipeline passes between stages, relative to the repository root.

The one home of these names: stages take them as defaults of their `run()` arguments (tests
pass others), and dvc.yaml declares the same paths (tests/test_layout.py checks both agree).
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
RECIPES = Path("recipes")  # one params overlay per study (`medpipe recipe apply NAME`)
LOCKS = Path(".medpipe/locks")  # one lock per stage: one run at a time per workspace

RAW = Path("data/raw")  # download
MANIFEST = RAW / "manifest.csv"
DATASET_CARD = RAW / "dataset.json"
REJECTED = RAW / "rejected.csv"
THUMBNAILS = RAW / "thumbnails.npy"
SPLIT = Path("data/split")  # split
DUPLICATES_NAME = "duplicates.csv"  # near-duplicates dropped from or allowed across splits
DUPLICATES = SPLIT / DUPLICATES_NAME
PROCESSED = Path("data/processed")  # preprocess

MODEL = Path("models/model.pt")  # train
RESUME = Path("models/last.pt")
TORCHSCRIPT = Path("models/model.ts")  # export
ONNX = Path("models/model.onnx")

METRICS = Path("metrics")
SPLIT_METRICS = METRICS / "split.json"
TRAIN_METRICS = METRICS / "train.json"
EVALUATE_METRICS = METRICS / "evaluate.json"
EXPORT_METRICS = METRICS / "export.json"
EMBED_METRICS = METRICS / "embed.json"
EXPLAIN_METRICS = METRICS / "explain.json"


TUNE = Path(".medpipe/tune")  # `medpipe tune`: search journals (default storage), trial logs
TUNE_RESULTS = METRICS / "tune"  # one summary per search, git-tracked
SPREAD = METRICS / "spread"  # `medpipe spread`: K trainings (seeds) of the recipe, git-tracked
SPREAD_SUMMARY = SPREAD / "summary.json"


def spread_predictions(seed: int, folder: Path = SPREAD) -> Path:
    """One recorded training's per-image test predictions."""
    return folder / f"seed-{seed}.csv"


def detail_file(metrics_file: Path) -> Path:
    """Where the detail of a metrics file goes (nested tables, [lo, hi] intervals): a
    DVC-cached file that `dvc exp show` does not turn into columns."""
    return metrics_file.parent / "detail" / metrics_file.name


TRAIN_DETAIL = detail_file(TRAIN_METRICS)  # timings
EVALUATE_DETAIL = detail_file(EVALUATE_METRICS)  # per-class/group tables, CIs, threshold
EXPORT_DETAIL = detail_file(EXPORT_METRICS)  # differences to PyTorch, ONNX Runtime latency
EXPLAIN_DETAIL = detail_file(EXPLAIN_METRICS)  # per-class pointing game, CAM energy

PLOTS = Path("plots")
PREPROCESS_PLOTS = PLOTS / "preprocess"
SAMPLES = PREPROCESS_PLOTS / "samples.png"
TRAIN_PLOTS = PLOTS / "train"
HISTORY = TRAIN_PLOTS / "history.csv"
LIVE = Path("dvclive")  # DVCLive's per-epoch log, written while training runs
LIVE_METRICS = LIVE / "metrics.json"
LIVE_PLOTS = LIVE / "plots"
EVALUATE_PLOTS = PLOTS / "evaluate"
PREDICTIONS = EVALUATE_PLOTS / "predictions.csv"
EMBED_PLOTS = PLOTS / "embed"
EMBEDDING = EMBED_PLOTS / "embedding.csv"
EXPLAIN_PLOTS = PLOTS / "explain"

REPORTS = Path("reports")
REPORT = REPORTS / "report.html"
COMPARE = REPORTS / "compare.html"
