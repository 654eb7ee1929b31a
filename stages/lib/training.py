"""The training loop: batches from memory-mapped arrays, augmentation on the device,
validation, early stopping on the monitored metric, and a per-epoch resume checkpoint.
Under torchrun every process trains on its shard (DistributedDataParallel); rank 0 alone
validates."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from dvclive import Live
from stages.lib import metrics, runtime
from stages.lib.augment import BatchAugment
from stages.lib.checkpoint import ModelMeta
from stages.lib.inference import iter_batches, predict
from stages.lib.io import ArrayRows, read_processed
from stages.lib.labels import targets
from stages.lib.metric_registry import monitor_higher_is_better
from stages.lib.models import head_names, memory_format, select_device, trainable_parameters
from stages.lib.optim import LRSchedule, build_loss, build_optimizer, build_sampler
from stages.lib.params import AugmentParams, ModelParams, TrainParams
from stages.lib.runtime import DistInfo

AUG_SEED = 7919  # offset of the augmentation generator's seed from train.seed


# EarlyStopping fields saved in the resume checkpoint, in order
EARLY_STOPPING_KEYS = ("history", "best", "best_state", "stale", "smoothed", "best_smoothed")
EMA_WARMUP_POWER = 0.75  # ModelEmaV3 warm-up for runs of thousands of steps (timm's advice)


@dataclass(frozen=True)
class Recipe:
    """What one training run trains and how: the model, train and augment sections, handed
    whole from `train.run` down to the loader, the optimiser and the schedule."""

    model: ModelParams
    train: TrainParams
    augment: AugmentParams

    @property
    def body_lr_scale(self) -> float:
        """The backbone's lr factor after `model.freeze_epochs` (1: no freezing)."""
        return self.train.unfreeze_lr_factor if self.model.freeze_epochs else 1.0

    def for_member(self, k: int) -> Recipe:
        """Member `k` of a `train.ensemble`: its own seed (seed + k), trained as one model."""
        update = {"seed": self.train.seed + k, "ensemble": 1}
        return replace(self, train=self.train.model_copy(update=update))


@dataclass(frozen=True)
class RunContext:
    """Where a training runs and what it reports to, apart from the recipe.

    `live`: DVCLive (rank 0 only). `resume_file`/`run_id`: the per-epoch resume checkpoint
    and the fingerprint a saved state must match. `on_epoch(history)`: runs on rank 0 after
    every epoch; a message it returns stops training. `resume_extra`: saved with every state
    (an ensemble's finished members and this member's index). `final` False leaves the resume
    file for the caller to close (the ensemble's next member).
    """

    live: Live | None = None
    resume_file: Path | None = None
    run_id: str = ""
    info: DistInfo = field(default_factory=DistInfo)
    on_epoch: Callable[[list[dict]], str | None] | None = None
    resume_extra: dict | None = None
    final: bool = True


POLICIES = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
    "autoaugment": v2.AutoAugment,
}


def build_transform(aug: AugmentParams) -> nn.Module | None:
    """The per-image part of the augmentation, on (C, H, W) uint8 tensors in the loader: only
    an automatic policy, which has no batched form. The rest runs on whole batches on the
    training device (`augment.BatchAugment`)."""
    return POLICIES[aug.policy]() if aug.policy != "none" else None


def identity_collate(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn that passes the batch through: `ArrayDataset.__getitems__` already returns
    the stacked (x, y), which the default collate would take for two samples to stack."""
    return batch


class ArrayDataset(Dataset):
    """Items of a (N, H, W, C) uint8 array as (C, H, W) uint8 tensors with their target (a
    class index, or a multi-hot float vector). The loader fetches a batch with one array
    gather (`__getitems__`), not one Python call per image."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: nn.Module | None):
        self.targets, self.transform = targets, transform
        self.rows = ArrayRows(images)  # memory-mapped images: read rows, not pages

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.rows.take(indices)).permute(0, 3, 1, 2)
        if self.transform is not None:
            x = torch.stack([self.transform(img) for img in x])
        return x, torch.from_numpy(np.take(self.targets, indices, axis=0))


def set_trainable(model: nn.Module, head_only: bool, trainable_from: str | None = None) -> None:
    """Train the classifier only (head_only), the blocks from `trainable_from` on, or all."""
    head = head_names(model)
    names = trainable_parameters(model, trainable_from)
    for name, p in model.named_parameters():
        p.requires_grad = name in head or (not head_only and name in names)


def validate(
    model: nn.Module,
    images: np.ndarray,
    y: np.ndarray,
    meta: ModelMeta,
    device: torch.device,
    loss_fn,
) -> dict[str, float]:
    """Validation loss (weights as in training, no smoothing) and headline metrics."""
    probs = predict(model, images, meta, 256, device)
    p, target = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7), torch.tensor(y)
    if y.ndim == 2:  # multi-label: per-label sigmoid probabilities
        pos_weight = None if loss_fn.pos_weight is None else loss_fn.pos_weight.cpu()
        logits = torch.log(p) - torch.log1p(-p)
        loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, target)
        return {"loss": float(loss), **metrics.summarize_multilabel(y, probs)}
    weight = None if loss_fn.weight is None else loss_fn.weight.cpu()
    loss = nn.NLLLoss(weight=weight)(torch.log(p), target)
    return {"loss": float(loss), **metrics.summarize(y, probs)}


def build_loader(
    dataset: ArrayDataset,
    params: TrainParams,
    generator: torch.Generator,
    info: DistInfo,
    pin_memory: bool,
) -> DataLoader:
    """Shuffled (or class-balanced) batches; under torchrun each rank gets its own share."""
    batch_size = params.batch_size // info.world  # train.batch_size is the global batch
    if batch_size < 1 or len(dataset) // (batch_size * info.world) == 0:
        raise ValueError(
            f"train.batch_size {params.batch_size} does not fit {len(dataset)} training images "
            f"on {info.world} process(es); lower it (or raise it to at least one per process)"
        )
    sampler = None
    if params.sampler == "balanced":
        sampler = build_sampler(dataset.targets, generator, len(dataset) // info.world)
    elif info.world > 1:
        sampler = DistributedSampler(
            dataset, info.world, info.rank, shuffle=True, seed=params.seed, drop_last=True
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        collate_fn=identity_collate,
        num_workers=params.num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # fresh workers seeded from `generator` each epoch: resumable
    )


class FilesOnlyLive(Live):
    """DVCLive writing its files, without its repository integration.

    medpipe declares DVCLive's files in dvc.yaml (`dvcyaml=False`) and saves no experiment
    of its own (`save_dvc_exp=False`), so that integration has nothing to do here, and it
    fails or surprises: in a git repository without a commit (`git init; dvc init; dvc
    repro` before the first commit) it raises scmrepo's "Empty git repo" (its check for no
    commits comes after asking for the commit, dvclive 3.x), and in a git repository
    without DVC it runs `dvc init`.
    """

    def _init_dvc(self) -> None:
        self._dvc_file = "dvc.yaml"  # never written: dvcyaml=False
        self._save_dvc_exp = False


def open_live(path: Path) -> Live:
    return FilesOnlyLive(str(path), dvcyaml=False, save_dvc_exp=False)


def log_row(live: Live | None, row: dict, monitor: str) -> None:
    """One DVCLive step: the losses and the monitored metric, for live plots while training
    runs (the full row is in history.csv)."""
    if live is None:
        return
    for key in dict.fromkeys(("train_loss", "val_loss", monitor)):
        live.log_metric(key.replace("val_", "val/").replace("train_", "train/"), row[key])
    live.next_step()


@dataclass
class Batches:
    """How a uint8 batch reaches the model: device, augmentation, normalisation, memory
    layout, autocast."""

    device: torch.device
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor
    amp: bool
    augment: nn.Module | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.device)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float() / 255
        if self.augment is not None:
            x = self.augment(x)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


@dataclass
class EarlyStopping:
    """History, best epoch and early-stopping state so far: what a resumed run must get back.

    Every epoch offers one or more sets of weights (the raw ones and, with `train.ema`, their
    moving average), each with its validation row; the best on the monitored metric is kept.
    Early stopping counts epochs since the best value of the metric smoothed with factor
    `smoothing` (0: the raw best, the classic rule).
    """

    monitor: str
    history: list[dict] = field(default_factory=list)
    best: float = -np.inf
    best_state: dict | None = None
    stale: int = 0
    smoothed: float | None = None
    best_smoothed: float = -np.inf
    smoothing: float = 0.0

    def value(self, row: dict, prefix: str = "") -> float:
        """The monitored metric of `prefix` weights, higher = better (NaN counts as worst)."""
        value = row[prefix + self.monitor]
        value = value if monitor_higher_is_better(self.monitor) else -value
        return -np.inf if np.isnan(value) else value

    def candidates(self, row: dict) -> dict[str, float]:
        """{weights name: monitored value} of the weights validated this epoch."""
        values = {"raw": self.value(row)}
        if f"ema_{self.monitor}" in row:
            values["ema"] = self.value(row, "ema_")
        return values

    def score(self, row: dict) -> float:
        """The epoch's monitored value: the best of its weights."""
        return max(self.candidates(row).values())

    def record(self, row: dict, models: dict[str, nn.Module], keep_weights: bool) -> None:
        """Add the epoch's row; keep the weights (`models[name]`) if they are the best yet."""
        self.history.append(row)
        name, value = max(self.candidates(row).items(), key=lambda kv: kv[1])
        row["weights"] = name
        if self.best_state is None or value > self.best:
            self.best, row["best"] = value, True
            self.best_state = copy.deepcopy(models[name].state_dict()) if keep_weights else {}
        a = self.smoothing
        self.smoothed = value if self.smoothed is None else a * self.smoothed + (1 - a) * value
        if self.smoothed > self.best_smoothed:
            self.best_smoothed, self.stale = self.smoothed, 0
        else:
            self.stale += 1


def train_epoch(
    trainer: Trainer, net: nn.Module, params: TrainParams, epoch: int, show: bool
) -> tuple[float, int, float]:
    """One pass over the loader (mixed batches with mixup/cutmix, the weight average updated
    after every step with `train.ema`); returns mean loss, images seen and seconds taken."""
    t, start, total, seen = trainer, time.perf_counter(), 0.0, 0
    step0 = (epoch - 1) * len(t.loader)
    desc = f"epoch {epoch}/{params.epochs}"
    bar = tqdm(t.loader, desc=desc, leave=False, mininterval=1, disable=not show)
    for step, (x, y) in enumerate(bar, start=1):
        x, y = t.batches.prepare(x), y.to(t.device, non_blocking=True)
        if t.mixup is not None:
            x, y = t.mixup(x, y)  # soft targets: the blend of both images' labels
        with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.batches.amp):
            loss = t.loss_fn(net(x).float(), y)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
        t.opt.step()
        t.sched.step_update(step0 + step)
        if t.ema is not None:
            t.ema.update(t.model, step=step0 + step)
        total, seen = total + loss.item() * len(y), seen + len(y)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total / seen, seen, time.perf_counter() - start


def wrap_model(
    model: nn.Module, params: TrainParams, info: DistInfo, device: torch.device
) -> nn.Module:
    """The module the training step calls: DDP under torchrun, compiled when asked."""
    net = model
    if info.world > 1:  # wrap after requires_grad is set: DDP syncs only trainable params
        net = DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    return torch.compile(net) if params.compile else net


def restore(state: dict, trainer: Trainer, info: DistInfo) -> EarlyStopping:
    """Load a resume checkpoint into the training objects; return the stopping state it holds."""
    t = trainer
    t.model.load_state_dict(state["model"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["schedule"])
    runtime.set_rng_state(state["rng"][info.rank], *t.generators)
    stopping = EarlyStopping(t.sched.params.monitor, *(state[k] for k in EARLY_STOPPING_KEYS))
    stopping.smoothing = t.sched.params.monitor_smoothing
    return stopping


@dataclass
class Trainer:
    """What one training run threads through its epochs."""

    model: nn.Module
    device: torch.device
    batches: Batches
    loader: DataLoader
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    sched: LRSchedule
    generators: tuple[torch.Generator, ...]  # the loader's, the augmentation's
    mixup: Mixup | None = None
    ema: ModelEmaV3 | None = None
    bn_images: np.ndarray | None = None  # training images PreciseBN recomputes BN stats on


def recompute_bn(model: nn.Module, images: np.ndarray, batches: Batches, batch_size: int) -> None:
    """PreciseBN: BatchNorm running statistics recomputed (plain average, no momentum) from
    `images` through the current weights, by torch's swa_utils.update_bn."""
    augment, batches.augment = batches.augment, None  # the images as evaluation sees them
    try:
        inputs = [
            batches.prepare(torch.from_numpy(np.asarray(chunk)).permute(0, 3, 1, 2))
            for chunk in iter_batches(images, batch_size)
        ]
    finally:
        batches.augment = augment
    update_bn(inputs, model)


def bn_subset(images: np.ndarray, params: TrainParams) -> np.ndarray | None:
    """The fixed, seeded sample of training images for `train.precise_bn` (None: off)."""
    if not params.precise_bn:
        return None
    n = min(len(images), params.precise_bn * params.batch_size)
    rng = np.random.default_rng(params.seed)
    return ArrayRows(images).take(np.sort(rng.choice(len(images), n, replace=False)).tolist())


def build_mixup(aug: AugmentParams, batch_size: int, n_classes: int, multilabel: bool):
    """timm's Mixup for augment.mixup / augment.cutmix (None when both are 0). Label
    smoothing stays with the loss, which takes the soft targets."""
    if not (aug.mixup or aug.cutmix):
        return None
    if batch_size % 2:
        raise ValueError(
            f"augment.mixup/cutmix: timm's Mixup needs an even batch per process, got "
            f"{batch_size}; make train.batch_size even (per process under torchrun)"
        )
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mix_prob,
        label_smoothing=0.0,
        num_classes=n_classes,
        multi_label=multilabel,
    )


def build_trainer(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    meta: ModelMeta,
    recipe: Recipe,
    info: DistInfo,
) -> Trainer:
    """Device, seeded generators, batches, loader, loss, optimiser and schedule."""
    params, aug = recipe.train, recipe.augment
    device = runtime.init_distributed(info, select_device(params.device))
    mean, std = meta.normalization(device)
    generator = torch.Generator().manual_seed(params.seed + info.rank)  # order, workers
    # augmentation draws from its own stream: the same whatever num_workers prefetches
    augment = BatchAugment(aug, torch.Generator().manual_seed(params.seed + info.rank + AUG_SEED))
    batches = Batches(device, mean, std, params.amp and device.type == "cuda", augment)
    model.to(device, memory_format=batches.memory_format)
    dataset = ArrayDataset(train[0], train[1], build_transform(aug))
    loader = build_loader(dataset, params, generator, info, device.type == "cuda")
    loss_fn = build_loss(params, train[1], len(meta.classes)).to(device)
    opt = build_optimizer(model, params, head_names(model), body_lr_scale=recipe.body_lr_scale)
    sched = LRSchedule(opt, params, len(loader))
    generators = (generator, augment.generator)
    np.random.seed(params.seed + info.rank)  # timm's Mixup draws from numpy's global stream
    mixup = build_mixup(aug, params.batch_size // info.world, len(meta.classes), meta.multilabel)
    ema = None
    if params.ema:
        ema = ModelEmaV3(model, params.ema, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
    bn_images = bn_subset(train[0], params)
    return Trainer(
        model, device, batches, loader, loss_fn, opt, sched, generators, mixup, ema, bn_images
    )


def run_epoch(
    trainer: Trainer,
    net: nn.Module,
    val: tuple[np.ndarray, np.ndarray],
    meta: ModelMeta,
    params: TrainParams,
    epoch: int,
    info: DistInfo,
) -> dict:
    """Train one epoch, validate on rank 0; the history row, the same on every rank."""
    if isinstance(trainer.loader.sampler, DistributedSampler):
        trainer.loader.sampler.set_epoch(epoch)
    trainer.model.train()
    t = trainer
    loss, seen, seconds = train_epoch(t, net, params, epoch, info.is_main)
    row = None
    if info.is_main:  # rank 0 validates; every rank gets the same row
        if t.bn_images is not None:
            recompute_bn(t.model, t.bn_images, t.batches, params.batch_size)
        scores = validate(t.model, val[0], val[1], meta, t.device, t.loss_fn)
        row = {
            "epoch": epoch,
            "train_loss": loss,
            "lr": t.opt.param_groups[-1]["lr"],  # the head's group: lr_scale 1
            "images_per_second": seen * info.world / seconds,
            "epoch_seconds": seconds,
            **{f"val_{k}": v for k, v in scores.items()},
        }
        if t.ema is not None:
            if t.bn_images is not None:
                recompute_bn(t.ema.module, t.bn_images, t.batches, params.batch_size)
            scores = validate(t.ema.module, val[0], val[1], meta, t.device, t.loss_fn)
            row |= {f"ema_val_{k}": v for k, v in scores.items()}
    return runtime.broadcast(row, info)


def resume_state(
    trainer: Trainer, stopping: EarlyStopping, rng: list, run_id: str, epoch: int
) -> dict:
    """Everything a killed run needs to continue after `epoch`."""
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.opt.state_dict()}
    if trainer.ema is not None:
        state["ema"] = trainer.ema.state_dict()
    state |= {k: getattr(stopping, k) for k in EARLY_STOPPING_KEYS}
    state |= {"schedule": trainer.sched.state_dict(), "rng": rng}
    return state | {"fingerprint": run_id, "epoch": epoch, "finished": False}


def resume(trainer: Trainer, recipe: Recipe, context: RunContext) -> tuple[EarlyStopping, int]:
    """The stopping state and first epoch: from a matching unfinished resume checkpoint, or
    afresh. A saved state of another ensemble member is not continued here."""
    params, ctx = recipe.train, context
    stopping = EarlyStopping(params.monitor, smoothing=params.monitor_smoothing)
    info, extra = ctx.info, ctx.resume_extra or {}
    state = (
        runtime.load_resume(ctx.resume_file, ctx.run_id, info.is_main) if ctx.resume_file else None
    )
    if state is None or "model" not in state or state.get("member") != extra.get("member"):
        return stopping, 1  # between two members of an ensemble: this member starts afresh
    stopping = restore(state, trainer, info)
    for row in stopping.history:
        log_row(ctx.live, row, params.monitor)
    if info.is_main:
        tqdm.write(f"resuming from {ctx.resume_file} after epoch {state['epoch']}")
    return stopping, state["epoch"] + 1


def epoch_line(row: dict, monitor: str, ema: bool) -> str:
    """The one line printed after each epoch."""
    averaged = f" (ema {row[f'ema_{monitor}']:.3f})" if ema else ""
    return (
        f"epoch {row['epoch']}: train_loss {row['train_loss']:.3f}  "
        f"val_loss {row['val_loss']:.3f}  {monitor} {row[monitor]:.3f}"
        f"{averaged}  {row['images_per_second']:.0f} img/s"
    )


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    meta: ModelMeta,
    recipe: Recipe,
    context: RunContext = RunContext(),
) -> tuple[dict, list[dict]]:
    """Train with early stopping; return the best state dict and the per-epoch history.

    With `context.resume_file`, the state after every epoch is saved there and a matching
    unfinished checkpoint (same `run_id`) is continued instead of starting over; a message
    returned by `context.on_epoch` stops training there (a search's pruner), with the best
    state so far.
    """
    params, ctx, info = recipe.train, context, context.info
    freeze_epochs, extra = recipe.model.freeze_epochs, context.resume_extra or {}
    trainer = build_trainer(model, train, meta, recipe, info)
    stopping, start = resume(trainer, recipe, ctx)
    phase = None
    for epoch in range(start, params.epochs + 1):
        if phase != (epoch <= freeze_epochs):  # head only, then the trainable blocks
            phase = epoch <= freeze_epochs
            set_trainable(model, phase, recipe.model.trainable_from)
            net = wrap_model(model, params, info, trainer.device)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = run_epoch(trainer, net, val, meta, params, epoch, info)
        row["trainable_params"] = trainable  # head only while frozen, then the blocks trained
        log_row(ctx.live, row, params.monitor)
        weights = {"raw": model} | ({"ema": trainer.ema.module} if trainer.ema else {})
        stopping.record(row, weights, keep_weights=info.is_main)
        trainer.sched.step_epoch(stopping.score(row))
        finished = stopping.stale >= params.patience or epoch == params.epochs
        rng = runtime.gather(runtime.rng_state(*trainer.generators), info)
        if ctx.resume_file and info.is_main and not finished:
            state = resume_state(trainer, stopping, rng, ctx.run_id, epoch)
            runtime.save_resume(ctx.resume_file, state | extra)
        stop = None
        if info.is_main and ctx.on_epoch is not None:
            stop = ctx.on_epoch(stopping.history)
        stop = runtime.broadcast(stop, info)  # a pruned search trial stops on every rank
        if info.is_main:
            tqdm.write(epoch_line(row, params.monitor, trainer.ema is not None))
            if stop:
                tqdm.write(stop)
        if stop or finished:
            break
    if ctx.resume_file and info.is_main and ctx.final:  # a small marker: DVC expects the output
        runtime.save_resume(ctx.resume_file, {"fingerprint": ctx.run_id, "finished": True})
    return stopping.best_state, stopping.history


def load_split(processed_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images (N, S, S, C), memory-mapped (read batch by batch, never all at once),
    targets (class indices or multi-hot rows) and meta."""
    images, frame, meta = read_processed(processed_dir, split)
    return np.asarray(images), targets(frame, meta), meta
