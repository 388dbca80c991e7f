"""jobs/signal_audit.py on fabricated samples whose cross-entity signal is known: the audit
must find a planted source-to-target interest map and must not find one that is not there.

The samples are written directly (deltalake), not by the ETL, so the planted structure is
exact and the test needs no Spark. Three worlds: `taste`, users have a favourite category,
the same in both entities; `propensity`, users like more or less of everything, alike in
both entities; `none`, a favourite category drawn independently per entity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deltalake import write_deltalake

from jobs.signal_audit import main
from mkt.schema import Feature, FeatureSchema

USERS, CATEGORIES = 3000, 4
ROWS = {"video": 30, "article": 20}
RESERVED = 3  # padding, missing, OOV


def schema() -> FeatureSchema:
    items = RESERVED + 2 * 50
    return FeatureSchema(
        source_entity="video",
        target_entity="article",
        entities=("video", "article"),
        seq_len=0,
        history_mode="frozen",
        item_feature="item_id",
        features=(
            Feature("user_id", "user", "categorical", RESERVED + USERS),
            Feature("item_id", "shared", "categorical", items),
            Feature("video_category", "specific", "categorical", RESERVED + CATEGORIES, "video"),
            Feature("category_first", "specific", "categorical", RESERVED + CATEGORIES, "article"),
        ),
        columns={
            "entity": "entity",
            "split": "split",
            "line_no": "line_no",
            "user_key": "user_key",
            "label": "label",
        },
    )


def fabricate(out: Path, world: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    taste = {"video": rng.integers(0, CATEGORIES, USERS)}
    taste["article"] = taste["video"] if world == "taste" else rng.integers(0, CATEGORIES, USERS)
    propensity = rng.normal(0.0, 1.0, USERS) if world == "propensity" else np.zeros(USERS)
    frames = []
    for e, n in ROWS.items():
        user = np.repeat(np.arange(USERS), n)
        item = rng.integers(0, 50, len(user))  # per entity; an item's category is fixed
        category = item % CATEGORIES
        if world == "propensity":
            p = np.clip(0.06 * np.exp(propensity[user]), 0.0, 0.6)
        else:
            p = np.where(category == taste[e][user], 0.3, 0.03)
        position = np.tile(np.arange(n), USERS)
        split = np.where(position < 0.6 * n, "train", np.where(position < 0.8 * n, "valid", "test"))
        offset = 0 if e == "video" else 50  # separate item id spaces, one table
        frame = pd.DataFrame(
            {
                "entity": e,
                "split": split,
                "user_key": user,
                "line_no": np.arange(1, len(user) + 1),
                "label": (rng.random(len(user)) < p).astype(np.int64),
                "user_id": user + RESERVED,
                "item_id": item + offset + RESERVED,
                "video_category": category + RESERVED if e == "video" else 0,
                "category_first": category + RESERVED if e == "article" else 0,
                "p_like": p,
            }
        )
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True)
    (out / "feature_schema.json").write_text(json.dumps(schema().to_dict()))
    write_deltalake(str(out / "samples"), rows.drop(columns="p_like"), partition_by=["entity"])
    rows[["entity", "line_no", "p_like"]].to_parquet(out / "oracle.parquet")
    return out


@pytest.mark.parametrize("world", ["taste", "propensity", "none"])
def test_audit_finds_planted_transfer_and_no_other(tmp_path: Path, world: str) -> None:
    samples = fabricate(tmp_path / "samples", world)
    summary = main(
        [
            "--samples",
            str(samples),
            "--output",
            str(tmp_path / "out"),
            "--oracle",
            str(samples / "oracle.parquet"),
            "--resamples",
            "200",
        ]
    )
    cross = summary["cross_minus_floor"]["auc"]
    activity = summary["activity_minus_floor"]["auc"]
    if world == "taste":
        assert cross["low"] > 0.1, cross
    elif world == "propensity":
        # The user's source like rate carries what the few target rows estimate poorly.
        assert activity["low"] > 0, activity
    else:
        assert cross["low"] < 0 < cross["high"], cross
        assert activity["low"] < 0 < activity["high"], activity
    models = summary["models"]
    oracle = models["oracle (true p_like)"]["test"]["auc"]
    assert oracle >= max(m["test"]["auc"] for m in models.values()) - 1e-12
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"signal_audit.json", "signal_audit.md", "signal_audit.png"}
    table = (tmp_path / "out" / "signal_audit.md").read_text()
    assert "LR floor (one-hot)" in table and "cross-entity - floor" in table
    assert "source activity - floor" in table


def test_audit_names_what_is_missing(tmp_path: Path) -> None:
    samples = fabricate(tmp_path / "samples", "taste")
    raw = json.loads((samples / "feature_schema.json").read_text())
    raw["features"] = [f for f in raw["features"] if f["name"] != "video_category"]
    (samples / "feature_schema.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no categorical specific feature"):
        main(["--samples", str(samples), "--output", str(tmp_path / "out")])
