"""Offline metrics of the paper (section 4.1.4): AUC, GAUC (eq. 14) and log loss, overall and
by user-activity group (Table 3). numpy only, vectorised: GAUC sorts once by (user, score)
and never loops over users in Python.

Activity for Tenrec-format data (docs/model.md): a user's number of target-entity `train`
rows. Every QK-article row is a click (the file holds no click negatives), so this is the
paper's "clicks in the past month", with the train split standing in for the past month.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

ACTIVITY_BOUNDARIES = (10, 30)  # Table 3: 0-10, 10-30, >30 clicks


def _check(labels: np.ndarray, scores: np.ndarray, what: str = "scores") -> None:
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and {what} {scores.shape} must be equal 1-d")
    if np.isnan(scores).any():
        raise ValueError(f"{what} contain NaN")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise ValueError(f"labels must be 0/1, found {labels[bad][0]!r}")


def _score_key(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-negative int64 per row, ordered and tied exactly as the scores; and its bit width.

    Scores that float32 holds exactly (model outputs) map to their order-preserving 32-bit
    pattern with no sort; other scores to their rank among the distinct values.
    """
    if scores.dtype == np.float32:
        s32 = scores + np.float32(0.0)  # turns -0.0 into 0.0, so the two tie
        exact = True
    else:
        s64 = scores.astype(np.float64) + 0.0
        s32 = s64.astype(np.float32)
        exact = np.array_equal(s32, s64)
    if exact:
        bits = s32.view(np.uint32)
        flipped = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))
        return flipped.astype(np.int64), 32
    order = np.argsort(s64)
    s = s64[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    ranks = np.empty(len(s), dtype=np.int64)
    ranks[order] = np.cumsum(new) - 1
    return ranks, int(ranks.max()).bit_length()


def _group_codes(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Groups as codes 0..n_codes-1; integer keys of a compact range skip np.unique's sort."""
    n = len(groups)
    if groups.dtype.kind in "iu":
        lo, hi = int(groups.min()), int(groups.max())
        if hi - lo < 4 * n:
            return groups.astype(np.int64) - lo, hi - lo + 1
    _, codes = np.unique(groups, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), int(codes.max()) + 1


def _auc_by_group(
    labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, n_codes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, rows) of every group present (NaN AUC where a group has one class only).

    One sort of a packed int64 key (group, score, label) orders every group by score; the
    rank of a positive is the mean position of its run of tied scores within its group
    (Mann-Whitney U), looked up for the positive rows only.
    """
    score_key, score_bits = _score_key(scores)
    shift = score_bits + 1
    if (n_codes - 1).bit_length() + shift > 63:
        raise ValueError(f"{n_codes} groups x 2^{score_bits} scores do not fit one sort key")
    key = (codes << shift) | (score_key << 1) | (labels == 1)
    key.sort()
    n = len(key)
    group = key >> shift
    group_first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    run = key >> 1
    run_first = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
    run_end = np.r_[run_first[1:], n]
    positive = np.flatnonzero(key & 1)
    r = np.searchsorted(run_first, positive, side="right") - 1
    g = np.searchsorted(group_first, positive, side="right") - 1
    rank = (run_first[r] + run_end[r] - 1) / 2.0 - group_first[g] + 1.0
    rows = np.diff(np.r_[group_first, n]).astype(np.float64)
    n_pos = np.bincount(g, minlength=len(rows)).astype(np.float64)
    pos_rank_sum = np.bincount(g, weights=rank, minlength=len(rows))
    n_neg = rows - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), per_group, np.nan), rows


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with tied scores counted half; NaN when only one class is present."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check(labels, scores)
    if not len(labels):
        return float("nan")
    per_group, _ = _auc_by_group(labels, scores, np.zeros(len(labels), np.int64), 1)
    return float(per_group[0])


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Eq. 14: per-group AUC weighted by the group's rows (impressions). Groups whose labels
    are all one class have no AUC and are left out. Returns (GAUC, share of rows covered)."""
    labels, scores, groups = (
        np.asarray(labels),
        np.asarray(scores),
        np.asarray(groups),
    )
    _check(labels, scores)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ")
    if not len(labels):
        return float("nan"), 0.0
    per_group, rows = _auc_by_group(labels, scores, *_group_codes(groups))
    valid = ~np.isnan(per_group)
    if not valid.any():
        return float("nan"), 0.0
    weights = rows[valid]
    return float((weights * per_group[valid]).sum() / weights.sum()), float(
        weights.sum() / len(labels)
    )


def gauc_support(labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """What a GAUC on these rows rests on: the groups with both classes (`groups`), their rows
    (`rows`) and the effective number of groups, (sum of weights)^2 / sum of squared weights
    with each group weighted by its rows as in eq. 14 (`effective_groups`): a GAUC is about as
    noisy as a plain mean of that many per-group AUCs. A few heavy users make it far fewer than
    `groups` (docs/training.md, "What the quick start's GAUC can resolve")."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ")
    if not len(labels):
        return {"groups": 0, "rows": 0, "effective_groups": 0.0}
    codes, n_codes = _group_codes(groups)
    rows = np.bincount(codes, minlength=n_codes)
    positives = np.bincount(codes, weights=(labels == 1).astype(np.float64), minlength=n_codes)
    weights = rows[(positives > 0) & (positives < rows)].astype(np.float64)
    effective = weights.sum() ** 2 / (weights**2).sum() if len(weights) else 0.0
    return {"groups": len(weights), "rows": int(weights.sum()), "effective_groups": effective}


def log_loss(labels: np.ndarray, scores_prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities clipped to [eps, 1 - eps]. NaN with no rows."""
    labels, p = np.asarray(labels), np.asarray(scores_prob, dtype=np.float64)
    _check(labels, p, "probabilities")
    if not len(p):
        return float("nan")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))


def user_activity(user_keys: np.ndarray, history_user_keys: np.ndarray) -> np.ndarray:
    """Per row: how many rows of `history_user_keys` (for Tenrec: the target entity's train
    split) belong to the row's user."""
    user_keys = np.asarray(user_keys)
    keys, counts = np.unique(np.asarray(history_user_keys), return_counts=True)
    if not len(keys):
        return np.zeros(len(user_keys), dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, user_keys), len(keys) - 1)
    return np.where(keys[pos] == user_keys, counts[pos], 0).astype(np.int64)


def activity_group_names(boundaries: Sequence[float] = ACTIVITY_BOUNDARIES) -> list[str]:
    """With boundaries (10, 30): ["0-10", "10-30", ">30"]."""
    bounds = [float(b) for b in boundaries]
    if not bounds or any(a >= b for a, b in pairwise(bounds)):
        raise ValueError(f"activity boundaries must be increasing and non-empty: {boundaries}")
    names = [f"0-{_fmt(bounds[0])}"]
    names += [f"{_fmt(a)}-{_fmt(b)}" for a, b in pairwise(bounds)]
    return [*names, f">{_fmt(bounds[-1])}"]


def activity_groups(
    activity: np.ndarray, boundaries: Sequence[float] = ACTIVITY_BOUNDARIES
) -> np.ndarray:
    """Group name per row: with boundaries (10, 30), activity <= 10 is "0-10", 10 < a <= 30 is
    "10-30" and above is ">30" (the paper's Table 3)."""
    names = np.asarray(activity_group_names(boundaries), dtype=object)
    return names[np.digitize(activity, [float(b) for b in boundaries], right=True)]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def evaluate(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    activity: np.ndarray | None = None,
    boundaries: Sequence[float] = ACTIVITY_BOUNDARIES,
) -> dict[str, Any]:
    """Every metric of one evaluation. `groups`: the GAUC grouping (user keys); `activity`:
    per-row activity counts (see `user_activity`), grouped by `boundaries`; each group gets
    its rows, AUC, GAUC (and coverage) and log loss (NaN for a group with no rows)."""
    labels, probs, groups = np.asarray(labels), np.asarray(probs), np.asarray(groups)
    g, covered = gauc(labels, probs, groups)
    result: dict[str, Any] = {
        "rows": len(labels),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        "auc": auc(labels, probs),
        "gauc": g,
        "gauc_coverage": covered,
        "logloss": log_loss(labels, probs),
    }
    if activity is not None:
        activity = np.asarray(activity)
        if activity.shape != labels.shape:
            raise ValueError(f"activity {activity.shape} and labels {labels.shape} differ")
        names = activity_groups(activity, boundaries)
        result["by_activity"] = {}
        for name in activity_group_names(boundaries):
            rows = names == name
            gg, cc = gauc(labels[rows], probs[rows], groups[rows])
            result["by_activity"][name] = {
                "rows": int(rows.sum()),
                "auc": auc(labels[rows], probs[rows]),
                "gauc": gg,
                "gauc_coverage": cc,
                "logloss": log_loss(labels[rows], probs[rows]),
            }
    return result


def paired_bootstrap(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    groups: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How sure is "model a beats model b" on this test set? AUC(a) - AUC(b) and
    GAUC(a) - GAUC(b), recomputed on `resamples` bootstrap test sets that draw the groups
    (users) with replacement: a user's rows move together, since they are not independent.
    Both models are scored on the same drawn rows (paired), so what they share cancels.

    A model's scores are one row per test row, or a (runs, rows) array of several training
    runs of it (seeds): its metric is then the mean of its runs' metrics, on the observed and
    on every drawn test set, so the interval holds the test set's noise around a seed mean.

    With G distinct groups (in np.unique order), resample r draws `rng.integers(0, G, G)`, one
    resample after another from `rng = default_rng(seed)`; a group drawn k times counts its
    rows k times. Returns, per metric, the observed difference, the per-resample differences,
    their standard deviation (the standard error of the difference), the central 95%
    interval and the share of resamples in which a is better. A resample without both
    classes (AUC) or without a user who has both (GAUC) has no difference (NaN); the
    statistics leave it out and `undefined` counts it.
    """
    labels = np.asarray(labels)

    def runs_of(scores: np.ndarray, what: str) -> np.ndarray:
        runs = np.asarray(scores)
        runs = runs.reshape(1, -1) if runs.ndim == 1 else runs
        if runs.ndim != 2 or not len(runs):
            raise ValueError(f"{what}: one score a row, or (runs, rows); got {runs.shape}")
        for row in runs:
            _check(labels, row, what)
        return runs

    runs_a, runs_b = runs_of(scores_a, "scores_a"), runs_of(scores_b, "scores_b")
    groups = np.asarray(groups)
    if groups.shape != labels.shape or not len(labels):
        raise ValueError(f"groups {groups.shape} and labels {labels.shape}: equal and non-empty")
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    y = (labels == 1).astype(np.float64)

    def weighted_auc(score_rank: np.ndarray, n_ranks: int, w: np.ndarray) -> float:
        # Rows weighted by how often their group was drawn; ties count half.
        pos = np.bincount(score_rank, weights=w * y, minlength=n_ranks)
        neg = np.bincount(score_rank, weights=w * (1.0 - y), minlength=n_ranks)
        pairs = pos.sum() * neg.sum()
        if pairs == 0:
            return float("nan")
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / pairs)

    def prepared(scores: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        _, rank = np.unique(scores, return_inverse=True)
        rank = rank.reshape(-1)
        # Every group is present in `codes`, so index g of the result is group g.
        per_group, rows = _auc_by_group(labels, scores, codes, n_groups)
        return rank, int(rank.max()) + 1, per_group, rows

    per_model = [[prepared(row) for row in runs] for runs in (runs_a, runs_b)]
    covered = ~np.isnan(per_model[0][0][2])  # labels decide it, the same for every run
    differences = {"auc": np.empty(resamples), "gauc": np.empty(resamples)}
    for r in range(resamples):
        # Drawn per resample: a (resamples, G) matrix would not fit for millions of users.
        drawn = rng.integers(0, n_groups, n_groups)
        times = np.bincount(drawn, minlength=n_groups).astype(np.float64)
        w = times[codes]
        means = []
        for model_runs in per_model:
            values = []
            for rank, n_ranks, per_group, rows in model_runs:
                weight = (times * rows)[covered]
                total = weight.sum()
                group_mean = (weight * per_group[covered]).sum() / total if total else np.nan
                values.append((weighted_auc(rank, n_ranks, w), float(group_mean)))
            means.append(np.mean(values, axis=0))
        differences["auc"][r] = means[0][0] - means[1][0]
        differences["gauc"][r] = means[0][1] - means[1][1]

    def observed_mean(runs: np.ndarray, metric: str) -> float:
        if metric == "auc":
            return float(np.mean([auc(labels, row) for row in runs]))
        return float(np.mean([gauc(labels, row, groups)[0] for row in runs]))

    observed = {m: observed_mean(runs_a, m) - observed_mean(runs_b, m) for m in ("auc", "gauc")}

    def spread(d: np.ndarray) -> dict[str, Any]:
        defined = d[~np.isnan(d)]
        if len(defined) < 2:
            nan = float("nan")
            return {"standard_error": nan, "interval_95": (nan, nan), "a_better_share": nan}
        return {
            "standard_error": float(defined.std(ddof=1)),
            "interval_95": (
                float(np.quantile(defined, 0.025)),
                float(np.quantile(defined, 0.975)),
            ),
            "a_better_share": float((defined > 0).mean()),
        }

    return {
        metric: {
            "difference": observed[metric],
            **spread(d),
            "undefined": int(np.isnan(d).sum()),
            "resampled": d,
        }
        for metric, d in differences.items()
    } | {"groups": n_groups, "resamples": resamples}
