"""Data-config loading and validation (plain Python, no Spark)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from etl.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
TENREC_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
VIDEO_HEADER = "user_id,item_id,click,follow,like,share,video_category,watching_times,gender,age"
ARTICLE_HEADER = (
    "user_id,item_id,click,gender,age,exposure_count,click_count,like_count,comment_count,"
    "read_percentage,item_score1,item_score2,category_second,category_first,item_score3,"
    "read,read_time,share,like,follow,favorite"
)
POST_IMPRESSION = {
    "click",
    "follow",
    "share",
    "watching_times",
    "read",
    "read_time",
    "read_percentage",
    "favorite",
}


def tenrec_raw() -> dict:
    return yaml.safe_load(TENREC_CONFIG.read_text())


def test_tenrec_config_maps_the_paper_groups() -> None:
    config = load_config(TENREC_CONFIG)
    groups = {f.name: (f.group, f.entity) for f in config.features}
    assert groups == {
        "user_id": ("user", None),
        "gender": ("user", None),
        "age": ("user", None),
        "item_id": ("shared", None),
        "video_category": ("specific", "video"),
        "category_first": ("specific", "article"),
        "category_second": ("specific", "article"),
        "item_score1": ("specific", "article"),
        "item_score2": ("specific", "article"),
        "item_score3": ("specific", "article"),
        "exposure_count": ("specific", "article"),
        "click_count": ("specific", "article"),
        "like_count": ("specific", "article"),
        "comment_count": ("specific", "article"),
    }
    assert (config.source_entity, config.target_entity) == ("video", "article")
    assert config.label == "like"
    assert config.item_feature == "item_id" and config.feature("item_id").per_entity_ids
    assert (config.seq_len, config.history_mode, config.test_fraction) == (20, "frozen", 0.2)
    assert not config.activity  # docs/etl.md: off until the joint models gain from it
    raw = tenrec_raw()
    del raw["sequence"]["activity"]
    assert not parse_config(raw).activity
    assert config.with_overrides(activity=True).activity
    used = {c for f in config.features for c in f.columns.values()}
    assert not used & POST_IMPRESSION
    assert set(config.leaky_columns) == POST_IMPRESSION
    # Both real headers satisfy the config.
    config.check_header("video", VIDEO_HEADER.split(","))
    config.check_header("article", ARTICLE_HEADER.split(","))


def test_reordered_header_is_fine() -> None:
    load_config(TENREC_CONFIG).check_header("video", sorted(VIDEO_HEADER.split(",")))


def test_column_absent_from_header_names_the_key() -> None:
    raw = tenrec_raw()
    raw["features"]["specific"]["article"]["item_score9"] = {"kind": "bucketized"}
    config = parse_config(raw)
    with pytest.raises(ConfigError) as err:
        config.check_header("article", ARTICLE_HEADER.split(","))
    assert str(err.value) == (
        "features.specific.article.item_score9: column 'item_score9' not in QK-article.csv header"
    )
    header = [c for c in VIDEO_HEADER.split(",") if c != "like"]
    with pytest.raises(ConfigError, match=r"^label: column 'like' not in QK-video.csv header"):
        config.check_header("video", header)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["sequence"].update(seq_lenn=5), r"^sequence\.seq_lenn: unknown key"),
        (lambda r: r.update(labels="like"), r"^labels: unknown key"),
        (
            lambda r: r["features"]["user"].update(age={"kind": "categorial"}),
            r"^features\.user\.age\.kind: must be one of",
        ),
        (
            lambda r: r["features"]["specific"]["video"].update(item_id=None),
            r"^features\.specific\.video\.item_id: feature 'item_id' already defined at "
            r"features\.shared\.item_id",
        ),
        (
            lambda r: r["features"]["specific"]["video"].update(watching_times=None),
            r"^features\.specific\.video\.watching_times: column 'watching_times' is in "
            r"leaky_columns",
        ),
        (
            lambda r: r["features"]["user"].update(liked={"source": "like"}),
            r"^features\.user\.liked: column 'like' is the label",
        ),
        (
            lambda r: r["features"]["specific"].update(audio={"x": None}),
            r"^features\.specific\.audio: not an entity",
        ),
        (
            lambda r: r["sequence"].update(item_feature="video_category"),
            r"^sequence\.item_feature: 'video_category' must be a categorical shared feature",
        ),
        (
            lambda r: r["sequence"].update(history_mode="live"),
            r"^sequence\.history_mode: must be one of",
        ),
        (
            lambda r: r["sequence"].update(activity="yes"),
            r"^sequence\.activity: must be true or false, got 'yes'",
        ),
        (
            lambda r: (
                r["sequence"].update(activity=True),
                r["features"]["user"].update(activity_likes_own={"source": "age"}),
            ),
            r"^features\.user\.activity_likes_own: 'activity_likes_own' is a reserved sample "
            r"column name",
        ),
        (lambda r: r["split"].update(test_fraction=1.5), r"^split\.test_fraction: must be"),
        (lambda r: r.update(duplicates="dedupe"), r"^duplicates: must be one of"),
        (lambda r: r["entities"]["video"].update(role="target"), r"^entities: need exactly one"),
        (lambda r: r.pop("label"), r"^label: required key missing"),
        (
            lambda r: r["features"]["user"].update(seq_video=None),
            r"^features\.user\.seq_video: 'seq_video' is a reserved sample column name",
        ),
        (lambda r: r.update(min_count=0), r"^min_count: must be an integer >= 1, got 0"),
        (
            lambda r: r["features"]["user"].update(user_id={"min_count": 1.5}),
            r"^features\.user\.user_id\.min_count: must be an integer >= 1, got 1\.5",
        ),
        (
            lambda r: r["features"]["specific"]["article"].update(
                like_count={"kind": "bucketized", "min_count": 2}
            ),
            r"^features\.specific\.article\.like_count\.min_count: only a categorical feature",
        ),
    ],
)
def test_invalid_config_names_the_key(edit, message: str) -> None:
    raw = tenrec_raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_load_config_rejects_repeated_yaml_key(tmp_path: Path) -> None:
    text = TENREC_CONFIG.read_text().replace(
        "      video_category:\n", "      video_category:\n      video_category:\n"
    )
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key 'video_category'"):
        load_config(path)


def test_overrides_are_validated() -> None:
    config = load_config(TENREC_CONFIG)
    online = config.with_overrides(history_mode="online", seq_len=5, duplicates=None)
    assert (online.history_mode, online.seq_len, online.duplicates) == ("online", 5, "keep")
    with pytest.raises(ConfigError, match=r"^sequence\.history_mode"):
        config.with_overrides(history_mode="later")
    with pytest.raises(ConfigError, match=r"^sequence\.seq_len"):
        config.with_overrides(seq_len=0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, r"^files_per_partition: must be an integer >= 1, got 0"),
        (5000, r"^files_per_partition: must be an integer <= 4096, got 5000"),
        ("8", r"^files_per_partition: must be an integer >= 1, got '8'"),
        (True, r"^files_per_partition: must be an integer >= 1, got True"),
    ],
)
def test_files_per_partition_is_validated(value: object, message: str) -> None:
    raw = tenrec_raw()
    assert load_config(TENREC_CONFIG).files_per_partition == raw["files_per_partition"] == 8
    raw["files_per_partition"] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
    del raw["files_per_partition"]
    assert parse_config(raw).files_per_partition == 8  # the default


def test_min_count_default_and_per_feature_override() -> None:
    """The top-level `min_count` is every categorical feature's unless it sets its own;
    bucketized features keep 1 (they have no vocabulary of raw values)."""
    raw = tenrec_raw()
    assert raw["min_count"] == 5  # conf/data/tenrec.yaml's choice (docs/etl.md, "Rare ids")
    del raw["min_count"]
    assert {f.min_count for f in parse_config(raw).features} == {1}  # the key's default
    raw["min_count"] = 3
    raw["features"]["shared"]["item_id"] = {"per_entity_ids": True, "min_count": 5}
    config = parse_config(raw)
    assert config.feature("item_id").min_count == 5
    assert config.feature("user_id").min_count == config.feature("video_category").min_count == 3
    assert config.feature("item_score1").min_count == 1


def test_min_count_sweep_writes_a_loadable_config_per_threshold(tmp_path: Path) -> None:
    """jobs/min_count_sweep.py's data configs: the base config with only `min_count` set, and
    set once, however often it is rewritten."""
    from jobs.min_count_sweep import data_config

    first = data_config(TENREC_CONFIG, 3, tmp_path / "m3.yaml")
    again = data_config(first, 5, tmp_path / "m5.yaml")
    assert again.read_text().count("min_count:") == 1
    base, m5 = load_config(TENREC_CONFIG), load_config(again)
    assert m5.feature("user_id").min_count == 5 and m5.feature("item_score1").min_count == 1
    assert dataclasses.replace(m5, features=base.features) == base
