"""The metric registry: it agrees with the functions, and one entry plus its function carry a
new metric to every reader (evaluate, the bootstrap, the report's tables, diff, compare,
spread)."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from stages import evaluate
from stages.lib import figures, metric_registry, metrics, noise, spread, statistics
from stages.lib.io import read_json, write_result
from stages.lib.metric_registry import SINGLE, Metric
from stages.lib.params import EvaluateParams, TrainParams
from stages.tools import compare, diff
from stages.tools.review import Gate


def test_registry_agrees_with_the_functions_and_the_schema():
    names = [m.name for m in metric_registry.METRICS]
    assert len(names) == len(set(names))
    for metric in metric_registry.METRICS:
        assert metric.interval <= metric.tasks, metric.name
    # every figure of summarize is registered for its task, and every registered one computed
    assert set(metrics.SINGLE_LABEL) == set(metric_registry.summary_keys(multilabel=False))
    assert set(metrics.MULTI_LABEL) == set(metric_registry.summary_keys(multilabel=True))
    monitor = TrainParams.model_fields["monitor"].annotation.__args__
    assert monitor == metric_registry.monitor_choices()
    assert not metric_registry.monitor_higher_is_better("val_loss")
    assert metric_registry.monitor_higher_is_better("val_roc_auc")
    with pytest.raises(ValueError, match=r"registered: .*'accuracy'"):
        metric_registry.get("auc")


def test_default_metrics_are_unchanged():
    """The figures metrics/evaluate.json and the comparison tools carried before the registry."""
    assert set(evaluate.headline()) == {
        "n_test", "ci_unit", "positive_class", "sensitivity", "specificity", "accuracy",
        "balanced_accuracy", "f1_macro", "kappa", "roc_auc", "ece", "f1_micro",
        "hamming_loss", "shift_flags",
    }  # fmt: skip
    compared = ("accuracy", "balanced_accuracy", "f1_macro", "kappa", "roc_auc")
    assert metric_registry.compared_keys() == metric_registry.interval_keys() == compared
    assert metric_registry.interval_keys(multilabel=True) == (
        "accuracy", "f1_macro", "f1_micro", "roc_auc",
    )  # fmt: skip


def predictions(y: np.ndarray, probs: np.ndarray, patients: np.ndarray) -> pd.DataFrame:
    names = np.array(["neg", "pos"])
    return pd.DataFrame(
        {"image": [f"i{k}.png" for k in range(len(y))], "patient_id": patients, "label": names[y]}
        | {f"prob_{c}": probs[:, k] for k, c in enumerate(names)}
    )


def mcc(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> float:
    return skm.matthews_corrcoef(y_true, y_pred)


@pytest.fixture
def with_mcc(monkeypatch):
    """A new metric: its registry entry and its function, nothing else."""
    entry = Metric("mcc", tasks=SINGLE, interval=SINGLE)
    monkeypatch.setattr(metric_registry, "METRICS", (*metric_registry.METRICS, entry))
    monkeypatch.setitem(metrics.SINGLE_LABEL, "mcc", mcc)


def test_a_new_metric_reaches_every_reader(with_mcc, tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    probs = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.3, 80), 0.01, 0.99)
    probs = np.c_[1 - probs, probs]
    patients = np.repeat(np.arange(40), 2).astype(str)

    result = evaluate.evaluate_probs(y, probs, ["neg", "pos"], EvaluateParams(bootstrap=50))
    expected = skm.matthews_corrcoef(y, probs.argmax(1))
    assert result["mcc"] == round(expected, 4)
    lo, hi = result["ci"]["mcc"]  # the bootstrap, with no weighted form of it
    assert lo <= expected <= hi and lo < hi
    write_result(tmp_path / "evaluate.json", result, evaluate.headline())
    assert "mcc" in read_json(tmp_path / "evaluate.json")  # headline, not detail
    assert "mcc" in list(figures.headline_table(result)["metric"])

    groups = pd.Series(np.where(np.arange(80) < 40, "a", "b"))
    table = evaluate.group_metrics(y, probs, groups, params=EvaluateParams(bootstrap=20))
    assert "mcc" in table["a"] and "mcc" in table["a"]["ci"]

    base = predictions(y, probs, patients)
    head = predictions(y, probs[:, ::-1] * 0.2 + probs * 0.8, patients)
    rows = diff.compare(base, head, 50, 0).rows
    assert "mcc" in rows and rows["mcc"]["base"] == round(expected, 4)

    recorded = spread.summary({}, [{"seed": 0, "mcc": 0.5}, {"seed": 1, "mcc": 0.7}], 1.0)
    assert recorded["mean"] == {"mcc": 0.6}
    runs = pd.DataFrame({"Experiment": ["a"], "mcc": [0.5]})
    with pytest.raises(ValueError, match=r"try one of \['mcc'\]"):
        compare.metric_column(runs, "f1_macro")


def test_the_slow_path_equals_the_metric_on_repeated_images(with_mcc):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 30)
    probs = rng.dirichlet(np.ones(3), 30)
    counts = statistics.cluster_bootstrap_counts(None, 30, 5, seed=0)
    got = statistics.summarize_weighted(y, probs, counts, keys=("accuracy", "mcc"))
    for row, weights in enumerate(counts):
        idx = np.repeat(np.arange(30), weights)
        assert got["mcc"][row] == pytest.approx(mcc(y[idx], probs[idx].argmax(1), probs))
    with pytest.raises(ValueError, match="whole counts"):
        statistics.summarize_weighted(y, probs, np.full(30, 0.5), keys=("mcc",))


def test_lower_is_better_metrics_are_judged_the_right_way():
    assert not metric_registry.higher_is_better("metrics/evaluate.json:ece")
    assert not metric_registry.higher_is_better("val_loss")
    assert metric_registry.higher_is_better("val_f1_macro")
    assert metric_registry.higher_is_better("metrics/explain.json:pointing_game")  # not registered
    base, head = np.array([0.020, 0.021, 0.019]), np.array([0.060, 0.061, 0.059])
    assert noise.judge(base, head, None).label == noise.BETTER_TRAINING_ONLY  # were it F1
    assert noise.judge(base, head, None, higher_is_better=False).label == noise.WORSE_TRAINING_ONLY
    # the gate: a rise of ECE beyond the tolerance is the drop it guards against
    assert Gate("ece", 0.02, 0.08, 0.02).worsened and not Gate("ece", 0.08, 0.02, 0.02).worsened
    assert Gate("f1_macro", 0.90, 0.80, 0.02).worsened
    worse = Gate("ece", 0.02, 0.08, 0.02, verdict=noise.WORSE)
    assert not worse.passed and Gate("ece", 0.08, 0.02, 0.02, verdict=noise.BETTER).passed
    # compare ranks the lowest ECE first
    rows = [
        {"name": f"e{lr}-{s}", "rev": f"r{lr}{s}", "train.lr": lr, "train.seed": s, "ece": v}
        for lr, values in {0.001: [0.05, 0.06, 0.055], 0.005: [0.02, 0.021, 0.019]}.items()
        for s, v in enumerate(values)
    ]
    table = compare.seed_summary(pd.DataFrame(rows), ["train.lr", "train.seed"], "ece")
    assert table["setting"].tolist() == ["0.005", "0.001"]
    assert table["verdict"].tolist()[1].startswith("worse beyond training noise")
