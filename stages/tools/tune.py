"""`medpipe tune SPACE`: a hyperparameter search whose trials are DVC experiments.

Optuna samples each trial's params from the space file (`stages.lib.tuning`); the trial runs
as `dvc exp run --temp -n <study>-<n> -S key=value ... <until>`, so `dvc exp show`,
`medpipe compare` and `dvc exp apply` see trials as any other experiment. The trial's train
stage reports every epoch's validation value to the study and stops when the pruner says
so (recorded as pruned, with its epochs). `--jobs N` runs N trials side by side, each on its
own cores; other machines join the same search by pointing `--storage` at the same journal
file or database. A killed search resumes: its finished trials stay, the trial it was
running is retried.

When the trials are done, the best settings are confirmed: each is trained again over seeds
(and params.yaml as it is, the baseline), ranked by the seed mean of the validation metric,
and judged against the best by training noise (`stages.lib.noise`); the test figures are
reported, never used to choose. `metrics/tune/<study>.json` keeps the outcome (small,
git-tracked), `reports/tune-<study>.html` shows it, and `--apply` writes the confirmed
setting into params.yaml.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from stages.lib import noise, paths, tuning
from stages.lib.errors import ToolFailed
from stages.lib.gitrepo import require_revisions
from stages.lib.io import atomic_path, read_json, write_json
from stages.lib.metric_registry import compared_keys, higher_is_better
from stages.lib.page import Page, render, table
from stages.lib.parallel import core_slices, pin
from stages.lib.params import ParamsError, parse_params, read_yaml
from stages.tools.compare import mean_interval
from stages.tools.spread import workspace_is_current

EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(.+)$")
FAILURES_IN_A_ROW = 3  # then the search stops: the space or the data is wrong, not a trial
WORKER = f"{socket.gethostname()}:{os.getpid()}"
BASELINE = str(paths.PARAMS)  # the confirmation's label for the current params
KILLED = (130, 137, 143)  # exit codes of a process ended by SIGINT, SIGKILL, SIGTERM


def results_file(study: str, repo: Path = Path(".")) -> Path:
    return paths.tune_summary(study, repo / paths.TUNE_RESULTS)


def page_file(study: str, repo: Path = Path(".")) -> Path:
    return paths.tune_report(study, repo / paths.REPORTS)


# --- experiments in git ---------------------------------------------------------------------


def experiment_refs(repo: Path) -> dict[str, str]:
    """{experiment name: commit} of the DVC experiments in this clone."""
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
        cwd=repo, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    found = {}
    for line in out.stdout.splitlines():
        ref, _, sha = line.partition(" ")
        match = EXP_REF.match(ref)
        if match:
            found[match.group(1)] = sha
    return found


def read_at(repo: Path, rev: str | None, path: Path) -> str | None:
    """A git-tracked file at an experiment's commit (the workspace's file for None)."""
    if rev is None:
        return (repo / path).read_text() if (repo / path).is_file() else None
    out = subprocess.run(
        ["git", "show", f"{rev}:{path.as_posix()}"],
        cwd=repo, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    return out.stdout if out.returncode == 0 else None


def outcome(repo: Path, rev: str | None, metric: str) -> dict[str, Any]:
    """A run's figures: the metric of the weights it kept, epochs, whether pruned, and the
    test figures when it ran evaluate."""
    train_text = read_at(repo, rev, paths.TRAIN_METRICS)
    history_text = read_at(repo, rev, paths.HISTORY)
    if train_text is None or history_text is None:
        raise ToolFailed(f"{rev or 'workspace'}: no {paths.TRAIN_METRICS} or {paths.HISTORY}")
    train = json.loads(train_text)
    history = pd.read_csv(io.StringIO(history_text)).to_dict("records")
    result = {
        "value": tuning.best_value(history, train["best_epoch"], metric),
        "epochs_run": train["epochs_run"],
        "best_epoch": train["best_epoch"],
        "pruned_after_epoch": train.get("pruned_after_epoch"),
    }
    evaluate_text = read_at(repo, rev, paths.EVALUATE_METRICS)
    if evaluate_text is not None:
        figures = json.loads(evaluate_text)
        result["test"] = {k: figures[k] for k in compared_keys() if k in figures}
    return result


def as_set(key: str, value: Any) -> str:
    """`-S key=value`, the value as YAML reads it back (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def run_experiment(
    repo: Path,
    name: str,
    sets: dict[str, Any],
    until: str,
    env: dict[str, str],
    cores: list[int] | None,
    log: Path,
) -> str:
    """`dvc exp run --temp` one experiment; its commit."""
    command = ["dvc", "exp", "run", "--temp", "-n", name]
    for key, value in sets.items():
        command += ["-S", as_set(key, value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(
            [*command, until], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
            check=False, preexec_fn=pin(cores),
        )  # fmt: skip
    if done.returncode < 0 or done.returncode in KILLED:
        raise Interrupted(f"{name}: stopped by a signal (exit {done.returncode})")
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-4:]
        raise ToolFailed(f"{name}: `dvc exp run` failed (log {log}): " + " | ".join(tail))
    sha = experiment_refs(repo).get(name)
    if sha is None:
        raise ToolFailed(f"{name}: `dvc exp run` finished but no experiment ref was made")
    return sha


class Interrupted(ToolFailed):
    """The experiment was stopped from outside (Ctrl-C, a kill), not failed by its own."""


def free_name(wanted: str, taken: set[str]) -> str:
    name, k = wanted, 1
    while name in taken:
        k += 1
        name = f"{wanted}-{k}"
    return name


# --- the study ------------------------------------------------------------------------------


def open_study(spec: tuning.SearchSpec, where: str, seed: int):
    """Create or load the study; refuse one made with another space or metric."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = tuning.open_storage(where)
    if spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:  # constant liar: parallel workers do not all sample next to a running trial
        n_startup = max(spec.startup_trials, 2)
        sampler = optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, n_startup_trials=n_startup
        )
    pruner = tuning.make_pruner(tuning.pruner_settings(spec))
    study = optuna.create_study(
        study_name=spec.study, storage=storage, sampler=sampler, pruner=pruner,
        direction=spec.goal, load_if_exists=True,
    )  # fmt: skip
    space = {
        k: v.model_dump(mode="json", by_alias=True, exclude_none=True)
        for k, v in spec.space.items()
    }
    space = json.loads(json.dumps(space))  # as the storage gives it back (lists)
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", spec.metric)
        study.set_user_attr("goal", spec.goal)
        study.set_user_attr("until", spec.until)
    elif recorded != space or study.user_attrs.get("metric") != spec.metric:
        raise ValueError(
            f"study {spec.study!r} in {where} was made with another space or metric "
            f"({study.user_attrs.get('metric')}, {sorted(recorded)}); give the search a new "
            "`study:` name, or remove the journal to start over"
        )
    study.set_user_attr("pruner", tuning.pruner_settings(spec))  # the trials' train stages read it
    return study


def sampler_seed(spec: tuning.SearchSpec, where: str) -> int:
    """The spec's seed, moved on by the trials already made (a resumed search does not draw
    its first trials again); salted with the worker when others are running (two machines
    joining one search must not draw the same params)."""
    import optuna

    try:
        study = optuna.load_study(study_name=spec.study, storage=tuning.open_storage(where))
    except KeyError:
        return spec.seed
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    salt = sum(map(ord, WORKER)) * 7919 if running else 0
    return spec.seed + len(trials) + salt


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study) -> list[int]:
    """Trials left running by a worker of this machine that is gone (killed): failed, and
    their params queued again; the numbers retried."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        retried.append(trial.number)
    return retried


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    found = {s: 0 for s in ("complete", "pruned", "failed", "running")}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            found["complete"] += 1
        elif trial.state == TrialState.PRUNED:
            found["pruned"] += 1
        elif trial.state == TrialState.RUNNING:
            found["running"] += 1
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted"):
            found["failed"] += 1
    return found


def describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


class Search:
    """The search loop of one process: `jobs` workers asking the study for trials."""

    def __init__(self, spec, study, where: str, repo: Path, jobs: int) -> None:
        self.spec, self.study, self.where, self.repo, self.jobs = spec, study, where, repo, jobs
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.in_a_row = 0
        self.ran = 0
        self.stopped = False
        self.bar: tqdm | None = None

    def next_trial(self):
        with self.lock:
            if self.in_a_row >= FAILURES_IN_A_ROW:
                return None
            n = counts(self.study)
            if n["complete"] + n["pruned"] + n["failed"] + n["running"] >= self.spec.trials:
                return None
            trial = self.study.ask(self.spec.distributions())
            taken = set(experiment_refs(self.repo))
            name = free_name(f"{self.spec.study}-{trial.number}", taken)
            trial.set_user_attr("experiment", name)
            trial.set_user_attr("worker", WORKER)
            return trial, name

    def run_trial(self, trial, name: str, cores: list[int] | None) -> None:
        from optuna.trial import TrialState

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env |= {tuning.ENV_STORAGE: self.where, tuning.ENV_STUDY: self.spec.study}
        env[tuning.ENV_TRIAL] = str(trial.number)
        log = self.repo / paths.TUNE / self.spec.study / f"{name}.log"
        try:
            sha = run_experiment(self.repo, name, trial.params, self.spec.until, env, cores, log)
            result = outcome(self.repo, sha, self.spec.metric)
        except Interrupted:  # Ctrl-C or a kill: the next run retries these params
            trial.set_user_attr("interrupted", True)
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            with self.lock:
                self.in_a_row = FAILURES_IN_A_ROW  # stop asking for trials
                self.stopped = True
            return
        except ToolFailed as exc:
            trial.set_user_attr("error", str(exc)[-500:])
            self.study.tell(trial, state=TrialState.FAIL)
            with self.lock:
                self.failures.append(str(exc))
                self.in_a_row += 1
            tqdm.write(f"trial {trial.number}: failed: {exc}")
            return
        for key in ("epochs_run", "best_epoch", "pruned_after_epoch", "test"):
            if result.get(key) is not None:
                trial.set_user_attr(key, result[key])
        trial.set_user_attr("rev", sha)
        value = result["value"]
        if result["pruned_after_epoch"]:
            self.study.tell(trial, state=TrialState.PRUNED)
            said = f"pruned after epoch {result['pruned_after_epoch']}"
        elif math.isnan(value):
            self.study.tell(trial, state=TrialState.FAIL)
            said = f"failed: no {self.spec.metric} recorded"
        else:
            self.study.tell(trial, value)
            said = f"{self.spec.metric} {value:.4f} ({result['epochs_run']} epochs)"
        with self.lock:
            self.in_a_row, self.ran = 0, self.ran + 1
            if self.bar is not None:
                self.bar.update(1)
        tqdm.write(f"trial {trial.number} ({name}): {describe(trial.params)}: {said}")

    def epochs_running(self) -> str:
        from optuna.trial import TrialState

        mine = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == WORKER
        ]
        return ", ".join(f"trial {t.number}: epoch {len(t.intermediate_values)}" for t in mine)

    def run(self) -> None:
        n = counts(self.study)
        done = n["complete"] + n["pruned"] + n["failed"]
        self.bar = tqdm(total=self.spec.trials, initial=min(done, self.spec.trials),
                        desc=f"tune {self.spec.study}: trials", unit="trial")  # fmt: skip

        def worker(cores: list[int] | None) -> None:
            while (got := self.next_trial()) is not None:
                self.run_trial(*got, cores)

        try:
            with ThreadPoolExecutor(self.jobs) as pool:
                pending = {pool.submit(worker, cores) for cores in core_slices(self.jobs)}
                while pending:  # the running trials' epochs, as their train stages report
                    done, pending = wait(pending, timeout=5)
                    for future in done:
                        future.result()
                    self.bar.set_postfix_str(self.epochs_running(), refresh=True)
        finally:
            self.bar.close()
        if self.stopped:
            raise ToolFailed("tune: interrupted; run the same command again to resume")
        if self.in_a_row >= FAILURES_IN_A_ROW:
            raise ToolFailed(
                f"tune: {FAILURES_IN_A_ROW} trials failed in a row; the last: {self.failures[-1]}"
            )


# --- confirmation ---------------------------------------------------------------------------


def top_settings(study, spec: tuning.SearchSpec) -> list:
    """The best finished trials, one per distinct setting, best first."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done.sort(key=lambda t: t.value, reverse=spec.goal == "maximize")
    seen, top = set(), []
    for trial in done:
        key = json.dumps(trial.params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            top.append(trial)
    return top[: spec.confirm.top]


def confirm(spec, study, repo: Path, jobs: int, params: dict) -> dict[str, Any]:
    """Train the top settings (and the baseline) over seeds; their table and verdicts."""
    base_seed = int(params["train"]["seed"])
    seeds = [base_seed + i for i in range(spec.confirm.seeds)]
    settings = [(f"trial {t.number}", t.params, t) for t in top_settings(study, spec)]
    if not settings:
        raise ToolFailed(f"tune: no trial of {spec.study} finished; nothing to confirm")
    if spec.confirm.baseline:
        settings.append((BASELINE, {}, None))
    refs = experiment_refs(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDPIPE_TUNE_")}
    runs: dict[tuple[str, int], str | None] = {}  # (setting, seed) -> commit
    todo = []
    # the baseline's first seed is the workspace's own run when `dvc status` finds it current
    if spec.confirm.baseline and workspace_is_current(repo):
        runs[BASELINE, base_seed] = None
    for label, values, trial in settings:
        for seed in seeds:
            if (label, seed) in runs:
                continue
            own = trial.user_attrs.get("experiment") if trial is not None else None
            if UNTIL_INDEX[spec.until] < UNTIL_INDEX["evaluate"]:
                own = None  # the trial has no test figures: run its seed again
            slug = f"t{trial.number}" if trial is not None else "base"
            name = own if seed == base_seed and own else f"{spec.study}-{slug}-s{seed}"
            if name in refs:
                runs[label, seed] = refs[name]
            else:
                todo.append((label, seed, name, values | {"train.seed": seed}))
    slices = core_slices(max(1, min(jobs, len(todo) or 1)))
    bar = tqdm(total=len(todo), desc=f"tune {spec.study}: confirmation runs", unit="run")

    def one(item: tuple[int, tuple]) -> None:
        i, (label, seed, name, values) = item
        log = repo / paths.TUNE / spec.study / f"{name}.log"
        until = "evaluate" if UNTIL_INDEX[spec.until] < UNTIL_INDEX["evaluate"] else spec.until
        cores = slices[i % len(slices)]
        runs[label, seed] = run_experiment(repo, name, values, until, env, cores, log)
        bar.update(1)

    try:
        with ThreadPoolExecutor(len(slices)) as pool:
            list(pool.map(one, enumerate(todo)))
    finally:
        bar.close()
    gate = params.get("report", {}).get("gate_metric", "f1_macro")
    rows = []
    for label, values, trial in settings:
        found = [outcome(repo, runs[label, s], spec.metric) for s in seeds]
        rows.append({
            "setting": label,
            "trial": trial.number if trial is not None else None,
            "params": values,
            "seeds": seeds,
            "validation": [r["value"] for r in found],
            "test": [r.get("test", {}).get(gate, math.nan) for r in found],
        })  # fmt: skip
    return judge(rows, spec, gate)


UNTIL_INDEX = {stage: i for i, stage in enumerate(tuning.UNTIL)}


def judge(rows: list[dict], spec: tuning.SearchSpec, gate: str) -> dict[str, Any]:
    """Rank settings by their validation mean; each against the best by training noise; the
    winner against the baseline on test (reported, not used to choose)."""
    sign = 1.0 if spec.goal == "maximize" else -1.0
    for row in rows:
        mean, sd, half = mean_interval(np.asarray(row["validation"], float))
        row["validation_mean"], row["validation_sd"] = mean, sd
        row["validation_ci"] = [mean - half, mean + half]  # 95% t-interval of the seed mean
        test = np.asarray(row["test"], float)
        row["test_mean"], row["test_sd"] = float(test.mean()), float(test.std(ddof=1))
    rows.sort(key=lambda r: sign * r["validation_mean"], reverse=True)
    best = rows[0]
    for row in rows:
        if row is best:
            row["verdict"], row["vs_best"] = "best", None
            continue
        diff, _, _, ci = noise.training_interval(
            sign * np.asarray(best["validation"]), sign * np.asarray(row["validation"])
        )
        row["vs_best"] = ci
        inside = ci is not None and ci[0] <= 0 <= ci[1]
        row["verdict"] = noise.WITHIN_TRAINING if inside else noise.WORSE_TRAINING_ONLY
    base = next((r for r in rows if r["trial"] is None), None)
    versus = None
    if base is not None and base is not best and np.isfinite(best["test_mean"]):
        diff, _, _, ci = noise.training_interval(np.asarray(base["test"]), np.asarray(best["test"]))
        label, up = noise.WITHIN_TRAINING, higher_is_better(gate)
        if ci is not None and (ci[0] > 0 if up else ci[1] < 0):
            label = "better beyond training noise"
        elif ci is not None and (ci[1] < 0 if up else ci[0] > 0):
            label = "worse beyond training noise"
        versus = {"metric": gate, "difference": diff, "interval": ci, "verdict": label}
    beyond = len(rows) > 1 and all(r["verdict"] != noise.WITHIN_TRAINING for r in rows[1:])
    return {
        "metric": spec.metric,
        "gate_metric": gate,
        "rows": rows,
        "winner": best["setting"],
        "winner_params": best["params"],
        "beyond_training_noise": beyond,
        "winner_vs_baseline_test": versus,
    }


# --- the page -------------------------------------------------------------------------------


def trials_frame(study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value if t.value is not None else math.nan,
            "epochs": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
            "experiment": t.user_attrs.get("experiment", ""),
        } | {k: v for k, v in t.params.items()})  # fmt: skip
    return pd.DataFrame(rows)


def build_page(spec, study, confirmation: dict | None, seconds: float) -> str:
    import optuna.visualization as vis

    page = Page()
    page.section("history", "Optimisation history")
    page.figure(vis.plot_optimization_history(study), "history")
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        page.section("epochs", "Validation per epoch (pruned trials stop early)")
        page.figure(vis.plot_intermediate_values(study), "epochs")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) >= 2 and len(spec.space) >= 2:
        page.section("importance", "Parameter importances (fANOVA)")
        page.figure(vis.plot_param_importances(study), "importance")
    if confirmation is not None:
        page.section("confirmation", "Confirmation over seeds")
        table_rows = [
            {
                "setting": r["setting"] + (f" ({describe(r['params'])})" if r["params"] else ""),
                "seeds": len(r["seeds"]),
                f"{spec.metric} mean": r["validation_mean"],
                "sd": r["validation_sd"],
                "95% CI of the mean": noise_text(r["validation_ci"]).replace("+", ""),
                "vs best (95%)": noise_text(r["vs_best"]),
                "verdict": r["verdict"],
                f"test {confirmation['gate_metric']} mean": r["test_mean"],
                "test sd": r["test_sd"],
            }
            for r in confirmation["rows"]
        ]
        page.add(table(pd.DataFrame(table_rows), floats="{:.4f}"))
        versus = confirmation["winner_vs_baseline_test"]
        if versus is not None:
            page.add(
                f"<p>{html.escape(confirmation['winner'])} against params.yaml on test "
                f"{html.escape(versus['metric'])}: {versus['difference']:+.4f} "
                f"{html.escape(noise_text(versus['interval']))}: {html.escape(versus['verdict'])} "
                "(training noise of the seeds; the test split did not steer the search)</p>"
            )
    page.section("trials", "Trials")
    page.add(table(trials_frame(study), floats="{:.4g}"))
    header = html.escape(
        f"study {spec.study}: {spec.trials} trials, {spec.sampler} sampler, {spec.pruner} "
        f"pruner, {spec.goal} {spec.metric}; {seconds:.0f} s in this run"
    )
    return render(page, f"medpipe tune: {spec.study}", header)


def noise_text(interval: list[float] | None) -> str:
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else ""


# --- the command ----------------------------------------------------------------------------


def run(
    space_file: Path,
    jobs: int = 1,
    storage: str | None = None,
    do_confirm: bool = True,
    params_file: Path = paths.PARAMS,
    repo: Path = Path("."),
) -> str:
    """Search (or resume), confirm, write the outcome; return the summary line."""
    start = time.perf_counter()
    params = read_yaml(params_file)
    parse_params(params, str(params_file))
    spec = tuning.load_space(space_file, params)
    require_revisions(repo, [], "tune")
    where = storage or tuning.default_storage(spec.study, repo)
    study = open_study(spec, where, sampler_seed(spec, where))
    retried = recover(study)
    if retried:
        tqdm.write(f"tune: trial(s) {retried} were interrupted; running their params again")
    search = Search(spec, study, where, repo, max(1, jobs))
    search.run()
    n = counts(study)
    best = study.best_trial if n["complete"] else None
    found = (
        f"best {spec.metric} {best.value:.4f} (trial {best.number})" if best else "none finished"
    )
    line = (
        f"{n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed "
        f"({search.ran} run here); {found}"
    )
    confirmation = None
    if n["running"]:
        line += f"; {n['running']} still running elsewhere: confirm once they finish"
    elif do_confirm and best is not None:
        confirmation = confirm(spec, study, repo, max(1, jobs), params)
        line += f"; confirmed: {confirmation_line(confirmation)}"
    seconds = time.perf_counter() - start
    record = {
        "study": spec.study,
        "storage": where,
        "space": json.loads(spec.model_dump_json(by_alias=True, exclude_none=True)),
        "counts": n,
        "best_trial": None
        if best is None
        else {"number": best.number, "value": best.value, "params": best.params},
        "confirmation": confirmation,
    }
    write_json(results_file(spec.study, repo), record)
    out = page_file(spec.study, repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(build_page(spec, study, confirmation, seconds), encoding="utf-8")
    return f"tune {spec.study}: {line} -> {out} in {seconds:.0f} s"


def confirmation_line(confirmation: dict) -> str:
    best = confirmation["rows"][0]
    text = (
        f"{best['setting']} {confirmation['metric']} {best['validation_mean']:.4f} ± "
        f"{best['validation_sd']:.4f} sd over {len(best['seeds'])} seeds, "
        + ("beyond" if confirmation["beyond_training_noise"] else "within")
        + " training noise of the others"
    )
    versus = confirmation["winner_vs_baseline_test"]
    if versus is not None:
        text += (
            f"; on test vs params.yaml {versus['difference']:+.4f} {versus['metric']} "
            f"({versus['verdict']})"
        )
    return text


def apply(space_file: Path, params_file: Path = paths.PARAMS, repo: Path = Path(".")) -> str:
    """Write the confirmed setting of the search into params.yaml (validated first)."""
    params = read_yaml(params_file)
    spec = tuning.load_space(space_file, params)
    record_file = results_file(spec.study, repo)
    record = read_json(record_file) if record_file.is_file() else None
    confirmation = (record or {}).get("confirmation")
    if not confirmation:
        raise ValueError(
            f"{record_file}: no confirmed setting of study {spec.study} yet; run "
            f"`medpipe tune {space_file}` until its confirmation is done"
        )
    values = confirmation["winner_params"]
    if not values:
        return f"tune: params.yaml is the confirmed best of {spec.study}; nothing to change"
    updated = json.loads(json.dumps(params))
    for key, value in values.items():
        tuning.set_key(updated, key, value)
    try:
        checked = parse_params(updated, f"{record_file} (the confirmed setting)")
    except ParamsError as exc:
        raise ValueError(f"{exc}\nparams.yaml left unchanged") from None
    with atomic_path(params_file) as tmp:
        tmp.write_text(
            yaml.safe_dump(
                checked.model_dump(mode="json"), sort_keys=False, default_flow_style=None
            )
        )
    return (
        f"tune: {confirmation['winner']} of {spec.study} -> {params_file}: {describe(values)} "
        f"({confirmation_line(confirmation)}); next: dvc repro"
    )
