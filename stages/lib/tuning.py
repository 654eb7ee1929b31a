"""Hyperparameter search on Optuna: the search-space file, the study's storage, and the link
through which a trial's train stage reports each epoch and hears the pruner.

A search is an Optuna study; each trial is one DVC experiment (`medpipe tune` runs
`dvc exp run --temp -S key=value ...`). The train stage of a trial finds its trial from the
environment (`MEDPIPE_TUNE_*`, set by `medpipe tune` only): outside a search nothing is
reported and nothing is pruned. The study lives in a storage every worker can reach: a
journal file (default `.medpipe/tune/<study>.journal`; on a shared folder for several
machines) or a database URL (`sqlite:///...`, `postgresql://...`, `mysql://...`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.lib import paths
from stages.lib.metric_registry import monitor_higher_is_better
from stages.lib.params import ParamsError, TrainParams, _format_error, parse_params, read_yaml

ENV_STORAGE = "MEDPIPE_TUNE_STORAGE"
ENV_STUDY = "MEDPIPE_TUNE_STUDY"
ENV_TRIAL = "MEDPIPE_TUNE_TRIAL"
# the stages a trial may stop after: the search needs train's validation history; evaluate
# adds the test figures the confirmation reports
UNTIL = ("train", "evaluate", "export", "embed", "explain", "report")
NOT_SEARCHABLE = {"train.seed": "the seed is training noise, not a setting (the confirmation "
                  "repeats seeds)"}  # fmt: skip
Metric = TrainParams.model_fields["monitor"].annotation
Scalar = bool | int | float | str | None
KINDS = {"choice": "choice", "uniform": "uniform", "loguniform": "loguniform", "int": "integer"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Dimension(Strict):
    """One params key's range: exactly one of the four kinds."""

    choice: list[Scalar] | None = Field(None, min_length=1, description="Values to pick from.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], real.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], real, log.")
    integer: tuple[int, int] | tuple[int, int, int] | None = Field(
        None, alias="int", description="[low, high] or [low, high, step], integers."
    )

    @model_validator(mode="after")
    def one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, KINDS[k]) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of choice: [a, b, ...], uniform: [low, high], "
                f"loguniform: [low, high], int: [low, high(, step)] (got {given or 'none'})"
            )
        bounds = self.uniform or self.loguniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low must be below high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.loguniform[0]})")
        if self.integer is not None and len(self.integer) == 3 and self.integer[2] < 1:
            raise ValueError(f"the step of int must be at least 1 (got {self.integer[2]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, KINDS[k]) is not None)

    def extremes(self) -> list[Scalar]:
        """The values the params schema must accept: every choice, both bounds."""
        if self.choice is not None:
            return list(self.choice)
        bounds = self.uniform or self.loguniform or self.integer
        return [bounds[0], bounds[1]]

    def distribution(self):
        """The Optuna distribution of this range."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.choice is not None:
            return CategoricalDistribution(self.choice)
        if self.integer is not None:
            step = self.integer[2] if len(self.integer) == 3 else 1
            return IntDistribution(self.integer[0], self.integer[1], step=step)
        low, high = self.uniform or self.loguniform
        return FloatDistribution(low, high, log=self.loguniform is not None)


class Confirm(Strict):
    top: int = Field(3, ge=1, le=20, description="Settings re-run over seeds (best first).")
    seeds: int = Field(3, ge=2, le=20, description="Trainings per setting (train.seed, +1, ...).")
    baseline: bool = Field(True, description="Also run params.yaml as it is, over the seeds.")


class SearchSpec(Strict):
    """A search-space file: what to vary, what to optimise, how many trials."""

    study: str = Field("search", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")
    metric: Metric = Field("val_f1_macro", description="Validation metric of the best epoch.")
    direction: Literal["maximize", "minimize"] | None = None  # default: from the metric
    trials: int = Field(20, ge=1, le=10000)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0)
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(3, ge=0, description="Trials finished before pruning starts.")
    warmup_epochs: int = Field(1, ge=0, description="Epochs of a trial never pruned.")
    until: Literal[UNTIL] = Field(
        "report",
        description="Last stage a trial runs: report (all) makes every trial a whole run "
        "(`dvc exp apply` checks out everything); evaluate saves the later stages' time, and "
        "an applied trial then needs `dvc repro` for them.",
    )
    confirm: Confirm = Field(default_factory=Confirm)
    space: dict[str, Dimension] = Field(..., min_length=1)

    @model_validator(mode="after")
    def consistent(self) -> SearchSpec:
        natural = "maximize" if monitor_higher_is_better(self.metric) else "minimize"
        if self.direction not in (None, natural):
            raise ValueError(f"{self.metric} is to {natural}, not to {self.direction}")
        return self

    @property
    def goal(self) -> str:
        return self.direction or (
            "maximize" if monitor_higher_is_better(self.metric) else "minimize"
        )

    def distributions(self) -> dict[str, Any]:
        return {key: dim.distribution() for key, dim in self.space.items()}


def set_key(tree: dict, key: str, value: Any) -> None:
    """Set a dotted key in a nested params mapping (creating sections as needed)."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def load_space(path: Path, params: dict) -> SearchSpec:
    """Read and check a search-space file against the params schema, before anything trains.

    Raises:
        ParamsError: the file is unreadable, the spec is malformed, or a key or one of its
            values is one the params schema refuses (named, with the valid range).
    """
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping (study, metric, trials, space: ...)")
    raw = {"study": re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:40] or "search"} | raw
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, SearchSpec) for e in exc.errors()]
        raise ParamsError(f"{path}: invalid search space:\n  " + "\n  ".join(lines)) from None
    problems = []
    for key, dim in spec.space.items():
        if key in NOT_SEARCHABLE:
            problems.append(f"space.{key}: not searchable: {NOT_SEARCHABLE[key]}")
            continue
        for value in dim.extremes():
            trial = json.loads(json.dumps(params))
            set_key(trial, key, value)
            try:
                parse_params(trial)
            except ParamsError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                problems.append(f"space.{key}: {dim.kind} value {value!r} is refused: {detail}")
                break
    if problems:
        raise ParamsError(f"{path}: invalid search space:\n  " + "\n  ".join(problems))
    return spec


def default_storage(study: str, repo: Path = Path(".")) -> str:
    return str((repo / paths.TUNE / f"{study}.journal").resolve())


def open_storage(where: str):
    """An Optuna storage: a database URL, or a journal file (several processes and machines
    may share it: appends are guarded by a lock file next to it)."""
    import optuna

    if "://" in where:
        return optuna.storages.RDBStorage(where)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(where).expanduser()
    if path.is_dir():
        raise ParamsError(f"{where}: a folder; give a file for the search journal")
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def epoch_value(row: dict, metric: str, goal: str) -> float:
    """The epoch's value of the metric: the better of its weights (raw, weight average), as
    the train stage keeps the better one. NaN when the epoch has none."""
    values = [row.get(metric), row.get(f"ema_{metric}")]
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return math.nan
    return max(values) if goal == "maximize" else min(values)


def best_value(history: list[dict], best_epoch: int, metric: str) -> float:
    """The metric of the weights the run kept (its best epoch's, raw or averaged)."""
    rows = [r for r in history if int(r["epoch"]) == int(best_epoch)]
    if not rows:
        return math.nan
    row = rows[-1]  # an ensemble's last member
    prefix = "ema_" if row.get("weights") == "ema" else ""
    value = row.get(prefix + metric, row.get(metric))
    return math.nan if value is None else float(value)


def make_pruner(settings: dict):
    """The study's pruner from its recorded settings (Optuna keeps no pruner in storage: the
    train stage of a trial builds the same one)."""
    import optuna

    if settings.get("kind", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(settings.get("startup_trials", 3)),
        n_warmup_steps=int(settings.get("warmup_epochs", 1)),
    )


def pruner_settings(spec: SearchSpec) -> dict:
    return {"kind": spec.pruner, "startup_trials": spec.startup_trials,
            "warmup_epochs": spec.warmup_epochs}  # fmt: skip


class TrialLink:
    """The running trial as seen from its train stage: report an epoch, hear the pruner."""

    def __init__(self, trial, metric: str, goal: str) -> None:
        self.trial, self.metric, self.goal = trial, metric, goal

    @classmethod
    def from_env(cls) -> TrialLink | None:
        """The trial named by `MEDPIPE_TUNE_*`, or None outside a search."""
        where, study_name = os.environ.get(ENV_STORAGE), os.environ.get(ENV_STUDY)
        number = os.environ.get(ENV_TRIAL)
        if not (where and study_name and number):
            return None
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(where)
        attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
        pruner = make_pruner(attrs.get("pruner", {}))
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, int(number)
        )
        metric, goal = attrs.get("metric", "val_f1_macro"), attrs.get("goal", "maximize")
        return cls(optuna.Trial(study, trial_id), metric, goal)

    def report(self, history: list[dict]) -> str | None:
        """Report the last epoch; a message when the pruner stops the trial, else None."""
        epoch = len(history)
        value = epoch_value(history[-1], self.metric, self.goal)
        if math.isnan(value):
            return None
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            return f"pruned by the search after epoch {epoch} ({self.metric} {value:.4f})"
        return None
