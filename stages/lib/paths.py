"""Every file and folder the pipeline passes between stages, relative to the repository root.

The one home of these names: stages take them as defaults of their `run()` arguments (tests
pass others), and dvc.yaml declares the same paths (tests/test_layout.py checks both agree).
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
RECIPES = Path("recipes")  # one params overlay per study (`medpipe recipe apply NAME`)
LOCKS = Path(".medpipe/locks")  # one lock per stage: one run at a time per workspace

# A stage's run() takes its folders as arguments (tests pass others), so the names of the
# files inside them are defined here too: `raw_dir / paths.MANIFEST_NAME`, never a literal
# (tests/test_layout.py finds any other spelling).
MANIFEST_NAME = "manifest.csv"
DATASET_CARD_NAME = "dataset.json"
REJECTED_NAME = "rejected.csv"
THUMBNAILS_NAME = "thumbnails.npy"
PHANTOMS_NAME = "images.npz"  # synthetic images; the manifest refers to `images.npz#<key>`
PHANTOM_MASKS_NAME = "masks.npz"
MEDMNIST_NAME = "source.npz"  # a MedMNIST-format file, refs `source.npz#<split>/<i>`
ARCHIVE_NAME = "images.zip"  # class folders / CSV images packed into one file
DUPLICATES_NAME = "duplicates.csv"  # near-duplicates dropped from or allowed across splits
PROCESSED_META_NAME = "meta.json"  # preprocessing params, classes, task, channels, size

RAW = Path("data/raw")  # download
MANIFEST = RAW / MANIFEST_NAME
DATASET_CARD = RAW / DATASET_CARD_NAME
REJECTED = RAW / REJECTED_NAME
THUMBNAILS = RAW / THUMBNAILS_NAME
SPLIT = Path("data/split")  # split
DUPLICATES = SPLIT / DUPLICATES_NAME
PROCESSED = Path("data/processed")  # preprocess
PROCESSED_META = PROCESSED / PROCESSED_META_NAME


def split_table(folder: Path, split: str) -> Path:
    """One split's rows: `data/split/<split>.csv` (split) and `data/processed/<split>.csv`
    (preprocess: the same rows with their `index` into the arrays)."""
    return Path(folder) / f"{split}.csv"


def split_images(folder: Path, split: str) -> Path:
    """One split's preprocessed images, uint8 (N, S, S, C)."""
    return Path(folder) / f"{split}_images.npy"


def split_masks(folder: Path, split: str) -> Path:
    """One split's preprocessed lesion masks (N, S, S), when the data has masks."""
    return Path(folder) / f"{split}_masks.npy"


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


def tune_summary(study: str, folder: Path = TUNE_RESULTS) -> Path:
    """One search's outcome (space, counts, best trial, confirmation)."""
    return folder / f"{study}.json"


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

# names inside the plots folders (each stage writes its folder whole)
SAMPLES_NAME = "samples.png"
HISTORY_NAME = "history.csv"
PREDICTIONS_NAME = "predictions.csv"  # per test image: label, probabilities, group
CONFUSION_NAME = "confusion.csv"  # (actual, predicted) pairs
CONFUSION_NORMALIZED_NAME = "confusion_normalized.csv"
CALIBRATION_NAME = "calibration.csv"  # reliability bins
SHIFT_NAME = "shift.csv"  # validation against test per class
CURVE_KINDS = ("roc", "pr")  # one CSV per class in each: plots/evaluate/<kind>/<class>.csv
EMBEDDING_NAME = "embedding.csv"
GALLERY_NAME = "gallery.csv"  # the Grad-CAM images shown, per class and outcome
POINTING_NAME = "pointing.csv"  # pointing game per class

PLOTS = Path("plots")
PREPROCESS_PLOTS = PLOTS / "preprocess"
SAMPLES = PREPROCESS_PLOTS / SAMPLES_NAME
TRAIN_PLOTS = PLOTS / "train"
HISTORY = TRAIN_PLOTS / HISTORY_NAME
LIVE = Path("dvclive")  # DVCLive's per-epoch log, written while training runs
LIVE_METRICS = LIVE / "metrics.json"
LIVE_PLOTS = LIVE / "plots"
EVALUATE_PLOTS = PLOTS / "evaluate"
PREDICTIONS = EVALUATE_PLOTS / PREDICTIONS_NAME
CONFUSION = EVALUATE_PLOTS / CONFUSION_NAME
CALIBRATION = EVALUATE_PLOTS / CALIBRATION_NAME
EMBED_PLOTS = PLOTS / "embed"
EMBEDDING = EMBED_PLOTS / EMBEDDING_NAME
EXPLAIN_PLOTS = PLOTS / "explain"


def curve_file(folder: Path, kind: str, name: str) -> Path:
    """One class's ROC or PR curve (`kind` of CURVE_KINDS); `name` is the class's file-safe
    name (io.safe_name)."""
    return Path(folder) / kind / f"{name}.csv"


def gallery_image(folder: Path, name: str) -> Path:
    """One class's Grad-CAM gallery; `name` is the class's file-safe name (io.safe_name)."""
    return Path(folder) / f"{name}.png"


PREDICT_OUTPUT = Path("predictions.csv")  # `medpipe predict`'s default, in the working folder

REPORTS = Path("reports")
REPORT = REPORTS / "report.html"
COMPARE = REPORTS / "compare.html"


def tune_report(study: str, folder: Path = REPORTS) -> Path:
    """One search's page (`medpipe tune`)."""
    return folder / f"tune-{study}.html"
