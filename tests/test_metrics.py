import numpy as np
import pytest

from stages.lib import metric_registry, metrics, statistics


def one_hot(y, k=3, confidence=0.9):
    probs = np.full((len(y), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(y)), y] = confidence
    return probs


def test_perfect_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    result = metrics.summarize(y, one_hot(y))
    assert result["accuracy"] == result["f1_macro"] == result["kappa"] == 1.0
    assert result["roc_auc"] == 1.0


def test_collapsed_class_shows_in_balanced_accuracy_and_per_class():
    y = np.array([0] * 8 + [1] * 2)
    probs = one_hot(np.zeros_like(y), k=2)
    result = metrics.summarize(y, probs)
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics.per_class(y, probs, ["a", "b"])["b"]["recall"] == 0.0


def test_auc_is_nan_when_a_class_is_missing():
    y = np.array([0, 0, 1, 1])
    assert np.isnan(metrics.roc_auc(y, one_hot(y, k=3)))


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)

    def noisy(n):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.8, y, rng.integers(0, 3, n))
        return y, one_hot(pred)

    y, probs = noisy(100)
    ci = statistics.bootstrap_ci(y, probs, 200, seed=0)
    acc = metrics.summarize(y, probs)["accuracy"]
    assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
    big_y, big_probs = noisy(2000)
    big = statistics.bootstrap_ci(big_y, big_probs, 200, seed=0)
    assert big["accuracy"][1] - big["accuracy"][0] < ci["accuracy"][1] - ci["accuracy"][0]


def calibrated_binary(n, rng, sharpen=1.0):
    """p ~ U(0, 1), y ~ Bernoulli(p): calibrated; sharpen > 1 pushes p towards 0/1."""
    p = rng.random(n)
    y = (rng.random(n) < p).astype(int)
    q = p**sharpen / (p**sharpen + (1 - p) ** sharpen)
    return y, np.column_stack([1 - q, q])


def test_ece_near_zero_when_calibrated_and_large_when_over_confident():
    rng = np.random.default_rng(0)
    y, probs = calibrated_binary(20_000, rng)
    assert metrics.expected_calibration_error(y, probs, 15) < 0.02
    y, sharp = calibrated_binary(20_000, rng, sharpen=4.0)
    assert metrics.expected_calibration_error(y, sharp, 15) > 0.12
    assert metrics.brier_score(y, sharp) > metrics.brier_score(*calibrated_binary(20_000, rng))


def test_reliability_table_counts_every_image_once():
    rng = np.random.default_rng(1)
    y, probs = calibrated_binary(500, rng)
    table = metrics.reliability_table(y, probs, n_bins=10)
    assert table["count"].sum() == 500
    assert (table["confidence"] >= table["bin_lower"]).all()
    assert (table["confidence"] <= table["bin_upper"]).all()


def test_brier_conventions():
    y = np.array([0, 1, 2])
    assert metrics.brier_score(y, one_hot(y, confidence=1.0)) == 0.0
    assert metrics.brier_score(y, one_hot((y + 1) % 3, confidence=1.0)) == pytest.approx(2.0)
    yb = np.array([0, 1])
    assert metrics.brier_score(yb, np.array([[0.4, 0.6], [0.4, 0.6]])) == pytest.approx(
        (0.6**2 + 0.4**2) / 2
    )


def test_youden_threshold_separates_and_sensitivity_target_is_met():
    y = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0.0, 0.3, 50), np.linspace(0.35, 0.6, 50)])
    t = metrics.choose_threshold(y, scores, "youden")
    assert 0.3 < t <= 0.35
    at = metrics.binary_at_threshold(y, scores, t)
    assert at["sensitivity"] == at["specificity"] == 1.0 and at["tp"] == 50
    noisy = scores + np.random.default_rng(0).normal(0, 0.1, 100)
    t90 = metrics.choose_threshold(y, noisy, "sensitivity", 0.9)
    assert metrics.binary_at_threshold(y, noisy, t90)["sensitivity"] >= 0.9
    t99 = metrics.choose_threshold(y, noisy, "sensitivity", 0.99)
    assert t99 <= t90  # more sensitivity costs a lower threshold
    with pytest.raises(ValueError, match="positive and negative"):
        metrics.choose_threshold(np.zeros(5), np.linspace(0, 1, 5), "youden")


def test_multilabel_metrics_per_label_and_macro():
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    perfect = y * 0.9 + 0.05
    result = metrics.summarize_multilabel(y, perfect)
    assert result["accuracy"] == result["f1_macro"] == result["roc_auc"] == 1.0
    assert result["hamming_loss"] == 0.0
    wrong = perfect.copy()
    wrong[:, 2] = 1 - wrong[:, 2]  # third label inverted
    table = metrics.per_label(y, wrong, ["a", "b", "c"])
    assert table["a"]["f1"] == 1.0 and table["c"]["roc_auc"] == 0.0
    assert table["c"]["support"] == 1
    assert metrics.summarize_multilabel(y, wrong)["roc_auc"] == pytest.approx(2 / 3)
    keys = metric_registry.interval_keys(multilabel=True)
    ci = statistics.bootstrap_ci(y, wrong, 50, 0, keys=keys, summary=metrics.summarize_multilabel)
    assert set(ci) <= set(keys) and "f1_macro" in ci


def test_class_bootstrap_ci_contains_per_class_estimates():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.75, y, rng.integers(0, 3, 300))
    probs = one_hot(pred)
    classes = ["a", "b", "c"]
    table = metrics.per_class(y, probs, classes)
    flat = statistics.class_scores(y, probs)
    ci = statistics.class_bootstrap_ci(y, probs, classes, 300, seed=0)
    assert set(ci) == set(classes)
    for name in classes:
        assert set(ci[name]) == set(metrics.CLASS_CI_KEYS)
        for key, (lo, hi) in ci[name].items():
            assert flat[f"{classes.index(name)}/{key}"] == pytest.approx(table[name][key])
            assert lo <= table[name][key] <= hi and hi - lo < 0.3
    assert statistics.class_bootstrap_ci(y, probs, classes, 300, seed=0) == ci  # seeded


def test_class_bootstrap_ci_multilabel_matches_per_label():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 2)) < 0.4).astype(np.float32)
    probs = np.clip(y * 0.6 + rng.random((200, 2)) * 0.5, 0, 1)
    table = metrics.per_label(y, probs, ["a", "b"])
    ci = statistics.class_bootstrap_ci(y, probs, ["a", "b"], 200, seed=0, multilabel=True)
    for name in ("a", "b"):
        for key, (lo, hi) in ci[name].items():
            assert lo <= table[name][key] <= hi
    assert statistics.summarize_accuracy(y, probs, multilabel=True)["accuracy"] == pytest.approx(
        metrics.summarize_multilabel(y, probs)["accuracy"]
    )
