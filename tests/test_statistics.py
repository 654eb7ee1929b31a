import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from stages.lib import metric_registry, metrics, statistics


def random_run(n: int, k: int, seed: int, skill: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and softmax probabilities (n, k) that lean towards the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def sklearn_summary(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The five headline metrics, each straight from scikit-learn."""
    pred, labels = probs.argmax(axis=1), np.arange(probs.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = (
            skm.roc_auc_score(y, probs[:, 1])
            if probs.shape[1] == 2
            else skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
        )
        return {
            "accuracy": skm.accuracy_score(y, pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
            "f1_macro": skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
            "kappa": skm.cohen_kappa_score(y, pred, labels=labels),
            "roc_auc": auc,
        }


def one_hot(pred: np.ndarray, k: int = 3, confidence: float = 0.8) -> np.ndarray:
    probs = np.full((len(pred), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def correlated_patients(
    n_patients: int = 100, per_patient: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images of one patient share label and correctness: (y, probs, groups, patient_ok)."""
    rng = np.random.default_rng(seed)
    patient_y = rng.integers(0, 3, n_patients)
    patient_ok = rng.random(n_patients) < 0.7
    patient_pred = np.where(patient_ok, patient_y, (patient_y + 1) % 3)
    groups = np.repeat(np.arange(n_patients), per_patient)
    y, pred = patient_y[groups], patient_pred[groups]
    probs = one_hot(pred) + rng.uniform(0, 0.01, (len(y), 3))  # jitter: few tied scores
    return y, probs / probs.sum(axis=1, keepdims=True), groups, patient_ok


# --- resampling ---------------------------------------------------------------------------


def test_cluster_counts_keep_whole_patients_and_total_draws():
    groups = np.array(["b", "a", "b", "c", "a", "a"])  # a: 3 images, b: 2, c: 1
    counts = statistics.cluster_bootstrap_counts(groups, 6, n_resamples=50, seed=1)
    assert counts.shape == (50, 6)
    # every image of a patient appears as often as the patient was drawn
    assert (counts[:, 1] == counts[:, 4]).all() and (counts[:, 1] == counts[:, 5]).all()
    assert (counts[:, 0] == counts[:, 2]).all()
    # three patients drawn per resample: the per-patient multiplicities sum to 3
    assert (counts[:, 1] + counts[:, 0] + counts[:, 3] == 3).all()


def test_image_bootstrap_counts_sum_to_n():
    counts = statistics.cluster_bootstrap_counts(None, 7, n_resamples=20, seed=0)
    assert (counts.sum(axis=1) == 7).all()
    assert (counts == 0).any()  # resampling with replacement leaves some images out


def test_bad_groups_and_keys_are_named():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        statistics.cluster_bootstrap_counts(np.arange(3), 4, 10, 0)
    y, probs = random_run(20, 3, seed=0)
    with pytest.raises(ValueError, match="auc"):
        statistics.bootstrap_metrics(y, probs, None, 10, 0, keys=("auc",))
    with pytest.raises(ValueError, match="label 3"):
        statistics.bootstrap_metrics(np.r_[y[:-1], 3], probs, None, 10, 0)


def test_resampling_unit():
    assert statistics.resampling_unit(None) == "image"
    assert statistics.resampling_unit(np.arange(4)) == "patient"


# --- vectorised metrics against scikit-learn ----------------------------------------------


@pytest.mark.parametrize(("n", "k", "seed"), [(60, 3, 0), (41, 2, 1), (80, 4, 2)])
def test_unit_weights_match_sklearn(n, k, seed):
    y, probs = random_run(n, k, seed)
    probs = probs.round(2)  # ties in scores exercise the midrank half-credit
    probs /= probs.sum(axis=1, keepdims=True)
    got = statistics.summarize_weighted(y, probs, np.ones(n))
    for key, expected in sklearn_summary(y, probs).items():
        assert got[key][0] == pytest.approx(expected, abs=1e-12), key


def test_class_absent_from_predictions_matches_sklearn():
    y, probs = random_run(50, 3, seed=3)
    probs[:, 2] = 0.0  # class 2 is never predicted, though present in y_true
    probs /= probs.sum(axis=1, keepdims=True)
    assert 2 in y and 2 not in probs.argmax(axis=1)
    got = statistics.summarize_weighted(y, probs, np.ones(50))
    for key, expected in sklearn_summary(y, probs).items():
        assert got[key][0] == pytest.approx(expected, abs=1e-12), key


def test_predicted_class_absent_from_labels_matches_sklearn():
    y, probs = random_run(40, 3, seed=4, skill=0.5)
    y = np.where(y == 2, 0, y)  # class 2 predicted sometimes, never true
    assert 2 in probs.argmax(axis=1)
    got = statistics.summarize_weighted(y, probs, np.ones(40), keys=("balanced_accuracy",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred holds a class not in y_true
        expected = skm.balanced_accuracy_score(y, probs.argmax(axis=1))
    assert got["balanced_accuracy"][0] == pytest.approx(expected, abs=1e-12)


def test_multiplicities_equal_repeated_images():
    y, probs = random_run(30, 3, seed=5)
    counts = statistics.cluster_bootstrap_counts(None, 30, n_resamples=4, seed=9)
    got = statistics.summarize_weighted(y, probs, counts)
    for r in range(4):
        idx = np.repeat(np.arange(30), counts[r])
        expected = metrics.summarize(y[idx], probs[idx])
        for key in metric_registry.interval_keys():
            assert got[key][r] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), key


def test_auc_and_kappa_undefined_like_sklearn():
    y = np.array([0, 0, 1, 1])
    probs = one_hot(np.zeros(4, dtype=int), k=2)
    only_negatives = np.array([[1, 1, 0, 0]])
    got = statistics.summarize_weighted(y, probs, only_negatives)
    assert np.isnan(got["roc_auc"][0])
    assert np.isnan(got["kappa"][0])  # one class only: chance agreement is total
    assert got["accuracy"][0] == 1.0


# --- bootstrap intervals ------------------------------------------------------------------


def width(interval: list[float]) -> float:
    return interval[1] - interval[0]


def test_patient_interval_wider_than_image_interval_for_correlated_images():
    y, probs, groups, _ = correlated_patients()
    image = statistics.bootstrap_metrics(y, probs, None, 400, seed=0)
    patient = statistics.bootstrap_metrics(y, probs, groups, 400, seed=0)
    # three identical images per patient carry one patient's information: ~sqrt(3) wider
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "kappa"):
        assert width(patient[key]) > 1.3 * width(image[key]), key


def test_one_image_per_patient_gives_the_image_bootstrap():
    y, probs = random_run(120, 3, seed=6)
    ids = np.array([f"patient-{i:03d}" for i in range(120)])[::-1]  # ids in no image order
    image = statistics.bootstrap_metrics(y, probs, None, 200, seed=4)
    patient = statistics.bootstrap_metrics(y, probs, ids, 200, seed=4)
    assert patient == image
    assert set(image) == set(metric_registry.interval_keys())


def test_same_seed_same_intervals_other_seed_other_intervals():
    y, probs, groups, _ = correlated_patients(seed=1)
    first = statistics.bootstrap_metrics(y, probs, groups, 200, seed=7)
    again = statistics.bootstrap_metrics(y, probs, groups, 200, seed=7)
    other = statistics.bootstrap_metrics(y, probs, groups, 200, seed=8)
    assert first == again
    assert first != other


def test_interval_contains_estimate_and_is_rounded():
    y, probs = random_run(300, 3, seed=7)
    ci = statistics.bootstrap_metrics(y, probs, None, 300, seed=0)
    point = metrics.summarize(y, probs)
    for key, (lo, hi) in ci.items():
        assert lo <= point[key] <= hi, key
        assert lo == round(lo, 4) and hi == round(hi, 4)


def test_auc_left_out_when_a_class_is_absent_from_the_test_set():
    y, probs = random_run(30, 3, seed=8)
    y = np.where(y == 2, 1, y)
    ci = statistics.bootstrap_metrics(y, probs, None, 50, seed=0)
    assert "roc_auc" not in ci and "accuracy" in ci


def test_chunked_resamples_equal_one_block(monkeypatch):
    y, probs, groups, _ = correlated_patients(n_patients=40, seed=2)
    whole = statistics.bootstrap_metrics(y, probs, groups, 60, seed=3)
    monkeypatch.setattr(statistics, "CHUNK_RESAMPLES", 7)
    assert statistics.bootstrap_metrics(y, probs, groups, 60, seed=3) == whole


# --- paired differences -------------------------------------------------------------------


def test_identical_runs_differ_by_zero():
    y, probs, groups, _ = correlated_patients(seed=3)
    result = statistics.paired_bootstrap_difference(y, probs, probs, groups, 200, seed=0)
    assert set(result) == set(metric_registry.interval_keys())
    for key, row in result.items():
        assert row["difference"] == 0.0 and row["ci"] == [0.0, 0.0], key
        assert row["base"] == row["head"] == round(metrics.summarize(y, probs)[key], 4)


def test_head_better_on_every_patient_has_interval_above_zero():
    y, base, groups, patient_ok = correlated_patients(seed=4)
    assert not patient_ok.all()
    head = one_hot(y, confidence=0.9)  # right on every image, perfectly ranked
    result = statistics.paired_bootstrap_difference(y, base, head, groups, 300, seed=0)
    for key, row in result.items():
        assert row["difference"] > 0 and row["ci"][0] > 0, key
        assert row["difference"] == pytest.approx(row["head"] - row["base"], abs=2e-4)


def test_paired_interval_narrower_than_independent_intervals():
    # a head that fixes a few patients: pairing cancels the shared patient-to-patient spread
    y, base, groups, patient_ok = correlated_patients(n_patients=200, seed=5)
    fixed = np.isin(groups, np.flatnonzero(~patient_ok)[:10])
    head = np.where(fixed[:, None], one_hot(y), base)
    keys = ("accuracy",)
    paired = statistics.paired_bootstrap_difference(y, base, head, groups, 400, 0, keys)
    base_alone = statistics.bootstrap_metrics(y, base, groups, 400, 0, keys)["accuracy"]
    head_alone = statistics.bootstrap_metrics(y, head, groups, 400, 1, keys)["accuracy"]
    unpaired = np.hypot(width(base_alone), width(head_alone))  # as if two independent samples
    assert width(paired["accuracy"]["ci"]) < 0.5 * unpaired
    assert paired["accuracy"]["ci"][0] > 0


# --- DeLong -------------------------------------------------------------------------------


def slow_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: O(m n) placement values psi(X_i, Y_j)."""
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])  # (M, m, n)
    aucs = psi.mean(axis=(1, 2))
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)  # (M, m), (M, n)
    s10 = (v10 - aucs[:, None]) @ (v10 - aucs[:, None]).T / (m - 1)
    s01 = (v01 - aucs[:, None]) @ (v01 - aucs[:, None]).T / (n - 1)
    return aucs, s10 / m + s01 / n


def delong_fixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.4).astype(int)
    a = (y + rng.normal(0, 1.0, 80)).round(1)  # rounding makes ties
    b = (0.5 * a + y + rng.normal(0, 1.0, 80)).round(1)  # correlated with a
    return y, a, b


def test_delong_matches_the_slow_definition():
    y, a, b = delong_fixture()
    aucs, cov = statistics.delong_covariance(y, np.vstack([a, b]))
    slow_aucs, slow_cov = slow_delong(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, slow_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=0, atol=1e-12)
    assert aucs[0] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12)

    result = statistics.delong_test(y, a, b)
    variance = slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1]
    z = (slow_aucs[0] - slow_aucs[1]) / np.sqrt(variance)
    assert result.z == pytest.approx(z, abs=1e-10)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-10)
    assert 0 < result.p_value < 1


def test_delong_identical_scores_give_p_one_and_a_clear_gap_a_small_p():
    y, a, _ = delong_fixture(seed=1)
    same = statistics.delong_test(y, a, a)
    assert same.auc_a == same.auc_b == pytest.approx(skm.roc_auc_score(y, a))
    assert (same.z, same.p_value) == (0.0, 1.0)
    noise = np.random.default_rng(2).normal(size=len(y))
    assert statistics.delong_test(y, a, noise).p_value < 0.01


def test_delong_ovr_gives_one_test_per_class():
    y, probs_a = random_run(90, 3, seed=9)
    _, probs_b = random_run(90, 3, seed=10)
    results = statistics.delong_test_ovr(y, probs_a, probs_b)
    assert len(results) == 3
    assert results[2].auc_a == pytest.approx(skm.roc_auc_score(y == 2, probs_a[:, 2]))


def test_delong_rejects_one_sided_labels():
    with pytest.raises(ValueError, match="two positives"):
        statistics.delong_test(np.array([1, 0, 0, 0]), np.arange(4.0), np.arange(4.0))


# --- McNemar ------------------------------------------------------------------------------


def test_mcnemar_hand_computed():
    a = np.array([True] * 3 + [False] + [True] * 4)
    b = np.array([False] * 3 + [True] + [True] * 4)  # 3 pairs for a, 1 for b, 4 ties
    result = statistics.mcnemar_exact(a, b)
    assert (result.b, result.c) == (3, 1)
    assert result.p_value == pytest.approx(10 / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert statistics.mcnemar_exact(np.ones(5, bool), np.zeros(5, bool)).p_value == (
        pytest.approx(2 / 32)
    )


def test_mcnemar_matches_scipy_binomtest_and_no_discordance_is_p_one():
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.8, rng.random(200) < 0.7
    result = statistics.mcnemar_exact(a, b)
    assert result.b == (a & ~b).sum() and result.c == (~a & b).sum()
    assert result.p_value == stats.binomtest(result.b, result.b + result.c, 0.5).pvalue
    assert statistics.mcnemar_exact(a, a) == (0, 0, 1.0)


def test_mcnemar_rejects_non_boolean_input():
    with pytest.raises(ValueError, match="bool"):
        statistics.mcnemar_exact(np.array([1, 0]), np.array([0, 1]))
