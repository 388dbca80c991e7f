"""AUC, GAUC (eq. 14), log loss and activity groups against scikit-learn and naive loops."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from mkt.metrics import (
    activity_groups,
    auc,
    evaluate,
    gauc,
    gauc_support,
    log_loss,
    paired_bootstrap,
    user_activity,
)


def naive_gauc(labels, scores, groups):
    num = den = covered = 0.0
    for g in np.unique(groups):
        rows = groups == g
        if len(np.unique(labels[rows])) < 2:
            continue
        num += rows.sum() * roc_auc_score(labels[rows], scores[rows])
        den += rows.sum()
        covered += rows.sum()
    return num / den, covered / len(labels)


def random_data(n, n_users, seed, dtype):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    labels = (rng.random(n) < 0.3).astype(np.int8)
    # Coarse scores make many ties, within users and across them.
    scores = (np.round(rng.random(n) * 20) / 20 + labels * 0.1).astype(dtype)
    return labels, scores, users


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auc_matches_sklearn_with_ties(dtype):
    labels, scores, _ = random_data(5000, 10, seed=0, dtype=dtype)
    if dtype == np.float64:
        scores = scores + 1e-12  # not exactly float32: takes the rank path
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases():
    assert auc(np.array([1, 0, 1, 0]), np.array([0.0, -0.0, 0.0, -0.0])) == 0.5
    assert auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.9])))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([np.nan, 0.1]))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([0, 2]), np.array([0.3, 0.1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gauc_matches_naive_sklearn_loop(dtype):
    labels, scores, users = random_data(20_000, 1_000, seed=1, dtype=dtype)
    if dtype == np.float64:
        scores = scores * (1 + 1e-13)
    expected, expected_covered = naive_gauc(labels, scores, users)
    assert 0.5 < expected_covered < 1.0  # some users are all-negative and left out
    # The same users keyed as compact ints, as sparse ints and as strings.
    for groups in (users, users * 10_000_019 - 7, users.astype(str)):
        value, covered = gauc(labels, scores, groups)
        assert value == pytest.approx(expected, abs=1e-9)
        assert covered == pytest.approx(expected_covered, abs=1e-12)


def test_gauc_weights_users_by_impressions():
    labels = np.array([1, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.5, 0.5])
    groups = np.array([7, 7, 7, 3, 3, 5, 5])
    # user 7: AUC 1 on 3 rows; user 3: AUC 0 on 2 rows; user 5: one class, left out.
    value, covered = gauc(labels, scores, groups)
    assert value == pytest.approx(3 / 5)
    assert covered == pytest.approx(5 / 7)
    assert np.isnan(gauc(np.ones(3), np.ones(3) * 0.5, np.arange(3))[0])


def test_gauc_support_counts_the_users_gauc_reads():
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 1])
    groups = np.array([7, 7, 7, 3, 3, 5, 5, 9, 9, 9])
    # Users 7 (3 rows), 3 (2 rows) and 9 (3 rows) have both classes; user 5 has likes only.
    support = gauc_support(labels, groups)
    assert support["groups"] == 3 and support["rows"] == 8
    assert support["effective_groups"] == pytest.approx(8**2 / (9 + 4 + 9))
    # One heavy user among light ones: the effective count falls toward 1.
    heavy = np.r_[np.tile([1, 0], 50), np.tile([1, 0], 3)]
    users = np.r_[np.zeros(100, int), np.repeat([1, 2, 3], 2)]
    assert gauc_support(heavy, users)["effective_groups"] < 1.2
    assert gauc_support(np.ones(4), np.arange(4))["groups"] == 0


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    probs = rng.random(1000)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), rel=1e-12)
    assert np.isfinite(log_loss(np.array([1, 0]), np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss(np.array([1]), np.array([1.5]))


def test_activity_and_groups():
    history = np.array([5, 5, 5, 9, 2, 2])
    assert user_activity(np.array([5, 2, 9, 4]), history).tolist() == [3, 2, 1, 0]
    assert user_activity(np.array([1]), np.array([], dtype=np.int64)).tolist() == [0]
    names = activity_groups(np.array([0, 10, 11, 30, 31, 500]))
    assert names.tolist() == ["0-10", "0-10", "10-30", "10-30", ">30", ">30"]
    assert activity_groups(np.array([3, 4]), boundaries=[3]).tolist() == ["0-3", ">3"]
    with pytest.raises(ValueError, match="increasing"):
        activity_groups(np.array([1]), boundaries=[30, 10])


def test_evaluate_reports_everything_by_activity_group():
    labels, scores, users = random_data(20_000, 500, seed=3, dtype=np.float32)
    probs = np.clip(scores, 0.01, 0.99).astype(np.float64)
    activity = users % 50  # any per-row count
    result = evaluate(labels, probs, users, activity=activity)
    assert result["rows"] == 20_000
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert result["gauc"] == pytest.approx(naive_gauc(labels, probs, users)[0], abs=1e-9)
    assert result["logloss"] == pytest.approx(sk_log_loss(labels, probs), rel=1e-12)
    groups = result["by_activity"]
    assert list(groups) == ["0-10", "10-30", ">30"]
    assert sum(g["rows"] for g in groups.values()) == 20_000
    low = activity <= 10
    assert groups["0-10"]["auc"] == pytest.approx(roc_auc_score(labels[low], probs[low]))
    masks = {"0-10": low, "10-30": (activity > 10) & (activity <= 30), ">30": activity > 30}
    for name, rows in masks.items():
        expected = sk_log_loss(labels[rows], probs[rows])
        assert groups[name]["logloss"] == pytest.approx(expected, rel=1e-12)
    # A group with no rows has no log loss (NaN, no warning), like its AUC.
    head = slice(0, 500)
    empty = evaluate(labels[head], probs[head], users[head], activity[head], boundaries=[10, 99])
    empty = empty["by_activity"][">99"]
    assert empty["rows"] == 0 and np.isnan(empty["logloss"]) and np.isnan(empty["auc"])
    assert "by_activity" not in evaluate(labels, probs, users)


def test_paired_bootstrap_equals_rescoring_physically_resampled_users() -> None:
    """Each resample is the two models rescored on a test set rebuilt by drawing users with
    replacement (a user drawn k times contributes its rows k times): checked against
    sklearn on the rebuilt rows, with ties in the scores."""
    rng = np.random.default_rng(3)
    n, users = 600, 40
    groups = rng.integers(100, 100 + users, n)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    a = np.round(labels * 0.3 + rng.random(n), 2)  # informative, with ties
    b = np.round(rng.random(n), 2)
    result = paired_bootstrap(labels, a, b, groups, resamples=5, seed=11)
    ids = np.unique(groups)
    rng = np.random.default_rng(11)
    drawn = [rng.integers(0, len(ids), len(ids)) for _ in range(5)]
    for r in range(5):
        rows = np.concatenate([np.flatnonzero(groups == ids[g]) for g in drawn[r]])
        y = labels[rows]
        want = roc_auc_score(y, a[rows]) - roc_auc_score(y, b[rows])
        assert result["auc"]["resampled"][r] == pytest.approx(want, abs=1e-12)
        # GAUC: each drawn copy of a user is one more group with that user's rows.
        copies = np.repeat(np.arange(len(drawn[r])), [np.sum(groups == ids[g]) for g in drawn[r]])
        want = naive_gauc(y, a[rows], copies)[0] - naive_gauc(y, b[rows], copies)[0]
        assert result["gauc"]["resampled"][r] == pytest.approx(want, abs=1e-12)
    assert result["auc"]["difference"] == pytest.approx(auc(labels, a) - auc(labels, b))
    assert result["groups"] == users and result["auc"]["undefined"] == 0


def test_paired_bootstrap_of_several_runs_compares_their_mean_metrics() -> None:
    """With (runs, rows) scores each resample compares the runs' mean AUC and GAUC: equal to
    the mean of the one-run comparisons drawn on the same users (same seed), and a model's
    one run given as a (1, rows) array is the one-run call itself."""
    rng = np.random.default_rng(4)
    n = 800
    groups = rng.integers(0, 60, n)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    a = np.stack([np.round(labels * 0.3 + rng.random(n), 2) for _ in range(3)])
    b = np.stack([np.round(rng.random(n), 2) for _ in range(2)])
    both = paired_bootstrap(labels, a, b, groups, resamples=20, seed=2)
    for metric in ("auc", "gauc"):
        # a's mean minus b's mean = mean over a's runs against one b run, minus the same for b.
        a_vs_b0 = [paired_bootstrap(labels, r, b[0], groups, 20, 2)[metric] for r in a]
        b_vs_b0 = [paired_bootstrap(labels, r, b[0], groups, 20, 2)[metric] for r in b]
        want = np.mean([d["resampled"] for d in a_vs_b0], axis=0) - np.mean(
            [d["resampled"] for d in b_vs_b0], axis=0
        )
        assert both[metric]["resampled"] == pytest.approx(want, abs=1e-12)
        observed = np.mean([d["difference"] for d in a_vs_b0]) - np.mean(
            [d["difference"] for d in b_vs_b0]
        )
        assert both[metric]["difference"] == pytest.approx(observed, abs=1e-12)
    one = paired_bootstrap(labels, a[:1], b[0], groups, resamples=20, seed=2)
    plain = paired_bootstrap(labels, a[0], b[0], groups, resamples=20, seed=2)
    assert one["auc"]["resampled"] == pytest.approx(plain["auc"]["resampled"], abs=1e-12)
    with pytest.raises(ValueError, match="scores_b"):
        paired_bootstrap(labels, a, b[:, :10], groups)


def test_paired_bootstrap_leaves_out_resamples_without_a_difference() -> None:
    """Two users, one holding the only positive: every resample that misses that user has no
    AUC; those are counted as undefined and left out of the statistics, not NaN-poisoned."""
    labels = np.array([1, 0, 0, 0])
    groups = np.array([7, 7, 9, 9])
    a, b = np.array([0.9, 0.1, 0.2, 0.3]), np.array([0.1, 0.9, 0.2, 0.3])
    result = paired_bootstrap(labels, a, b, groups, resamples=50, seed=1)
    undefined = result["auc"]["undefined"]
    assert 0 < undefined < 50 and np.isnan(result["auc"]["resampled"]).sum() == undefined
    assert result["auc"]["a_better_share"] == 1.0 and np.isfinite(result["auc"]["standard_error"])
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(labels, a, b, groups[:3])


def test_paired_bootstrap_separates_a_real_gain_from_none() -> None:
    rng = np.random.default_rng(5)
    n = 20000
    groups = rng.integers(0, 2000, n)
    labels = (rng.random(n) < 0.1).astype(np.int64)
    noise = rng.random(n)
    better = paired_bootstrap(labels, noise + 0.3 * labels, noise, groups, resamples=200)
    assert better["auc"]["interval_95"][0] > 0 and better["auc"]["a_better_share"] == 1.0
    same = paired_bootstrap(labels, noise, noise[::-1].copy(), groups, resamples=200)
    low, high = same["auc"]["interval_95"]
    # Two unrelated scorers on 2,000 positives: AUCs of about 0.5 +- 0.007 each.
    assert low < 0 < high and 0.005 < same["auc"]["standard_error"] < 0.02
