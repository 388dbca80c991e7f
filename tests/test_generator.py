"""Tests of the Tenrec-format generator: format, determinism, oracle, and the planted structure."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import generate_tenrec as gen

REPO = Path(__file__).resolve().parents[1]
# Written out here, not taken from the module, so that a change to the module's headers fails.
VIDEO_HEADER = "user_id,item_id,click,follow,like,share,video_category,watching_times,gender,age"
ARTICLE_HEADER = (
    "user_id,item_id,click,gender,age,exposure_count,click_count,like_count,comment_count,"
    "read_percentage,item_score1,item_score2,category_second,category_first,item_score3,"
    "read,read_time,share,like,follow,favorite"
)
MODERATE_USERS = 4000
NO_DYNAMICS = {
    "delta_mood": {"video": 0.0, "article": 0.0},
    "delta_topic": {"video": 0.0, "article": 0.0},
}


@pytest.fixture(scope="module")
def moderate(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One moderate data set shared by the read-only tests; several chunks to cover appending."""
    out = tmp_path_factory.mktemp("raw")
    summary = gen.generate(
        out, MODERATE_USERS, seed=7, config=gen.GeneratorConfig(users_per_chunk=1500)
    )
    video = pd.read_csv(out / "QK-video.csv", dtype={"video_category": str}, keep_default_na=False)
    article = pd.read_csv(out / "QK-article.csv")
    oracle = pd.read_parquet(out / "oracle.parquet")
    for name, frame in (("video", video), ("article", article)):
        part = oracle[oracle["entity"] == name].sort_values("line_no")
        assert len(part) == len(frame)
        frame["p_like"] = part["p_like"].to_numpy()
    return {"dir": out, "summary": summary, "video": video, "article": article, "oracle": oracle}


def test_headers_are_exactly_tenrec(moderate: dict) -> None:
    for name, header in (("QK-video.csv", VIDEO_HEADER), ("QK-article.csv", ARTICLE_HEADER)):
        with open(moderate["dir"] / name) as f:
            assert f.readline().rstrip("\n") == header
    assert sorted(p.name for p in moderate["dir"].iterdir()) == [
        "QK-article.csv",
        "QK-video.csv",
        "oracle.parquet",
    ]


def test_like_rates_near_tenrec(moderate: dict) -> None:
    s = moderate["summary"]
    assert 0.036 * 0.85 < s["video"]["like_rate"] < 0.036 * 1.15
    assert 0.018 * 0.8 < s["article"]["like_rate"] < 0.018 * 1.2
    assert moderate["video"]["like"].mean() == pytest.approx(s["video"]["like_rate"])
    assert set(moderate["video"]["like"]) == {0, 1}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    cfg = gen.GeneratorConfig(users_per_chunk=100, calibration_users=500)
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        gen.generate(tmp_path / label, 250, seed=seed, config=cfg)
        runs[label] = {
            n: (tmp_path / label / n).read_bytes()
            for n in ("QK-video.csv", "QK-article.csv", "oracle.parquet")
        }
    assert runs["a"] == runs["b"]
    assert runs["a"]["QK-video.csv"] != runs["c"]["QK-video.csv"]


def test_oracle_lines_match_csv_lines(moderate: dict) -> None:
    oracle = moderate["oracle"]
    assert list(oracle.columns) == ["entity", "line_no", "p_like"]
    assert str(oracle["line_no"].dtype) == "int64" and str(oracle["p_like"].dtype) == "float64"
    for name in ("video", "article"):
        frame = moderate[name]
        part = oracle[oracle["entity"] == name]
        with open(moderate["dir"] / gen.FILE_NAMES[name]) as f:
            data_lines = sum(1 for _ in f) - 1
        assert len(part) == len(frame) == data_lines
        assert np.array_equal(np.sort(part["line_no"].to_numpy()), np.arange(1, data_lines + 1))
        p = frame["p_like"]
        assert p.between(0.0, 1.0, inclusive="neither").all()
        # p_like belongs to its own line: it predicts that line's label and averages to the rate.
        assert p.mean() == pytest.approx(frame["like"].mean(), rel=0.1)
        assert p[frame["like"] == 1].mean() > 2 * p[frame["like"] == 0].mean()


def test_log_defects_present(moderate: dict) -> None:
    s = moderate["summary"]
    for name in ("video", "article"):
        with open(moderate["dir"] / gen.FILE_NAMES[name]) as f:
            lines = f.read().splitlines()[1:]
        adjacent_equal = sum(a == b for a, b in itertools.pairwise(lines))
        assert adjacent_equal == s[name]["duplicates"]
        assert 0.002 * len(lines) < adjacent_equal < 0.02 * len(lines)
        assert s[name]["conflicting_pairs"] > 0
        frame = moderate[name]
        labels = frame.groupby(["user_id", "item_id"])["like"].nunique()
        assert (labels == 2).sum() == s[name]["conflicting_pairs"]
    missing = (moderate["video"]["video_category"] == "\\N").mean()
    assert 0.005 < missing < 0.1
    assert s["video"]["missing_category"] == (moderate["video"]["video_category"] == "\\N").sum()
    assert (moderate["article"]["click"] == 1).all()


def test_sorted_by_user_and_profile_consistent(moderate: dict) -> None:
    profiles = []
    for name in ("video", "article"):
        frame = moderate[name]
        assert frame["user_id"].is_monotonic_increasing
        assert frame["gender"].isin([0, 1, 2]).all() and frame["age"].between(0, 7).all()
        per_user = frame.groupby("user_id")[["gender", "age"]].nunique()
        assert (per_user == 1).all().all()
        profiles.append(frame.groupby("user_id")[["gender", "age"]].first())
    both = profiles[0].join(profiles[1], rsuffix="_a", how="inner")
    assert (both["gender"] == both["gender_a"]).all() and (both["age"] == both["age_a"]).all()


def test_article_side_sparse_and_activity_long_tailed(moderate: dict) -> None:
    video, article = moderate["video"], moderate["article"]
    assert 2.0 < len(video) / len(article) < 5.0
    video_users, article_users = set(video["user_id"]), set(article["user_id"])
    assert len(video_users - article_users) > 0.4 * MODERATE_USERS  # many never read articles
    only_article = len(article_users - video_users)
    assert 0 < only_article < 0.05 * MODERATE_USERS
    assert only_article == moderate["summary"]["article_only_users"]
    rows = video.groupby("user_id").size()
    assert rows.max() > 30 * rows.median()
    assert (article.groupby("user_id").size() <= 3).mean() > 0.15  # many users with few rows


def test_post_impression_columns_leak_the_label(moderate: dict) -> None:
    checks = {
        "video": ["click", "watching_times", "share", "follow"],
        "article": ["read", "read_time", "read_percentage", "share", "follow", "favorite"],
    }
    for name, columns in checks.items():
        means = moderate[name].groupby("like")[columns].mean()
        for column in columns:
            assert means.loc[1, column] > 1.2 * means.loc[0, column], (name, column)


def test_recent_like_raises_like_probability(moderate: dict) -> None:
    for name in ("video", "article"):
        frame = moderate[name]
        previous = frame.groupby("user_id")["like"].shift(1)
        after_like = frame.loc[previous == 1, "p_like"].mean()
        after_none = frame.loc[previous == 0, "p_like"].mean()
        assert after_like > 1.5 * after_none, name


def _hidden_clock(cfg: gen.GeneratorConfig, users: int = 6000, seed: int = 1):
    world = gen._make_world(seed, users, cfg)
    pop = gen._draw_population(gen._rng(seed, 99), np.arange(users), world, cfg)
    p, y = gen._run_dynamics(pop, np.array([-4.2, -5.0]), cfg)
    return world, pop, p, y


def test_likes_transfer_across_entities_on_the_hidden_clock() -> None:
    """A like in either entity raises the next event's p in either entity, beyond what user
    heterogeneity alone gives (the control run has the short-term terms switched off)."""
    ratios = {}
    for label, cfg in (
        ("on", gen.GeneratorConfig()),
        ("off", gen.GeneratorConfig(**NO_DYNAMICS)),
    ):
        _, pop, p, y = _hidden_clock(cfg)
        same_user = np.r_[False, pop.row_user[1:] == pop.row_user[:-1]]
        prev_like = np.r_[False, y[:-1]]
        prev_entity = np.r_[0, pop.row_entity[:-1]]
        for before in (0, 1):
            for now in (0, 1):
                m = same_user & (prev_entity == before) & (pop.row_entity == now)
                ratios[label, before, now] = p[m & prev_like].mean() / p[m & ~prev_like].mean()
    for before in (0, 1):
        for now in (0, 1):
            assert ratios["on", before, now] > ratios["off", before, now] + 0.3, (before, now)


def test_users_share_a_common_interest_across_entities() -> None:
    """The items a user likes in video and in article point the same way in the common space;
    with the common interest and the short-term topic switched off they do not."""
    cosines = {}
    for label, cfg in (
        ("on", replace(gen.GeneratorConfig(), delta_topic=NO_DYNAMICS["delta_topic"])),
        (
            "off",
            gen.GeneratorConfig(gamma_common={"video": 0.0, "article": 0.0}, **NO_DYNAMICS),
        ),
    ):
        world, pop, _, y = _hidden_clock(cfg)
        means = []
        for code, entity in enumerate(gen.ENTITIES):
            shown = world.items[entity].common[pop.row_item[pop.row_entity == code]]
            m = y & (pop.row_entity == code)
            # Centred on the entity's mean exposure, so that only the user's taste remains.
            liked = world.items[entity].common[pop.row_item[m]] - shown.mean(axis=0)
            sums = np.zeros((len(pop.user_ids), cfg.common_dim))
            np.add.at(sums, pop.row_user[m], liked)
            means.append(sums)
        both = (np.abs(means[0]).sum(1) > 0) & (np.abs(means[1]).sum(1) > 0)
        v, a = means[0][both], means[1][both]
        cos = (v * a).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(a, axis=1)
        cosines[label] = cos.mean()
    assert cosines["on"] > 0.08
    assert abs(cosines["off"]) < 0.04


def test_without_the_cross_entity_link_the_source_says_nothing_about_the_target() -> None:
    """--no-cross-entity-link: a video like no longer moves the next article's p (the states
    are per entity), while an article like still does; a user's mean video p no longer
    predicts their mean article p (own propensity and common interest per entity)."""
    stats = {}
    for label, cfg in (
        ("on", gen.GeneratorConfig()),
        ("off", gen.GeneratorConfig(cross_entity_link=False)),
    ):
        _, pop, p, y = _hidden_clock(cfg)
        same_user = np.r_[False, pop.row_user[1:] == pop.row_user[:-1]]
        prev_like = np.r_[False, y[:-1]]
        prev_entity = np.r_[0, pop.row_entity[:-1]]
        for before in (0, 1):
            m = same_user & (prev_entity == before) & (pop.row_entity == 1)
            stats[label, before] = p[m & prev_like].mean() / p[m & ~prev_like].mean()
        means = [
            np.bincount(pop.row_user, weights=p * (pop.row_entity == code))
            / np.maximum(np.bincount(pop.row_user, weights=pop.row_entity == code), 1)
            for code in (0, 1)
        ]
        both = np.bincount(pop.row_user, weights=pop.row_entity == 0) > 20
        both &= np.bincount(pop.row_user, weights=pop.row_entity == 1) > 20
        stats[label, "corr"] = np.corrcoef(np.log(means[0][both]), np.log(means[1][both]))[0, 1]
    assert stats["on", 0] > 1.3 and stats["off", 0] < 1.1  # video like -> next article
    assert stats["off", 1] > 1.3  # article like -> next article, kept
    assert stats["on", "corr"] > 0.2 and abs(stats["off", "corr"]) < 0.1


# sha256 of the CSVs for 300 users, seed 4, as written before the cross-entity switch existed
# (commit 27d81e0): the default data must not move when the generator gains a knob.
FROZEN_DEFAULT = {
    "QK-video.csv": "1988d2977d1aa2d6a1bbf297f485c9d68fe35ad1ce9c679353fb0c8f5db3ec44",
    "QK-article.csv": "02a017c727ede5d4d3e1f363f4993b2b670fd5d02f79b826879de308428edcad",
}


def test_default_data_unchanged_by_the_cross_entity_switch(tmp_path: Path) -> None:
    """The switch's extra draws come after the default ones: on (the default), the files are
    byte for byte those of the generator before it had the switch; off, they differ."""
    gen.generate(tmp_path / "on", 300, seed=4, config=gen.GeneratorConfig())
    gen.generate(tmp_path / "off", 300, seed=4, config=gen.GeneratorConfig(cross_entity_link=False))
    for name, digest in FROZEN_DEFAULT.items():
        assert hashlib.sha256((tmp_path / "on" / name).read_bytes()).hexdigest() == digest
    assert (tmp_path / "off" / "QK-article.csv").read_bytes() != (
        tmp_path / "on" / "QK-article.csv"
    ).read_bytes()


def test_informative_features_carry_signal_and_noise_features_do_not(moderate: dict) -> None:
    article = moderate["article"]
    features = ["item_score1", "like_count", "item_score2", "item_score3", "comment_count"]
    items = article.groupby("item_id").agg(
        p=("p_like", "mean"), **{f: (f, "first") for f in features}
    )
    rho = {f: items[f].corr(items["p"], method="spearman") for f in features}
    assert rho["item_score1"] > 0.45 and rho["like_count"] > 0.45
    for noise in ("item_score2", "item_score3", "comment_count"):
        assert abs(rho[noise]) < 0.25, noise
    # Categories are tied to item latents: they explain far more of the items' mean p_like than
    # the same labels shuffled over the items.
    for name, column, factor in (
        ("video", "video_category", 3.0),
        ("article", "category_first", 2.0),
    ):
        items = moderate[name].groupby("item_id").agg(p=("p_like", "mean"), c=(column, "first"))
        items = items[items["c"] != "\\N"]
        shuffled = np.random.default_rng(0).permutation(items["c"].to_numpy())
        assert _explained(items["p"], items["c"]) > factor * _explained(items["p"], shuffled), name


def _explained(values: pd.Series, groups) -> float:
    """Share of the variance of values explained by group means (eta squared)."""
    means = values.groupby(np.asarray(groups)).transform("mean")
    centred = values - values.mean()
    return float(((means - values.mean()) ** 2).sum() / (centred**2).sum())


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_users"):
        gen.generate(tmp_path, 0, seed=0)
    with pytest.raises(ValueError, match=r"target_like_rate\['video'\]"):
        gen.generate(
            tmp_path,
            10,
            seed=0,
            config=gen.GeneratorConfig(target_like_rate={"video": 1.5, "article": 0.1}),
        )


def test_cli_writes_files_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    result = subprocess.run(
        [
            sys.executable,
            "jobs/generate_tenrec.py",
            "--output",
            str(out),
            "--users",
            "300",
            "--seed",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"like_rate"' in result.stdout and "video rows" in result.stdout
    assert (out / "QK-video.csv").stat().st_size > 0 and (out / "oracle.parquet").exists()
    bad = subprocess.run(
        [sys.executable, "jobs/generate_tenrec.py", "--output", str(out), "--users", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "num_users" in bad.stderr
    small = tmp_path / "small"
    args = ["--users", "300", "--seed", "1", "--video-rows-median", "2"]
    args += ["--video-items-per-user", "2.0", "--article-items-per-user", "0"]
    sized = subprocess.run(
        [sys.executable, "jobs/generate_tenrec.py", "--output", str(small), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert sized.returncode == 2 and "article_items_per_user must be > 0" in sized.stderr
    args[-1] = "0.5"
    subprocess.run(
        [sys.executable, "jobs/generate_tenrec.py", "--output", str(small), *args],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    # Fewer rows per user, more items per user than the default run above (same users).
    default_rows = sum(1 for _ in (out / "QK-video.csv").open()) - 1
    small_rows = sum(1 for _ in (small / "QK-video.csv").open()) - 1
    assert small_rows < default_rows / 2
    items = {line.split(",")[1] for line in list((small / "QK-video.csv").open())[1:]}
    assert len(items) > 300  # at least min_items (100) at the default's 0.35 a user
