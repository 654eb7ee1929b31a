"""train stage: fit a timm model on the processed arrays, keep the best epoch.

Outputs: models/model.pt (weights + `ModelMeta`), metrics/train.json (rewritten after every
epoch: `dvc exp show` follows the run live), plots/train/history.csv
(one row per epoch), dvclive/ (losses and the monitored metric for live plots) and
models/last.pt, the per-epoch resume checkpoint (rerunning after a kill
continues from the last finished epoch). The loop itself is `lib.training.fit`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from stages.lib import paths, pipeline, runtime
from stages.lib.checkpoint import ModelMeta
from stages.lib.io import atomic_dir, write_csv, write_result
from stages.lib.models import (
    Ensemble,
    build_architecture,
    build_model,
    pretrained_norm,
    save_checkpoint,
    select_device,
)
from stages.lib.params import AugmentParams, ModelParams, TrainParams
from stages.lib.runtime import DistInfo
from stages.lib.training import Recipe, RunContext, fit, load_split, open_live, validate
from stages.lib.tuning import TrialLink

TIMING_KEYS = ("train_seconds", "images_per_second")  # the only run-to-run differences
# metrics/train.json; the timings (hardware figures) go to metrics/detail/train.json
HEADLINE = ("best_epoch", "best_weights", "epochs_run", "device", "processes", "hardware")


@dataclass(frozen=True)
class TrainOutputs:
    """The files the train stage writes (defaults: `lib.paths`)."""

    model_file: Path = paths.MODEL
    metrics_file: Path = paths.TRAIN_METRICS
    plots_dir: Path = paths.TRAIN_PLOTS
    resume_file: Path = paths.RESUME
    live_dir: Path = paths.LIVE


def build_meta(
    model_params: ModelParams,
    data_meta: dict,
    model: torch.nn.Module,
    shape: tuple[int, ...],
    monitor: str,
    params: dict,
) -> ModelMeta:
    """The checkpoint's meta before training (best_epoch is filled in at the end). Pretrained
    runs normalise with the statistics the weights were trained with."""
    size, channels = int(shape[1]), int(shape[3])
    mean, std = data_meta["mean"], data_meta["std"]
    if model_params.pretrained:
        mean, std = pretrained_norm(model, channels)
    return ModelMeta(
        model_name=model_params.name,
        classes=data_meta["classes"],
        task=data_meta["task"],
        positive_class=data_meta.get("positive_class"),
        channels=channels,
        input_size=size,
        mean=mean,
        std=std,
        preprocess=data_meta["preprocess"],
        dataset=data_meta["dataset"],
        head_hidden=model_params.head_hidden,
        weights_source=getattr(model, "weights_source", None),
        monitor=monitor,
        params=params,
    )


def summarize(history: list[dict], params: TrainParams, info: DistInfo, seconds: float) -> dict:
    """metrics/train.json: best epoch and score, epochs run, throughput."""
    best_row = next(r for r in reversed(history) if r.get("best"))
    images = sum(r["images_per_second"] * r["epoch_seconds"] for r in history)
    return {
        "best_epoch": best_row["epoch"],
        "best_weights": best_row.get("weights", "raw"),  # "ema": the weight average won
        "epochs_run": len(history),
        f"best_{params.monitor}": round(best_row[params.monitor], 4),
        "train_seconds": round(seconds, 1),
        "images_per_second": round(images / sum(r["epoch_seconds"] for r in history), 1),
        "device": select_device(params.device).type,
        "processes": info.world,
        "hardware": runtime.hardware(select_device(params.device)),
    }


def write_summary(
    metrics_file: Path,
    history: list[dict],
    params: TrainParams,
    info: DistInfo,
    start: float,
    extra: dict | None = None,
) -> dict:
    """metrics/train.json (headline) and its detail (timings), rewritten after every epoch:
    `dvc exp show` follows a run live; the last write is the run's summary."""
    summary = summarize(history, params, info, time.perf_counter() - start) | (extra or {})
    keys = (*HEADLINE, f"best_{params.monitor}", "members", f"ensemble_{params.monitor}")
    keys += ("pruned_after_epoch",)
    write_result(metrics_file, summary, keys)
    return summary


def fit_members(
    model: torch.nn.Module,
    recipe: Recipe,
    train: tuple,
    val: tuple,
    meta: ModelMeta,
    context: RunContext,
) -> tuple[list[dict], list[dict]]:
    """Train the model, or the `train.ensemble` members one after the other (seeds seed,
    seed + 1, ...); their best states and the history (a `member` column for ensembles).

    An ensemble's resume file also holds the finished members, so a killed run continues
    with the member it was training, from its last finished epoch.
    """
    info, on_epoch = context.info, context.on_epoch
    resume_file, run_id = context.resume_file, context.run_id
    if recipe.train.ensemble == 1:
        state, history = fit(model, train, val, meta, recipe, context=context)
        return [state], history
    saved = runtime.load_resume(resume_file, run_id, remove_stale=False) or {}
    done: list[dict] = list(saved.get("members_done", []))
    states, history = [d["state"] for d in done], [r for d in done for r in d["history"]]
    for k in range(len(done), recipe.train.ensemble):
        member = recipe.for_member(k)
        if k:  # member 0 is the model built by the caller (seed); the others their own
            torch.manual_seed(member.train.seed)
            model = build_model(recipe.model, len(meta.classes), meta.channels)
            if info.world > 1:
                torch.manual_seed(member.train.seed + info.rank)
        member_context = replace(
            context,
            resume_extra={"member": k, "members_done": done},
            final=False,
            on_epoch=lambda rows, k=k, before=list(history): on_epoch(
                before + [r | {"member": k} for r in rows]
            ),
        )
        state, rows = fit(model, train, val, meta, member, context=member_context)
        rows = [r | {"member": k} for r in rows]
        states.append(state)
        if getattr(on_epoch, "stopped", None):  # pruned: no further members
            history += rows
            break
        history += rows
        done = [*done, {"state": state, "history": rows}]
        if info.is_main:  # the finished members survive a kill of the next one
            between = {"fingerprint": run_id, "finished": False, "members_done": done}
            runtime.save_resume(resume_file, between)
    if info.is_main:
        runtime.save_resume(resume_file, {"fingerprint": run_id, "finished": True})
    return states, history


def assemble(states: list[dict], model: torch.nn.Module, meta: ModelMeta) -> torch.nn.Module:
    """The model as saved: `model` with its best state, or the `Ensemble` of all members."""
    if len(states) == 1:
        model.load_state_dict(states[0])
        return model
    members = []
    for state in states:
        member = build_architecture(replace(meta, members=1))
        member.load_state_dict(state)
        members.append(member)
    return Ensemble(members, meta.multilabel)


class EpochHook:
    """After every epoch (rank 0): the live summary, and in a search (`medpipe tune`) the
    epoch's validation value to the pruner; its message when the trial is pruned."""

    def __init__(self, write, link: TrialLink | None) -> None:
        self.write, self.link, self.stopped = write, link, None
        self.pruned_after: int | None = None

    def __call__(self, rows: list[dict]) -> str | None:
        if self.link is not None and self.stopped is None:
            self.stopped = self.link.report(rows)
            self.pruned_after = len(rows) if self.stopped else None
        self.write(rows, self.extra())
        return self.stopped

    def extra(self) -> dict:
        return {"pruned_after_epoch": self.pruned_after} if self.pruned_after else {}


def set_threads(info: DistInfo) -> None:
    """Share the cores among the processes of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // info.local_world))


def run(
    model_params: ModelParams,
    params: TrainParams,
    aug: AugmentParams,
    processed_dir: Path = paths.PROCESSED,
    outputs: TrainOutputs = TrainOutputs(),
) -> str:
    out, recipe = outputs, Recipe(model_params, params, aug)
    start = time.perf_counter()
    info = runtime.dist_info()
    torch.manual_seed(params.seed)
    runtime.set_deterministic(params.deterministic)
    set_threads(info)
    train_x, train_y, data_meta = load_split(processed_dir, "train")
    val_x, val_y, _ = load_split(processed_dir, "val")
    model = build_model(model_params, len(data_meta["classes"]), int(train_x.shape[3]))
    if info.world > 1:
        torch.manual_seed(params.seed + info.rank)  # same init everywhere, own augmentation
    all_params = {"model": model_params, "train": params, "augment": aug}
    all_params = {k: v.model_dump() for k, v in all_params.items()}
    meta = build_meta(model_params, data_meta, model, train_x.shape, params.monitor, all_params)
    run_id = runtime.fingerprint(
        {**all_params, "world": info.world},
        [
            processed_dir / paths.PROCESSED_META_NAME,
            *(paths.split_table(processed_dir, s) for s in ("train", "val")),
        ],
        [pipeline.ROOT / f for f in pipeline.code_files("stages.train")],
    )
    link = TrialLink.from_env() if info.is_main else None  # set by `medpipe tune` only
    hook = EpochHook(
        lambda rows, extra: write_summary(out.metrics_file, rows, params, info, start, extra), link
    )
    # only rank 0 writes; other ranks train their share and stop here
    plots = atomic_dir(out.plots_dir) if info.is_main else contextlib.nullcontext(None)
    try:
        with runtime.sigterm_as_exit(), plots as tmp:
            # DVCLive writes each epoch as it ends (live view), not through the atomic folder
            live = open_live(out.live_dir) if tmp else None
            context = RunContext(live, out.resume_file, run_id, info, hook)
            train, val = (train_x, train_y), (val_x, val_y)
            states, history = fit_members(model, recipe, train, val, meta, context)
            if tmp is not None:
                live.end()
                history_frame = pd.DataFrame(history).drop(columns="best", errors="ignore")
                write_csv(tmp / paths.HISTORY.name, history_frame)
    finally:
        runtime.close_distributed()
    if not info.is_main:
        return f"train: rank {info.rank} of {info.world} done"
    final = assemble(states, model, meta)
    extra = hook.extra()
    if len(states) > 1:  # the ensemble as shipped, on validation
        device = select_device(params.device)
        loss = torch.nn.BCEWithLogitsLoss() if meta.multilabel else torch.nn.CrossEntropyLoss()
        scores = validate(final.to(device), val_x, val_y, meta, device, loss)
        value = round(scores[params.monitor.removeprefix("val_")], 4)
        extra |= {"members": len(states), f"ensemble_{params.monitor}": value}
    summary = write_summary(out.metrics_file, history, params, info, start, extra)
    meta = replace(meta, best_epoch=summary["best_epoch"], members=len(states))
    save_checkpoint(out.model_file, final.cpu(), meta)
    best = summary[f"best_{params.monitor}"]
    name = model_params.name + (f" x {len(states)} members" if len(states) > 1 else "")
    if len(states) > 1:
        best = summary[f"ensemble_{params.monitor}"]
    pruned = f", pruned after epoch {hook.pruned_after} by the search" if hook.pruned_after else ""
    return (
        f"train: {name}, {len(history)} epochs{pruned} (best {summary['best_epoch']}, "
        f"{params.monitor} {best:.3f}), {summary['images_per_second']:.0f} img/s "
        f"-> {out.model_file} in {summary['train_seconds']:.1f} s"
    )
