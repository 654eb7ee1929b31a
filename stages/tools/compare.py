"""`medpipe compare`: one page comparing DVC experiments (the seeds' ablation figures).

Reads `dvc.api.exp_show()` (the same table as `dvc exp show`) and each experiment's
plots/train/history.csv from git, then builds a sortable table of the params that differ and
the main metrics, a metric-vs-param chart, overlaid validation curves and parallel coordinates.
"""

from __future__ import annotations

import html
import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import yaml
from scipy import stats

from stages.lib import metric_registry, noise, paths
from stages.lib.gitrepo import require_revisions
from stages.lib.io import atomic_path
from stages.lib.page import Page, render, table

HISTORY_FILE = paths.HISTORY.as_posix()  # read from git revisions too
SEED_PARAMS = ("train.seed", f"{paths.PARAMS}:train.seed")  # runs differing only here: seed noise
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click',
() => { const body = th.closest('table').tBodies[0]; const asc = th.dataset.asc !== '1';
th.dataset.asc = asc ? '1' : '0'; const key = r => { const t = r.cells[col].innerText;
const n = parseFloat(t); return isNaN(n) ? t : n; };
[...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : -1) * (asc ? 1 : -1))
.forEach(r => body.appendChild(r)); }));
"""


def load_experiments(
    repo: Path | str = ".", revs: list[str] | None = None, num: int = 1
) -> pd.DataFrame:
    """One row per experiment (baselines and workspace included), DVC's column names:
    those derived from `revs` (default HEAD) and the `num` commits before each (-1: all
    first-parent commits), as `dvc exp show --rev/-n/--all-commits` choose them."""
    import dvc.api

    require_revisions(Path(repo), list(revs or []), "compare")
    found = dvc.api.exp_show(repo=str(repo), revs=revs or None, num=num)
    rows = [r for r in found if r.get("State") != "Queued"]
    if not rows:
        raise ValueError(f"{repo}: no experiments found (run `dvc exp run` first)")
    frame = pd.DataFrame(rows)
    frame["name"] = frame["Experiment"].fillna(frame["rev"]).astype(str)
    frame.loc[frame["rev"] == "workspace", "name"] = "workspace"
    return frame


def find_column(frame: pd.DataFrame, metric: str) -> str | None:
    """DVC names a metric `key` or, when ambiguous, `file:key`: find either."""
    for name in (metric, f"{paths.EVALUATE_METRICS.as_posix()}:{metric}"):
        if name in frame.columns:
            return name
    return None


def metric_column(frame: pd.DataFrame, metric: str) -> str:
    column = find_column(frame, metric)
    if column is None:
        main = metric_registry.compared_keys()
        options = [c for c in frame.columns if c.split(":")[-1] in main]
        raise ValueError(f"metric {metric!r} not in the experiments; try one of {options}")
    return column


def as_numbers(series: pd.Series) -> pd.Series | None:
    """The column as floats, or None when any value is not a number."""
    numbers = pd.to_numeric(series, errors="coerce")
    return numbers if numbers.notna().all() else None


def param_keys(repo: Path) -> set[str]:
    """The dotted keys of the repo's params.yaml (metric names can be dotted too, so the
    columns of `exp_show` alone do not tell params from metrics)."""

    def flatten(tree: dict, prefix: str = "") -> Iterator[str]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    path = repo / paths.PARAMS
    return set(flatten(yaml.safe_load(path.read_text()) or {})) if path.is_file() else set()


def changed_params(frame: pd.DataFrame, keys: set[str]) -> list[str]:
    """Params columns (`key` or, when DVC disambiguates, `params.yaml:key`) whose values
    differ between experiments."""
    params = [c for c in frame.columns if c.removeprefix(f"{paths.PARAMS}:") in keys]
    return [c for c in params if frame[c].astype(str).nunique() > 1]


def with_results(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows that hold a result: a commit never reproduced (a queued grid's baseline)
    has params but no metrics, and is no run."""
    kept = frame[pd.to_numeric(frame[column], errors="coerce").notna()]
    if kept.empty:
        raise ValueError(f"no run has a value of {column}; run `dvc repro` or `dvc exp run` first")
    return kept


def drop_workspace_copy(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Each run once: without the workspace row when it only repeats a run (after `dvc exp
    run` the workspace holds the last experiment's results), and without an experiment that
    repeats its baseline (same params, same result: the same run, e.g. the baseline's own
    params queued again in a grid)."""
    keys = frame[columns].astype(str).agg("|".join, axis=1)
    is_workspace = frame["name"] == "workspace"
    repeated = is_workspace & keys.isin(set(keys[~is_workspace]))
    runs = keys[~is_workspace]
    repeated |= runs.duplicated().reindex(keys.index, fill_value=False)
    return frame.loc[~repeated]


def seed_column(params: list[str]) -> str | None:
    return next((c for c in params if c in SEED_PARAMS), None)


def verdict(rank: int, interval: list[float] | None) -> str:
    """The setting against the best one, in `stages.lib.noise`'s words (training noise only:
    experiments carry no paired test resampling here; `medpipe diff` adds it)."""
    if rank == 0:
        return "best"
    if interval is None:
        return "not judged (one seed)"
    return noise.WITHIN_TRAINING if interval[0] <= 0 <= interval[1] else noise.WORSE_TRAINING_ONLY


def mean_interval(runs: np.ndarray) -> tuple[float, float, float]:
    """Mean, sd and the half-width of the 95% t-interval of the mean (NaN for one run)."""
    mean = float(np.mean(runs))
    if len(runs) < 2:
        return mean, 0.0, float("nan")
    sd = float(np.std(runs, ddof=1))
    return mean, sd, float(stats.t.ppf(0.975, len(runs) - 1) * sd / np.sqrt(len(runs)))


def seed_summary(frame: pd.DataFrame, params: list[str], metric_col: str) -> pd.DataFrame | None:
    """Runs that differ only in train.seed, as one setting: seeds, mean, sd and a 95%
    t-interval of the mean per setting, and the 95% interval of its difference to the best
    setting from the pooled seed spread (`noise.training_interval`, the rule `medpipe diff`
    and `pr-summary` use), with the verdict. None when no seed varies."""
    seed = seed_column(params)
    if seed is None:
        return None
    settings = [p for p in params if p != seed]
    values = pd.to_numeric(frame[metric_col], errors="coerce")
    label = (
        frame[settings].map(param_text).agg(", ".join, axis=1)
        if settings
        else pd.Series("all runs", index=frame.index)  # only the seed varies: one setting
    )
    groups = {name: values[label == name].dropna().to_numpy() for name in pd.unique(label)}
    rows = []
    for name, runs in groups.items():
        mean, sd, half = mean_interval(runs)
        rows.append({"setting": name, "seeds": len(runs), "mean": mean, "sd": sd})
        rows[-1] |= {"ci_low": mean - half, "ci_high": mean + half}
    # best first in the metric's direction (ECE: lowest); an interval of setting - best
    # that excludes zero then says worse whichever the direction
    higher = metric_registry.higher_is_better(metric_col)
    summary = pd.DataFrame(rows).sort_values("mean", ascending=not higher, ignore_index=True)
    best_name = summary.loc[0, "setting"]
    best = groups[best_name]
    intervals = [
        noise.training_interval(best, groups[s])[3] if s != best_name else None
        for s in summary["setting"]
    ]
    summary["vs_best_low"] = [i[0] if i else float("nan") for i in intervals]
    summary["vs_best_high"] = [i[1] if i else float("nan") for i in intervals]
    summary["verdict"] = [verdict(i, ci) for i, ci in enumerate(intervals)]
    summary.attrs["settings"] = ", ".join(settings) or "(none)"
    return summary


def read_history(repo: Path, rev: str) -> pd.DataFrame | None:
    """An experiment's per-epoch history from its git commit (the workspace from disk)."""
    if rev == "workspace":
        path = repo / HISTORY_FILE
        return pd.read_csv(path) if path.is_file() else None
    out = subprocess.run(
        ["git", "show", f"{rev}:{HISTORY_FILE}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return pd.read_csv(io.StringIO(out.stdout)) if out.returncode == 0 else None


def param_text(value: object) -> str:
    """A param as params.yaml writes it: pandas turns int columns with gaps into floats."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def experiment_table(frame: pd.DataFrame, params: list[str], metrics: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["experiment", *params, *metrics])
    body = []
    for _, row in frame.iterrows():
        # params as written in params.yaml (0.005, not 0.0050); metrics to 4 decimals
        cells = [
            str(row["name"]),
            *(param_text(row[p]) for p in params),
            *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in (row[m] for m in metrics)),
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
    return (
        f'<table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def seed_section(page: Page, seeds: pd.DataFrame, metric: str) -> None:
    """Mean, sd and interval across seeds per setting; which settings differ from the best
    beyond training noise."""
    page.section("seeds", f"{metric} across seeds")
    page.add(
        "<p>Runs that differ only in train.seed are one setting "
        f"({html.escape(seeds.attrs['settings'])}). Interval: 95% t-interval of the mean over "
        "seeds; vs_best: 95% interval of the difference to the best setting from the pooled "
        "seed spread. A setting is worse only when that interval excludes zero: otherwise "
        "its difference is the size of the training noise. Test-sampling noise is not "
        "assessed here: <code>medpipe diff</code> adds it for two runs.</p>"
    )
    page.add(table(seeds.round(4).astype(object).fillna("—")))  # no p for the best


def build_page(frame: pd.DataFrame, repo: Path, metric: str, param: str | None) -> str:
    page = Page()
    metric_col = metric_column(frame, metric)
    params = changed_params(frame, param_keys(repo))
    metrics = [c for c in (find_column(frame, m) for m in metric_registry.compared_keys()) if c]
    page.section("experiments", "Experiments")
    page.add(
        f"<p>{len(frame)} runs; params that differ: "
        f"{html.escape(', '.join(params) or 'none')}. Click a header to sort.</p>"
    )
    page.add(experiment_table(frame, params, metrics))
    seeds = seed_summary(frame, params, metric_col)
    if seeds is not None:
        seed_section(page, seeds, metric)
        params = [p for p in params if p != seed_column(params)]
    x = param or (params[0] if params else None)
    if x is not None:
        if x not in frame.columns:
            raise ValueError(f"param {x!r} not in the experiments; changed params: {params}")
        page.section("ablation", f"{metric} vs {x}")
        scores = pd.to_numeric(frame[metric_col], errors="coerce")  # "-" where a run has none
        data = frame.assign(**{metric_col: scores}).dropna(subset=[metric_col])
        values = as_numbers(data[x])
        # learning rates span decades: a log axis when a positive param does too
        log_x = values is not None and (values > 0).all() and values.max() >= 10 * values.min()
        if values is not None:
            data = data.assign(**{x: values})
        if seeds is None:
            chart = px.scatter(data, x=x, y=metric_col, text="name", log_x=log_x)
            chart.update_traces(textposition="top center", marker={"size": 10})
        else:  # every seed as a point, the seed mean with its 95% interval as error bars
            chart = px.strip(data, x=x, y=metric_col, hover_name="name")
            grouped = data.groupby(x)[metric_col]
            means = grouped.mean().reset_index()
            half = [mean_interval(runs.to_numpy())[2] for _, runs in grouped]
            chart.add_scatter(
                x=means[x],
                y=means[metric_col],
                error_y={"array": half},
                mode="markers+lines",
                name="seed mean, 95% interval",
            )
            if log_x:
                chart.update_xaxes(type="log")
        chart.update_layout(height=420, yaxis_title=metric)
        page.figure(chart, "metric-vs-param")
    page.section("curves", "Validation curves")
    curves = go.Figure()
    for _, row in frame.iterrows():
        history = read_history(repo, str(row["rev"]))
        if history is not None and "val_f1_macro" in history:
            curves.add_scatter(
                x=history["epoch"],
                y=history["val_f1_macro"],
                name=row["name"],
                mode="lines+markers",
            )
    curves.update_layout(height=420, xaxis_title="epoch", yaxis_title="val_f1_macro")
    page.figure(curves, "val-curves")
    numeric_cols = [c for c in [*params, *metrics] if as_numbers(frame[c]) is not None]
    if len(numeric_cols) >= 2:
        page.section("parallel", "Parallel coordinates")
        par = px.parallel_coordinates(frame[numeric_cols].apply(pd.to_numeric), color=metric_col)
        par.update_layout(height=420)
        page.figure(par, "parallel")
    markup = render(page, "medpipe experiments", html.escape(f"{len(frame)} runs in {repo}"))
    return markup.replace("</body>", f"<script>{SORT_JS}</script></body>")


def run(
    out: Path,
    metric: str = "f1_macro",
    param: str | None = None,
    repo: Path = Path("."),
    revs: list[str] | None = None,
    num: int = 1,
) -> str:
    start = time.perf_counter()
    frame = load_experiments(repo, revs, num)
    column = metric_column(frame, metric)
    frame = with_results(frame, column)
    params = changed_params(frame, param_keys(repo))
    frame = drop_workspace_copy(frame, [*params, column])
    page = build_page(frame, repo, metric, param)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    seeds = seed_summary(frame, params, metric_column(frame, metric))
    if seeds is not None:  # rank settings by their seed mean, never single runs
        top = seeds.iloc[0]
        best = f"best setting {top['setting']}: {metric} {top['mean']:.4f} ± {top['sd']:.4f} sd "
        best += f"over {top['seeds']} seeds"
    else:
        values = pd.to_numeric(frame[metric_column(frame, metric)], errors="coerce")
        row = frame.loc[values.idxmax()]
        best = f"best {metric} {values.max():.4f} ({row['name']})"
    return f"compare: {len(frame)} runs -> {out}; {best} in {time.perf_counter() - start:.1f} s"
