"""The metric registry: every metric's name, direction, tasks, interval and place.

A new metric is one `Metric` entry here plus its function (`stages.lib.metrics`:
`SINGLE_LABEL` / `MULTI_LABEL` for a figure of the predictions; evaluate's own code for
calibration and the operating point). Everything that lists metrics reads this tuple:
evaluate's headline file and its intervals, the bootstrap (`stages.lib.statistics`), the
report's tables (`stages.lib.figures`), diff, compare, spread, tune and the `train.monitor`
choices of the params schema. Declarations only, so the schema can import it: no numpy,
no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

SINGLE_LABEL = "single-label"  # one class per image (binary or multiclass)
MULTI_LABEL = "multi-label"  # any number of labels per image
BOTH = frozenset({SINGLE_LABEL, MULTI_LABEL})
NONE: frozenset[str] = frozenset()
LOSS = "val_loss"  # the one monitored figure that is no metric here: lower is better


@dataclass(frozen=True)
class Metric:
    """One metric and where it goes.

    Attributes:
        name: the key in metrics/evaluate.json (or its detail file) and in history.csv
            (prefixed `val_`).
        higher_is_better: its direction (early stopping, tuning).
        tasks: the tasks it is computed for.
        interval: the tasks whose evaluate gives it a 95% bootstrap interval. The
            single-label ones are also what diff, compare, spread and tune compare.
        headline: True: metrics/evaluate.json (`dvc exp show`); False: the detail file.
        summary: True: a figure of the predictions, computed by `metrics.summarize` (or
            `summarize_multilabel`) and listed in the report's headline table; False:
            evaluate computes it itself (calibration, the binary operating point).
        monitor: `train.monitor` may name `val_<name>` (early stopping, best epoch).
    """

    name: str
    higher_is_better: bool = True
    tasks: frozenset[str] = BOTH
    interval: frozenset[str] = NONE
    headline: bool = True
    summary: bool = True
    monitor: bool = False


SINGLE = frozenset({SINGLE_LABEL})
MULTI = frozenset({MULTI_LABEL})

# the order of the report's headline table (metrics/evaluate.json keeps the order in which
# evaluate computes them: `metrics.SINGLE_LABEL` / `MULTI_LABEL`)
METRICS: tuple[Metric, ...] = (
    Metric("accuracy", interval=BOTH, monitor=True),  # multi-label: exact match
    Metric("balanced_accuracy", interval=SINGLE, monitor=True),
    Metric("f1_macro", interval=BOTH, monitor=True),
    Metric("f1_micro", tasks=MULTI, interval=MULTI),
    Metric("precision_macro", headline=False),
    Metric("recall_macro", headline=False),
    Metric("kappa", interval=SINGLE),
    Metric("roc_auc", interval=BOTH, monitor=True),
    Metric("hamming_loss", higher_is_better=False, tasks=MULTI),
    Metric("ece", higher_is_better=False, summary=False),
    Metric("brier", higher_is_better=False, headline=False, summary=False),
    # binary tasks only: at the threshold chosen on validation
    Metric("sensitivity", tasks=SINGLE, summary=False),
    Metric("specificity", tasks=SINGLE, summary=False),
)


def task_of(multilabel: bool) -> str:
    return MULTI_LABEL if multilabel else SINGLE_LABEL


def get(name: str) -> Metric:
    """The registered metric `name`; raises naming the registered ones."""
    for metric in METRICS:
        if metric.name == name:
            return metric
    raise ValueError(f"unknown metric {name!r}; registered: {[m.name for m in METRICS]}")


def headline_keys() -> tuple[str, ...]:
    """The metrics of metrics/evaluate.json (any task); the rest go to the detail file."""
    return tuple(m.name for m in METRICS if m.headline)


def summary_keys(multilabel: bool | None = None) -> tuple[str, ...]:
    """The figures of the predictions (the report's headline table), of one task or all."""
    tasks = BOTH if multilabel is None else {task_of(multilabel)}
    return tuple(m.name for m in METRICS if m.summary and m.tasks & tasks)


def interval_keys(multilabel: bool = False) -> tuple[str, ...]:
    """The metrics that get a 95% bootstrap interval in evaluate for the task."""
    return tuple(m.name for m in METRICS if task_of(multilabel) in m.interval)


def compared_keys() -> tuple[str, ...]:
    """The metrics the comparison tools (diff, compare, spread, tune) carry: those with a
    single-label interval, since diff pairs them on bootstrap resamples."""
    return interval_keys(multilabel=False)


def monitor_metrics() -> tuple[str, ...]:
    """`val_<metric>` of the metrics `train.monitor` may name (the report's curves)."""
    return tuple(f"val_{m.name}" for m in METRICS if m.monitor)


def monitor_choices() -> tuple[str, ...]:
    """The allowed `train.monitor` values: the validation loss, then `monitor_metrics()`."""
    return (LOSS, *monitor_metrics())


def monitor_higher_is_better(monitor: str) -> bool:
    """The direction of a monitored figure (`val_loss` or `val_<metric>`)."""
    if monitor == LOSS:
        return False
    return get(monitor.removeprefix("val_")).higher_is_better


def higher_is_better(key: str) -> bool:
    """The direction of any figure the comparison tools judge: `key`, `val_<key>` or
    `file:key`. Registered metrics and the loss know theirs; other figures of the metrics
    files (explain's pointing game, embed's silhouette) count as higher is better."""
    name = key.rpartition(":")[2]
    if name in (LOSS, "loss"):
        return False
    for metric in METRICS:
        if name in (metric.name, f"val_{metric.name}"):
            return metric.higher_is_better
    return True
