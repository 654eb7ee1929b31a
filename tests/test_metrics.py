import numpy as np
import pytest

from stages import metrics


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
    ci = metrics.bootstrap_ci(y, probs, 200, seed=0)
    acc = metrics.summarize(y, probs)["accuracy"]
    assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
    big_y, big_probs = noisy(2000)
    big = metrics.bootstrap_ci(big_y, big_probs, 200, seed=0)
    assert big["accuracy"][1] - big["accuracy"][0] < ci["accuracy"][1] - ci["accuracy"][0]
