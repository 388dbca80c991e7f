"""The quick start's closing table: each paired difference says whether the test set can tell
it from noise, and what the GAUC rests on."""

from __future__ import annotations

import numpy as np

from jobs.quickstart import RUNS, results_table
from mkt.metrics import auc, gauc, gauc_support, paired_bootstrap


def test_table_says_which_differences_the_test_set_can_tell() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(400), 10)
    labels = (rng.random(users.size) < 0.2).astype(int)
    signal = labels + rng.normal(0, 1.0, users.size)
    scores = {
        "mkt": signal + rng.normal(0, 0.2, users.size),
        "tem_only": signal + rng.normal(0, 0.2, users.size),  # as good as MKT
        "lr": rng.random(users.size),  # no signal at all
    }
    runs = {}
    for key, score in scores.items():
        metrics = {
            "rows": users.size,
            "positive_rate": labels.mean(),
            "auc": auc(labels, score),
            "gauc": gauc(labels, score, users)[0],
            "gauc_coverage": gauc(labels, score, users)[1],
        }
        runs[key] = {"test": {"model": metrics, "like_rate": metrics}}
    runs["mkt"].update(history_mode="frozen", seq_len=20)
    support = gauc_support(labels, users)
    gains = {
        other: {
            **paired_bootstrap(labels, scores["mkt"], scores[other], users, 200),
            "gauc_support": support,
        }
        for other in ("tem_only", "lr")
    }
    table = results_table(runs, gains)
    against = {other: table.split(f"MKT - {RUNS[other]}")[1] for other in ("tem_only", "lr")}
    assert against["lr"].split("\n")[1].endswith("beyond the noise")  # AUC
    tied = against["tem_only"].split("\n")[1:3]
    assert all(line.endswith("the test set cannot tell") for line in tied), tied
    assert f"GAUC reads {support['groups']} test users" in table
    assert support["groups"] <= 400 and support["effective_groups"] <= support["groups"]
