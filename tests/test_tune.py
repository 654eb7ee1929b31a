"""`medpipe tune`: the space file checked by the params schema, the verdicts, the pruner link,
and real searches (DVC experiments in a temporary git repo): a search confirmed and applied,
a trial pruned, a killed search resumed, two clones sharing one journal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from stages.lib import noise, tuning
from stages.lib.params import Params, ParamsError, parse_params
from stages.tools import tune
from tests.conftest import ROOT, child_env, write_params

SPACE = {
    "study": "tiny",
    "metric": "val_f1_macro",
    "trials": 6,
    "startup_trials": 2,
    "warmup_epochs": 0,
    "confirm": {"top": 2, "seeds": 2},
    "space": {
        "train.lr": {"loguniform": [0.0003, 0.01]},
        "train.weight_decay": {"uniform": [0.0, 0.1]},
        "train.batch_size": {"choice": [16, 32]},
    },
}
DEFAULTS = Params().model_dump(mode="json")


def write_space(path: Path, **changes) -> Path:
    spec = json.loads(json.dumps(SPACE)) | changes
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- the space file -------------------------------------------------------------------------


def test_a_valid_space_gives_the_distributions(tmp_path):
    spec = tuning.load_space(write_space(tmp_path / "s.yaml"), DEFAULTS)
    dists = spec.distributions()
    assert dists["train.lr"].log and dists["train.lr"].low == 0.0003
    assert list(dists["train.batch_size"].choices) == [16, 32]
    assert spec.goal == "maximize" and spec.until == "report"
    loss = tuning.load_space(write_space(tmp_path / "l.yaml", metric="val_loss"), DEFAULTS)
    assert loss.goal == "minimize"


@pytest.mark.parametrize(
    ("space", "said"),
    [
        ({"train.nope": {"uniform": [0, 1]}}, "space.train.nope"),
        ({"augment.rotation": {"uniform": [0, 400]}}, "less than or equal to 180"),
        ({"train.optimizer": {"choice": ["adamw", "lion"]}}, "'adamw', 'adam' or 'sgd'"),
        ({"train.lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "low must be below high"),
        ({"train.epochs": {"int": [1, 5], "choice": [1]}}, "give exactly one of"),
        ({"train.seed": {"int": [0, 9]}}, "the seed is training noise"),
        ({"train.batch_size": {"int": [0, 64]}}, "greater than or equal to 1"),
    ],
)
def test_an_invalid_space_is_refused_naming_the_key(tmp_path, space, said):
    path = write_space(tmp_path / "s.yaml", space=space)
    with pytest.raises(ParamsError) as caught:
        tuning.load_space(path, DEFAULTS)
    assert said in str(caught.value) and str(path) in str(caught.value)


def test_the_metric_must_be_a_validation_metric(tmp_path):
    with pytest.raises(ParamsError, match=r"metric: Input should be 'val_loss'"):
        tuning.load_space(write_space(tmp_path / "s.yaml", metric="accuracy"), DEFAULTS)
    with pytest.raises(ParamsError, match="val_loss is to minimize, not to maximize"):
        spec = write_space(tmp_path / "d.yaml", metric="val_loss", direction="maximize")
        tuning.load_space(spec, DEFAULTS)


def test_the_value_of_a_run_is_its_kept_weights(tmp_path):
    rows = [
        {"epoch": 1, "val_f1_macro": 0.5, "ema_val_f1_macro": 0.6, "weights": "ema"},
        {"epoch": 2, "val_f1_macro": 0.7, "ema_val_f1_macro": 0.65, "weights": "raw"},
    ]
    assert tuning.epoch_value(rows[0], "val_f1_macro", "maximize") == 0.6
    assert tuning.epoch_value(rows[0], "val_f1_macro", "minimize") == 0.5
    assert tuning.best_value(rows, 1, "val_f1_macro") == 0.6
    assert tuning.best_value(rows, 2, "val_f1_macro") == 0.7


def confirmation_rows(best: list[float], other: list[float], base: list[float]) -> list[dict]:
    def row(name, trial, values, test):
        return {"setting": name, "trial": trial, "params": {}, "seeds": [0, 1, 2],
                "validation": values, "test": test}  # fmt: skip

    return [
        row("trial 4", 4, other, [0.80, 0.81, 0.79]),
        row("trial 2", 2, best, [0.90, 0.91, 0.92]),
        row("params.yaml", None, base, [0.70, 0.71, 0.69]),
    ]


def test_the_confirmation_ranks_by_seed_means_and_judges_by_training_noise():
    spec = tuning.SearchSpec.model_validate(SPACE)
    clear = tune.judge(confirmation_rows([0.9, 0.91, 0.92], [0.8, 0.81, 0.79], [0.7, 0.71, 0.69]),
                       spec, "f1_macro")  # fmt: skip
    assert clear["winner"] == "trial 2" and clear["beyond_training_noise"]
    assert [r["verdict"] for r in clear["rows"]] == ["best", *[noise.WORSE_TRAINING_ONLY] * 2]
    versus = clear["winner_vs_baseline_test"]
    assert versus["verdict"] == "better beyond training noise"
    assert versus["difference"] == pytest.approx(0.21)
    close = tune.judge(confirmation_rows([0.9, 0.7, 0.95], [0.8, 0.92, 0.79], [0.7, 0.71, 0.69]),
                       spec, "f1_macro")  # fmt: skip
    assert not close["beyond_training_noise"]
    assert close["rows"][1]["verdict"] == noise.WITHIN_TRAINING


def test_a_trial_below_the_median_is_pruned_through_the_link(tmp_path, monkeypatch):
    """The train stage's side: a trial whose epoch value is below the finished trials'
    median at that epoch hears "pruned"; outside a search there is no link."""
    where = str(tmp_path / "study.journal")
    storage = tuning.open_storage(where)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr("metric", "val_f1_macro")
    study.set_user_attr("pruner", {"kind": "median", "startup_trials": 2, "warmup_epochs": 0})
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for lr in (0.001, 0.002):
        planted = optuna.trial.create_trial(
            params={"train.lr": lr}, distributions=dist, value=0.9,
            intermediate_values={1: 0.9, 2: 0.9},
        )  # fmt: skip
        study.add_trial(planted)
    trial = study.ask(dist)
    monkeypatch.delenv(tuning.ENV_STORAGE, raising=False)
    assert tuning.TrialLink.from_env() is None
    monkeypatch.setenv(tuning.ENV_STORAGE, where)
    monkeypatch.setenv(tuning.ENV_STUDY, "s")
    monkeypatch.setenv(tuning.ENV_TRIAL, str(trial.number))
    link = tuning.TrialLink.from_env()
    message = link.report([{"epoch": 1, "val_f1_macro": 0.3}])
    assert message is not None and "after epoch 1" in message
    assert study.trials[-1].intermediate_values == {1: 0.3}


# --- real searches --------------------------------------------------------------------------


def sh(cwd: Path, env: dict, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if ok:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def load(repo: Path, study: str, where: str | None = None) -> optuna.Study:
    where = where or str(repo / ".medpipe/tune" / f"{study}.journal")
    return optuna.load_study(study_name=study, storage=tuning.open_storage(where))


@pytest.fixture(scope="module")
def env() -> dict:
    return child_env()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A committed project on tiny params (3 epochs), its data prepared."""
    path = tmp_path_factory.mktemp("tune") / "repo"
    path.mkdir()
    shutil.copytree(ROOT / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, path / name)
    write_params(path / "params.yaml", {"train": {"epochs": 3, "patience": 3}})
    sh(path, env, "git", "init", "-q", "-b", "main")
    sh(path, env, "dvc", "init", "-q")
    sh(path, env, "dvc", "repro", "-q", "preprocess")
    sh(path, env, "git", "add", "-A")
    sh(path, env, "git", "commit", "-qm", "baseline")
    return path


@pytest.mark.slow
def test_a_bad_space_trains_nothing(repo, env):
    write_space(repo / "bad.yaml", space={"train.lr": {"uniform": [-1, 0.1]}})
    done = sh(repo, env, "medpipe", "tune", "bad.yaml", ok=False)
    assert done.returncode == 2
    assert "space.train.lr: uniform value -1.0 is refused" in done.stderr
    assert "greater than 0" in done.stderr
    assert tune.experiment_refs(repo) == {}


@pytest.mark.slow
def test_a_search_runs_trials_as_experiments_confirms_and_applies(repo, env):
    write_space(repo / "tiny.yaml")
    done = sh(repo, env, "medpipe", "tune", "tiny.yaml", "-j", "2")
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("tune tiny: ") and "confirmed: trial" in line, line
    study = load(repo, "tiny")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 6
    refs = tune.experiment_refs(repo)
    for trial in finished:  # every trial is an experiment with its sampled params
        name = trial.user_attrs["experiment"]
        assert name in refs
        params = yaml.safe_load(sh(repo, env, "git", "show", f"{refs[name]}:params.yaml").stdout)
        assert params["train"]["lr"] == pytest.approx(trial.params["train.lr"])
        assert len(trial.intermediate_values) == trial.user_attrs["epochs_run"]
    shown = sh(repo, env, "dvc", "exp", "show", "--json").stdout
    assert all(t.user_attrs["experiment"] in shown for t in finished)
    record = json.loads((repo / "metrics/tune/tiny.json").read_text())
    rows = record["confirmation"]["rows"]
    assert len(rows) == 3 and all(len(r["validation"]) == 2 for r in rows)  # top 2 + baseline
    assert any(r["setting"] == "params.yaml" for r in rows)
    means = [r["validation_mean"] for r in rows]
    assert means == sorted(means, reverse=True)
    page = (repo / "reports/tune-tiny.html").read_text()
    assert "Optimisation history" in page and "Confirmation over seeds" in page
    assert "<script src=" not in page and "<link " not in page  # plotly inlined: offline
    # --apply writes the confirmed setting, and the schema accepts the result
    done = sh(repo, env, "medpipe", "tune", "tiny.yaml", "--apply")
    applied = parse_params(yaml.safe_load((repo / "params.yaml").read_text()))
    winner = record["confirmation"]["winner_params"]
    for key, value in winner.items():
        section, name = key.split(".")
        assert getattr(getattr(applied, section), name) == pytest.approx(value)
    assert "next: dvc repro" in done.stdout
    sh(repo, env, "git", "checkout", "-q", "--", "params.yaml")
    # a trial is an experiment like any other: applied, the rest of the pipeline runs on it
    best = max((t for t in finished if t.value is not None), key=lambda t: t.value)
    sh(repo, env, "dvc", "exp", "apply", best.user_attrs["experiment"])
    assert (repo / "reports/report.html").is_file()  # the trial ran the whole pipeline
    assert "Running stage" not in sh(repo, env, "dvc", "repro").stdout
    sh(repo, env, "git", "checkout", "-q", "--", ".")
    sh(repo, env, "git", "clean", "-fdq")  # the applied run's git-tracked outputs


@pytest.mark.slow
def test_the_search_page_renders_offline_in_chromium(repo, browser):
    page = repo / "reports/tune-tiny.html"
    if not page.is_file():
        pytest.skip("the search test did not run")
    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.querySelectorAll('.main-svg').length") > 0
    )
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    for anchor in ("history", "epochs", "importance", "confirmation", "trials"):
        assert browser.find_element(By.ID, anchor).is_displayed()
    drawn = browser.execute_script(
        "return document.getElementById('history').data.map(t => (t.x || []).length)"
    )
    assert max(drawn) == 6  # every finished trial is a point


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_recorded(repo, env):
    """Two planted finished trials at F1 1.0 every epoch: the new trial is below their
    median after its first epoch, so its train stage stops there."""
    write_space(repo / "pr.yaml", study="pr", trials=3)
    spec = tuning.load_space(repo / "pr.yaml", DEFAULTS)
    study = optuna.create_study(
        study_name="pr",
        storage=tuning.open_storage(tuning.default_storage("pr", repo)),
        direction="maximize",
    )
    for lr in (0.001, 0.002):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": lr, "train.weight_decay": 0.01, "train.batch_size": 16},
            distributions=spec.distributions(), value=1.0,
            intermediate_values={1: 1.0, 2: 1.0, 3: 1.0},
        ))  # fmt: skip
    done = sh(repo, env, "medpipe", "tune", "pr.yaml", "--no-confirm")
    assert "1 pruned" in done.stdout.splitlines()[-1]
    trial = load(repo, "pr").trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["epochs_run"] == 1 and trial.user_attrs["pruned_after_epoch"] == 1
    rev = tune.experiment_refs(repo)[trial.user_attrs["experiment"]]
    train = json.loads(sh(repo, env, "git", "show", f"{rev}:metrics/train.json").stdout)
    assert train["pruned_after_epoch"] == 1 and train["epochs_run"] == 1


def wait_for(condition, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def running(where: str, study: str) -> list:
    try:
        found = optuna.load_study(study_name=study, storage=tuning.open_storage(where))
    except KeyError:
        return []
    return found.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.slow
def test_a_killed_search_resumes_where_it_stopped(repo, env):
    write_space(repo / "rs.yaml", study="rs", trials=2, pruner="none")
    where = tuning.default_storage("rs", repo)
    logs = repo / ".medpipe/tune/rs"
    first = subprocess.Popen(
        ["medpipe", "tune", "rs.yaml", "--no-confirm"], cwd=repo, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    # kill the whole process group (medpipe, dvc, the stage) in the second trial's training
    wait_for(lambda: (logs / "rs-1.log").is_file() and "epoch 1" in (logs / "rs-1.log").read_text())
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert [t.number for t in running(where, "rs")] == [1]
    done = sh(repo, env, "medpipe", "tune", "rs.yaml", "--no-confirm")
    assert "interrupted" in done.stderr + done.stdout
    trials = load(repo, "rs").trials
    states = {t.number: t.state for t in trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE  # kept, not run again
    assert states[1] == optuna.trial.TrialState.FAIL and trials[1].user_attrs["interrupted"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trials[1].params
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    assert "2 complete" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_two_clones_share_one_search_through_a_journal(repo, env, tmp_path):
    """Two machines: separate clones of one git remote (data from one DVC remote), one
    journal on a shared folder; each runs trials, pushes its experiments; a third clone pulls
    them all."""
    shared = tmp_path / "shared"
    shared.mkdir()
    origin = tmp_path / "origin.git"
    sh(tmp_path, env, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(repo, env, "git", "remote", "add", "origin", str(origin))
    sh(repo, env, "dvc", "remote", "add", "-d", "store", str(shared / "dvc"))
    write_space(repo / "two.yaml", study="two", trials=4, pruner="none")
    sh(repo, env, "git", "add", "two.yaml", ".dvc/config")
    sh(repo, env, "git", "commit", "-qm", "search space; shared remote")
    sh(repo, env, "git", "push", "-q", "origin", "main")
    sh(repo, env, "dvc", "push", "-q")
    clones = []
    for name in ("a", "b", "c"):
        sh(tmp_path, env, "git", "clone", "-q", str(origin), name)
        sh(tmp_path / name, env, "dvc", "pull", "-q", "--with-deps", "preprocess")
        clones.append(tmp_path / name)
    where = str(shared / "two.journal")
    command = ["medpipe", "tune", "two.yaml", "--storage", where, "--no-confirm"]
    worker_a = subprocess.Popen(command, cwd=clones[0], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: running(where, "two"))  # the second machine joins a running search
    worker_b = subprocess.Popen(command, cwd=clones[1], env=env, stdout=subprocess.PIPE, text=True)
    assert worker_a.wait(timeout=900) == 0 and worker_b.wait(timeout=900) == 0
    study = optuna.load_study(study_name="two", storage=tuning.open_storage(where))
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both machines ran trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    for clone in clones[:2]:
        sh(clone, env, "dvc", "exp", "push", "origin", "--all-commits")
    sh(clones[2], env, "dvc", "exp", "pull", "origin", "--all-commits")
    pulled = tune.experiment_refs(clones[2])
    assert {t.user_attrs["experiment"] for t in trials} <= set(pulled)
    out = sh(clones[2], env, "medpipe", "compare", "--out", "compare.html").stdout
    assert "compare: " in out
