"""The smoothed like-rate floor: a row scored by how often its user and its item were liked.

    r_u = (likes_u + s * p) / (rows_u + s)        the user's train like rate, shrunk to p
    r_i = (likes_i + s * p) / (rows_i + s)        the item's, likewise
    score = sigmoid(logit r_u + logit r_i - logit p)

p is the entity's train like rate and s the prior strength in pseudo-rows, chosen on the
validation rows (`fit_strength`). Users or items never seen in train score p on their side.
No model, no training: a deep model must beat this and the logistic regression on the same
rows before its number means anything (docs/RESULTS.md). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mkt.metrics import auc

STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass(frozen=True)
class Counts:
    """Train rows and likes per key (a user or an item), keys sorted ascending."""

    keys: np.ndarray
    rows: np.ndarray
    likes: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray, likes: np.ndarray) -> Counts:
        keys, rows, likes = (np.asarray(a) for a in (keys, rows, likes))
        if not (len(keys) == len(rows) == len(likes)):
            raise ValueError("Counts: keys, rows and likes must have the same length")
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
            raise ValueError("Counts: duplicate keys")
        return cls(keys, rows[order].astype(np.float64), likes[order].astype(np.float64))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, likes) of each key, 0 for keys without train rows."""
        keys = np.asarray(keys)
        at = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1, 0))
        found = (self.keys[at] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        return np.where(found, self.rows[at], 0.0), np.where(found, self.likes[at], 0.0)


def _logit(p: np.ndarray | float) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def like_rate_scores(
    users: Counts,
    items: Counts,
    prior: float,
    user_keys: np.ndarray,
    item_keys: np.ndarray,
    strength: float,
) -> np.ndarray:
    """The floor's probability for each (user, item) row."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"like_rate_scores: the prior like rate must be in (0, 1), got {prior}")
    if strength <= 0:
        raise ValueError(f"like_rate_scores: strength must be > 0, got {strength}")
    z = -_logit(prior)
    for counts, keys in ((users, user_keys), (items, item_keys)):
        rows, likes = counts.lookup(keys)
        z = z + _logit((likes + strength * prior) / (rows + strength))
    return 1.0 / (1.0 + np.exp(-z))


def fit_strength(
    users: Counts,
    items: Counts,
    prior: float,
    valid_users: np.ndarray,
    valid_items: np.ndarray,
    valid_labels: np.ndarray,
    strengths: Sequence[float] = STRENGTHS,
) -> float:
    """The strength whose scores rank the validation rows best (AUC; the first on ties)."""
    scores = [
        auc(valid_labels, like_rate_scores(users, items, prior, valid_users, valid_items, s))
        for s in strengths
    ]
    finite = [(v, -i) for i, v in enumerate(scores) if np.isfinite(v)]
    if not finite:
        raise ValueError("fit_strength: the validation rows hold one class only")
    return float(strengths[-max(finite)[1]])
