"""The two kinds of noise in a comparison of two recipes, and the one verdict every tool gives.

A test figure moves for three reasons:

- **test-sampling noise**: the test set is a sample of patients. Measured by resampling
  patients, paired when both runs scored the same images (`statistics`).
- **training noise**: two trainings of one recipe give two models (another seed, another
  CPU: float rounding acts like a seed). Measured by the spread of K trainings (seeds) of
  the same recipe on the same test set (`medpipe spread` records it).
- **a real change** of the recipe: beyond both.

`judge` turns a difference, its test-resampling draws and the seed values of both sides
into one of the labels below. `medpipe diff`, `medpipe pr-summary` and `medpipe compare`
all call it, so they never disagree about the same pair of runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

WITHIN_TEST = "within test noise"
WITHIN_TRAINING = "within training noise"
BETTER = "better beyond both"
WORSE = "worse beyond both"
BETTER_TEST_ONLY = "better beyond test noise (training noise not recorded)"
WORSE_TEST_ONLY = "worse beyond test noise (training noise not recorded)"
BETTER_TRAINING_ONLY = "better beyond training noise (test noise not assessed)"
WORSE_TRAINING_ONLY = "worse beyond training noise (test noise not assessed)"
NOT_JUDGED = "not judged (neither noise measured)"


@dataclass(frozen=True)
class Judgement:
    """One metric, head against base.

    Attributes:
        difference: mean of the head's trainings minus mean of the base's.
        test_ci: interval of the difference from resampling test patients (None: not paired).
        training_sd: pooled sd of one training's figure across seeds (None: one training a
            side, nothing to measure it with).
        df: degrees of freedom of that sd (seeds - 1 per side, summed).
        ci: the interval combining both noises (None unless both are measured; with only
            one measured, that one's interval).
        label: one of the module's labels.
    """

    difference: float
    test_ci: list[float] | None
    training_sd: float | None
    df: int
    ci: list[float] | None
    label: str

    @property
    def worse_beyond_both(self) -> bool:
        return self.label == WORSE

    @property
    def training_measured(self) -> bool:
        return self.training_sd is not None


def pooled_sd(*groups: np.ndarray) -> tuple[float | None, int]:
    """Pooled standard deviation of one training's figure over the seed groups, and its
    degrees of freedom; (None, 0) when no group has two seeds."""
    groups = tuple(np.asarray(g, dtype=np.float64) for g in groups)
    df = sum(max(len(g) - 1, 0) for g in groups)
    if df == 0:
        return None, 0
    squares = sum(float(((g - g.mean()) ** 2).sum()) for g in groups if len(g) > 1)
    return float(np.sqrt(squares / df)), df


def training_interval(
    base: np.ndarray, head: np.ndarray, level: float = 0.95
) -> tuple[float, float | None, int, list[float] | None]:
    """Difference of means, pooled sd, df and the pooled t-bounds of head - base (one-sided
    at `level` each, as in `judge`) from the seed values alone (the training-noise part;
    `compare` uses it for settings)."""
    base, head = np.asarray(base, np.float64), np.asarray(head, np.float64)
    difference = float(head.mean() - base.mean())
    sd, df = pooled_sd(base, head)
    if sd is None:
        return difference, None, 0, None
    half = float(stats.t.ppf(level, df) * sd * np.sqrt(1 / len(base) + 1 / len(head)))
    return difference, sd, df, [difference - half, difference + half]


def judge(
    base: np.ndarray,
    head: np.ndarray,
    draws: np.ndarray | None,
    level: float = 0.95,
    higher_is_better: bool = True,
) -> Judgement:
    """The verdict on head - base for one metric.

    Args:
        base, head: the metric of each training of either side on the whole test set (one
            value each when a side has no recorded spread).
        draws: head-mean minus base-mean on each paired test resample (None: not paired).
        level: the level of each bound. A difference is called worse (better) when the
            upper (lower) bound is below (above) zero: one-sided tests, since the question
            is always "is it worse" (or "better"), never "is it different". Each interval
            [lower bound, upper bound] so covers 2 * level - 1 (90% for 0.95).
        higher_is_better: the metric's direction (metric_registry): for ECE or a loss a
            difference above zero is worse.

    The combined interval adds the two variances: the test part is the resamples' variance,
    the training part sd^2 (1/K + 1/M); its t quantile takes Welch-Satterthwaite degrees of
    freedom (the test part counts as exactly known), so few seeds widen it as they should.
    """
    difference, sd, df, _ = training_interval(base, head, level)
    test_ci = None
    if draws is not None and np.isfinite(draws).sum() > 1:
        finite = draws[np.isfinite(draws)]
        tail = (1 - level) * 100
        test_ci = [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
        test_var = float(np.var(finite, ddof=1))
    sign = "better" if (difference > 0) == higher_is_better else "worse"
    if sd is None:
        if test_ci is None:
            return Judgement(difference, None, None, 0, None, NOT_JUDGED)
        within = test_ci[0] <= 0 <= test_ci[1]
        beyond = BETTER_TEST_ONLY if sign == "better" else WORSE_TEST_ONLY
        label = WITHIN_TEST if within else beyond
        return Judgement(difference, test_ci, None, 0, test_ci, label)
    train_var = sd**2 * (1 / len(base) + 1 / len(head))
    if test_ci is None:
        half = float(stats.t.ppf(level, df) * np.sqrt(train_var))
        ci = [difference - half, difference + half]
        within = ci[0] <= 0 <= ci[1]
        beyond = BETTER_TRAINING_ONLY if sign == "better" else WORSE_TRAINING_ONLY
        return Judgement(difference, None, sd, df, ci, WITHIN_TRAINING if within else beyond)
    total = train_var + test_var
    df_eff = total**2 / (train_var**2 / df) if train_var > 0 else np.inf
    half = float(stats.t.ppf(level, df_eff) * np.sqrt(total))
    ci = [difference - half, difference + half]
    if test_ci[0] <= 0 <= test_ci[1]:
        label = WITHIN_TEST
    elif ci[0] <= 0 <= ci[1]:
        label = WITHIN_TRAINING
    else:
        label = BETTER if sign == "better" else WORSE
    return Judgement(difference, test_ci, sd, df, ci, label)
