"""Generate Tenrec-format data (QK-video.csv, QK-article.csv) with planted, documented structure.

The real Tenrec files cannot be downloaded here, so the pipeline runs on data written in exactly
their format. The generative model is described, with its formulas, in docs/generator.md; the
GeneratorConfig field names are the symbols used there. It was fixed before any model was
trained and must not be tuned to make a model win.

Beside the two CSVs the generator writes RAW_DIR/oracle.parquet (entity, line_no, p_like): the
true like probability of every data line, for oracle AUC/GAUC.

Usage:
    python jobs/generate_tenrec.py --output RAW_DIR [--users N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mkt.contract import RAW_MISSING

VIDEO, ARTICLE = "video", "article"
ENTITIES = (VIDEO, ARTICLE)
FILE_NAMES = {VIDEO: "QK-video.csv", ARTICLE: "QK-article.csv"}
ORACLE_FILE = "oracle.parquet"
# Header lines exactly as in Tenrec (Yuan et al., NeurIPS 2022; docs/generator.md).
HEADERS = {
    VIDEO: "user_id,item_id,click,follow,like,share,video_category,watching_times,gender,age",
    ARTICLE: (
        "user_id,item_id,click,gender,age,exposure_count,click_count,like_count,comment_count,"
        "read_percentage,item_score1,item_score2,category_second,category_first,item_score3,"
        "read,read_time,share,like,follow,favorite"
    ),
}
COLUMNS = {entity: header.split(",") for entity, header in HEADERS.items()}
DEFAULT_USERS = 8000
ORACLE_SCHEMA = pa.schema(
    [("entity", pa.string()), ("line_no", pa.int64()), ("p_like", pa.float64())]
)

# Small fixed direct effects of the profile on the like logit (docs/generator.md, "profile").
GENDER_PROBS = np.array([0.10, 0.50, 0.40])
GENDER_EFFECT = np.array([0.0, -0.05, 0.10])
AGE_PROBS = np.array([0.06, 0.10, 0.22, 0.24, 0.17, 0.11, 0.06, 0.04])
AGE_EFFECT = 0.03 * (np.arange(8) - 3.5)

# Seed-sequence purposes: each random stream is keyed by (seed, purpose[, chunk]) so that
# adding draws to one stream never shifts another.
_STREAM_WORLD, _STREAM_CALIBRATION, _STREAM_CHUNK = 0, 1, 2


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the generative model (docs/generator.md, same names)."""

    target_like_rate: dict[str, float] = field(
        default_factory=lambda: {VIDEO: 0.036, ARTICLE: 0.018}
    )
    # Latent dimensions: common interest (shared by both entities) and entity-specific interest.
    common_dim: int = 8
    specific_dim: int = 4
    gamma_common: dict[str, float] = field(default_factory=lambda: {VIDEO: 1.0, ARTICLE: 0.9})
    gamma_specific: dict[str, float] = field(default_factory=lambda: {VIDEO: 0.6, ARTICLE: 0.8})
    user_bias_sd: float = 0.4
    item_bias_sd: float = 0.4
    # Short-term state on the hidden global clock.
    decay: float = 0.85
    delta_mood: dict[str, float] = field(default_factory=lambda: {VIDEO: 0.6, ARTICLE: 0.6})
    delta_topic: dict[str, float] = field(default_factory=lambda: {VIDEO: 0.8, ARTICLE: 0.8})
    # Activity (rows per user).
    video_rows_median: float = 10.0
    video_rows_sigma: float = 1.3
    article_user_fraction_logit: float = -0.7
    article_rows_median: float = 8.0
    article_rows_sigma: float = 1.2
    activity_correlation: float = 0.6
    article_only_fraction: float = 0.02
    max_rows_per_user: int = 20000
    # Items.
    video_items_per_user: float = 0.35
    article_items_per_user: float = 0.05
    min_items: int = 100
    popularity_sigma: float = 1.0
    video_categories: int = 40
    article_first_categories: int = 10
    article_second_per_first: int = 5
    # Log defects.
    missing_category_rate: float = 0.03
    duplicate_rate: float = 0.005
    # Execution.
    users_per_chunk: int = 20000
    calibration_users: int = 4000
    # False: the two entities share nothing about a user but the profile columns. Each draws
    # its own common interest (and profile shifts of it) and general propensity, and each
    # entity's short-term state moves only with its own likes: the source carries nothing for
    # the target (the negative-transfer check, docs/generator.md). The extra draws come after
    # all the default ones, so the default data are byte for byte unchanged.
    cross_entity_link: bool = True

    def validate(self) -> None:
        for name in (
            "target_like_rate",
            "gamma_common",
            "gamma_specific",
            "delta_mood",
            "delta_topic",
        ):
            if set(getattr(self, name)) != set(ENTITIES):
                raise ValueError(f"GeneratorConfig.{name} needs exactly the keys {ENTITIES}")
        for entity, rate in self.target_like_rate.items():
            if not 0.0 < rate < 1.0:
                raise ValueError(f"GeneratorConfig.target_like_rate[{entity!r}] must be in (0, 1)")
        for name in ("missing_category_rate", "duplicate_rate", "article_only_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GeneratorConfig.{name} must be in [0, 1)")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError("GeneratorConfig.decay must be in [0, 1)")
        for name in ("users_per_chunk", "calibration_users", "max_rows_per_user", "min_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorConfig.{name} must be >= 1")
        for name in (
            "video_rows_median",
            "article_rows_median",
            "video_items_per_user",
            "article_items_per_user",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"GeneratorConfig.{name} must be > 0")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# World: items of both entities and the profile effects (fixed for the whole data set).
# ---------------------------------------------------------------------------------------------


@dataclass
class _Items:
    common: np.ndarray  # a_i, (n, common_dim): loading on the common interest space
    specific: np.ndarray  # b_i, (n, specific_dim): loading on the entity's own interest space
    bias: np.ndarray  # beta_i
    cdf: np.ndarray  # exposure distribution (popularity), cumulative
    columns: dict[str, np.ndarray]  # item-level CSV columns (category, article counters, scores)
    category_missing: np.ndarray  # bool, video only (all False for article)
    length_s: np.ndarray  # article length in seconds (drives read_time)


@dataclass
class _World:
    items: dict[str, _Items]
    gender_offset: np.ndarray  # (3, common_dim): profile shift of the common interest
    age_offset: np.ndarray  # (8, common_dim)
    # The article's own profile shifts, without the cross-entity link (else None: shared).
    article_offsets: tuple[np.ndarray, np.ndarray] | None = None


def _popularity_cdf(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    weights = np.exp(sigma * rng.standard_normal(n))
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _unit_loadings(rng: np.random.Generator, parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Sum of weighted centroid rows plus noise, scaled so each component has variance 1/dim."""
    dim = parts[0][1].shape[1]
    total = sum(w * x for w, x in parts)
    noise_weight = np.sqrt(max(1.0 - sum(w * w for w, _ in parts), 0.0))
    return (total + noise_weight * rng.standard_normal(total.shape)) / np.sqrt(dim)


def _make_items(rng: np.random.Generator, entity: str, n: int, cfg: GeneratorConfig) -> _Items:
    dc, ds = cfg.common_dim, cfg.specific_dim
    cdf = _popularity_cdf(rng, n, cfg.popularity_sigma)
    if entity == VIDEO:
        k = cfg.video_categories
        cat = rng.choice(k, size=n, p=_zipf_probs(k))
        common = _unit_loadings(rng, [(0.8, rng.standard_normal((k, dc))[cat])])
        specific = _unit_loadings(rng, [(0.8, rng.standard_normal((k, ds))[cat])])
        bias = 0.3 * rng.standard_normal(k)[cat] + cfg.item_bias_sd * rng.standard_normal(n)
        missing = rng.random(n) < cfg.missing_category_rate
        return _Items(common, specific, bias, cdf, {"video_category": cat}, missing, np.zeros(n))

    k1, per = cfg.article_first_categories, cfg.article_second_per_first
    first = rng.choice(k1, size=n, p=_zipf_probs(k1))
    second = first * per + rng.integers(0, per, size=n)
    common = _unit_loadings(
        rng,
        [
            (0.6, rng.standard_normal((k1, dc))[first]),
            (0.5, rng.standard_normal((k1 * per, dc))[second]),
        ],
    )
    specific = _unit_loadings(
        rng,
        [
            (0.6, rng.standard_normal((k1, ds))[first]),
            (0.5, rng.standard_normal((k1 * per, ds))[second]),
        ],
    )
    bias = (
        0.25 * rng.standard_normal(k1)[first]
        + 0.2 * rng.standard_normal(k1 * per)[second]
        + cfg.item_bias_sd * rng.standard_normal(n)
    )
    # Platform counters: exposure and clicks follow popularity only; likes also follow quality.
    popularity = np.diff(cdf, prepend=0.0) * n
    exposure = 1 + rng.poisson(300.0 * popularity)
    click_count = rng.binomial(exposure, rng.beta(2.0, 6.0, size=n))
    like_count = rng.binomial(click_count, _sigmoid(-3.0 + 1.5 * bias / cfg.item_bias_sd))
    columns = {
        "exposure_count": exposure,
        "click_count": click_count,
        "like_count": like_count,
        "comment_count": rng.poisson(np.exp(1.0 + rng.standard_normal(n))),
        "item_score1": np.clip(np.rint(5.0 + 3.0 * bias + rng.standard_normal(n)), 0, 10),
        "item_score2": rng.binomial(10, 0.5, size=n),
        "item_score3": np.rint(np.exp(3.0 + 0.8 * rng.standard_normal(n))),
        "category_first": first,
        "category_second": second,
    }
    length_s = np.exp(np.log(120.0) + 0.5 * rng.standard_normal(n))
    return _Items(common, specific, bias, cdf, columns, np.zeros(n, dtype=bool), length_s)


def _zipf_probs(k: int) -> np.ndarray:
    p = 1.0 / (np.arange(k) + 2.0)
    return p / p.sum()


def _make_world(seed: int, num_users: int, cfg: GeneratorConfig) -> _World:
    rng = _rng(seed, _STREAM_WORLD)
    n_video = max(cfg.min_items, round(cfg.video_items_per_user * num_users))
    n_article = max(cfg.min_items, round(cfg.article_items_per_user * num_users))
    items = {VIDEO: _make_items(rng, VIDEO, n_video, cfg)}
    items[ARTICLE] = _make_items(rng, ARTICLE, n_article, cfg)
    dc = cfg.common_dim
    world = _World(items, 0.3 * rng.standard_normal((3, dc)), 0.3 * rng.standard_normal((8, dc)))
    if not cfg.cross_entity_link:
        world.article_offsets = (
            0.3 * rng.standard_normal((3, dc)),
            0.3 * rng.standard_normal((8, dc)),
        )
    return world


# ---------------------------------------------------------------------------------------------
# Population: users, their merged (hidden-clock) timeline and everything drawn before labels.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Population:
    user_ids: np.ndarray  # (U,)
    gender: np.ndarray
    age: np.ndarray
    # Timeline rows, sorted by user then hidden time.
    row_user: np.ndarray  # index into user arrays
    row_entity: np.ndarray  # 0 = video, 1 = article
    row_item: np.ndarray  # item index within its entity
    row_static: np.ndarray  # logit without intercept and short-term terms
    row_common: np.ndarray  # a_i of the row's item, (R, common_dim)
    row_uniform: np.ndarray  # U(0,1) that decides the like (common random numbers)
    user_start: np.ndarray  # first timeline row of each user
    user_len: np.ndarray


def _draw_population(
    rng: np.random.Generator, user_ids: np.ndarray, world: _World, cfg: GeneratorConfig
) -> _Population:
    n = len(user_ids)
    dc, ds = cfg.common_dim, cfg.specific_dim
    gender = rng.choice(3, size=n, p=GENDER_PROBS)
    age = rng.choice(8, size=n, p=AGE_PROBS)
    common = world.gender_offset[gender] + world.age_offset[age] + rng.standard_normal((n, dc))
    specific = {e: rng.standard_normal((n, ds)) for e in ENTITIES}
    user_bias = cfg.user_bias_sd * rng.standard_normal(n) + GENDER_EFFECT[gender] + AGE_EFFECT[age]

    # Long-tailed activity; article activity is correlated with video activity.
    zeta = rng.standard_normal(n)
    rho = cfg.activity_correlation
    zeta_a = rho * zeta + np.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    n_video = np.ceil(cfg.video_rows_median * np.exp(cfg.video_rows_sigma * zeta))
    n_article = np.ceil(cfg.article_rows_median * np.exp(cfg.article_rows_sigma * zeta_a))
    reads = rng.random(n) < _sigmoid(cfg.article_user_fraction_logit + 0.8 * zeta)
    article_only = rng.random(n) < cfg.article_only_fraction
    n_video = np.where(article_only, 0, n_video)
    n_article = np.where(reads | article_only, n_article, 0)
    n_video = np.minimum(n_video, cfg.max_rows_per_user).astype(np.int64)
    n_article = np.minimum(n_article, cfg.max_rows_per_user).astype(np.int64)

    # Merged timeline: a uniformly random interleaving of each user's video and article events.
    lengths = n_video + n_article
    row_user = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(row_user)) - starts[row_user]
    is_article = pos >= n_video[row_user]
    order = np.lexsort((rng.random(len(row_user)), row_user))
    row_entity = is_article[order].astype(np.int8)

    row_item = np.empty(len(row_user), dtype=np.int64)
    row_static = np.empty(len(row_user))
    row_common = np.empty((len(row_user), dc))
    item_u = [rng.random(int((row_entity == code).sum())) for code in range(len(ENTITIES))]
    common = {e: common for e in ENTITIES}
    user_bias = {e: user_bias for e in ENTITIES}
    if world.article_offsets is not None:
        gender_offset, age_offset = world.article_offsets
        common[ARTICLE] = gender_offset[gender] + age_offset[age] + rng.standard_normal((n, dc))
        user_bias[ARTICLE] = (
            cfg.user_bias_sd * rng.standard_normal(n) + GENDER_EFFECT[gender] + AGE_EFFECT[age]
        )
    for code, entity in enumerate(ENTITIES):
        sel = row_entity == code
        items = world.items[entity]
        idx = np.searchsorted(items.cdf, item_u[code], side="right")
        idx = np.minimum(idx, len(items.cdf) - 1)
        users = row_user[sel]
        row_item[sel] = idx
        row_common[sel] = items.common[idx]
        row_static[sel] = (
            user_bias[entity][users]
            + items.bias[idx]
            + cfg.gamma_common[entity]
            * np.einsum("ij,ij->i", common[entity][users], items.common[idx])
            + cfg.gamma_specific[entity]
            * np.einsum("ij,ij->i", specific[entity][users], items.specific[idx])
        )
    return _Population(
        user_ids,
        gender,
        age,
        row_user,
        row_entity,
        row_item,
        row_static,
        row_common,
        rng.random(len(row_user)),
        starts,
        lengths,
    )


def _run_dynamics(
    pop: _Population, intercept: np.ndarray, cfg: GeneratorConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Walk the hidden clock: p_t depends on the decayed state of the user's earlier likes.

    Vectorised over users: step t handles the t-th event of every user that has one. Users are
    ordered by timeline length (descending) so the active users are always a prefix.
    """
    delta_m = np.array([cfg.delta_mood[e] for e in ENTITIES])[pop.row_entity]
    delta_h = np.array([cfg.delta_topic[e] for e in ENTITIES])[pop.row_entity]
    base = pop.row_static + intercept[pop.row_entity]
    order = np.argsort(-pop.user_len, kind="stable")
    starts, lengths = pop.user_start[order], pop.user_len[order]
    # active[t] = number of users with more than t events.
    steps = np.arange(int(lengths.max(initial=0)))
    active = len(lengths) - np.searchsorted(lengths[::-1], steps, side="right")
    # One short-term state per user, moved by likes of either entity; without the
    # cross-entity link one per user and entity, moved by that entity's likes only.
    states = 1 if cfg.cross_entity_link else len(ENTITIES)
    mood = np.zeros((states, len(order)))
    topic = np.zeros((states, len(order), pop.row_common.shape[1]))
    p = np.empty(len(base))
    y = np.empty(len(base), dtype=bool)
    for t, k in enumerate(active):
        rows = starts[:k] + t
        a = pop.row_common[rows]
        state = (pop.row_entity[rows] if states > 1 else np.zeros(k, np.int64), np.arange(k))
        z = (
            base[rows]
            + delta_m[rows] * np.tanh(mood[state])
            + delta_h[rows] * np.tanh(np.einsum("ij,ij->i", topic[state], a))
        )
        p_t = _sigmoid(z)
        y_t = pop.row_uniform[rows] < p_t
        p[rows], y[rows] = p_t, y_t
        mood[:, :k] *= cfg.decay
        topic[:, :k] *= cfg.decay
        mood[state] += y_t
        topic[state] += y_t[:, None] * a
    return p, y


def _calibrate_intercepts(seed: int, world: _World, cfg: GeneratorConfig) -> np.ndarray:
    """Bisect each entity's intercept so that mean p_like on a calibration population hits the
    target rate. Common random numbers make the result deterministic; the two intercepts are
    bisected together since each mostly moves its own entity's rate."""
    rng = _rng(seed, _STREAM_CALIBRATION)
    pop = _draw_population(rng, np.arange(cfg.calibration_users), world, cfg)
    target = np.array([cfg.target_like_rate[e] for e in ENTITIES])
    lo, hi = np.full(2, -15.0), np.full(2, 5.0)
    for _ in range(24):
        mid = (lo + hi) / 2.0
        p, _ = _run_dynamics(pop, mid, cfg)
        rate = np.array([p[pop.row_entity == c].mean() for c in range(2)])
        too_high = rate > target
        hi = np.where(too_high, mid, hi)
        lo = np.where(too_high, lo, mid)
    return (lo + hi) / 2.0


# ---------------------------------------------------------------------------------------------
# Rows of one entity: post-impression columns, duplicates, Arrow tables.
# ---------------------------------------------------------------------------------------------


def _bernoulli(
    rng: np.random.Generator, like: np.ndarray, p_like: float, p_other: float
) -> np.ndarray:
    return (rng.random(len(like)) < np.where(like, p_like, p_other)).astype(np.int64)


def _post_impression(
    rng: np.random.Generator, entity: str, like: np.ndarray, items: _Items, idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Behaviour observed after the impression, drawn given the label (so it leaks it)."""
    n = len(like)
    if entity == VIDEO:
        click = np.where(like, 1, (rng.random(n) < 0.15).astype(np.int64))
        watching = click * (1 + rng.poisson(np.where(like, 1.2, 0.3)))
        return {
            "click": click,
            "follow": click * _bernoulli(rng, like, 0.05, 0.003),
            "share": click * _bernoulli(rng, like, 0.08, 0.004),
            "watching_times": watching,
        }
    read = _bernoulli(rng, like, 0.97, 0.75)
    share_read = np.where(like, rng.beta(6.0, 2.0, n), rng.beta(2.0, 3.0, n))
    read_pct = read * np.rint(100.0 * share_read).astype(np.int64)
    read_time = np.rint(
        read_pct / 100.0 * items.length_s[idx] * np.exp(0.3 * rng.standard_normal(n))
    ).astype(np.int64)
    return {
        "click": np.ones(n, dtype=np.int64),
        "read": read,
        "read_percentage": read_pct,
        "read_time": read_time,
        "share": _bernoulli(rng, like, 0.06, 0.004),
        "follow": _bernoulli(rng, like, 0.04, 0.002),
        "favorite": _bernoulli(rng, like, 0.15, 0.005),
    }


def _adjacent_duplicates(columns: dict[str, pa.Array]) -> int:
    """Lines equal to the line before: the planted copies plus the rare natural repeat of an
    item shown twice in a row without any reaction."""
    same = None
    for array in columns.values():
        values = array.to_numpy(zero_copy_only=False)
        equal = values[1:] == values[:-1]
        same = equal if same is None else same & equal
    return int(same.sum()) if same is not None else 0


def _entity_table(
    rng: np.random.Generator,
    entity: str,
    pop: _Population,
    p: np.ndarray,
    y: np.ndarray,
    world: _World,
    cfg: GeneratorConfig,
) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    code = ENTITIES.index(entity)
    sel = np.flatnonzero(pop.row_entity == code)  # already in (user, hidden time) order
    items = world.items[entity]
    # Logging defect: some lines are written twice in a row.
    copies = 1 + (rng.random(len(sel)) < cfg.duplicate_rate)
    rows = np.repeat(sel, copies)
    like = y[rows]
    user = pop.row_user[rows]
    idx = pop.row_item[rows]
    # Post-impression columns are drawn per original event, then repeated with it.
    post = _post_impression(rng, entity, y[sel], items, pop.row_item[sel])
    data: dict[str, pa.Array] = {}
    for name in COLUMNS[entity]:
        if name == "user_id":
            values = pop.user_ids[user]
        elif name == "item_id":
            values = idx
        elif name == "like":
            values = like.astype(np.int64)
        elif name == "gender":
            values = pop.gender[user]
        elif name == "age":
            values = pop.age[user]
        elif name in post:
            values = np.repeat(post[name], copies)
        else:
            values = items.columns[name][idx]
        data[name] = pa.array(np.asarray(values, dtype=np.int64))
    missing_count = 0
    if entity == VIDEO:
        missing = items.category_missing[idx]
        missing_count = int(missing.sum())
        data["video_category"] = pc.if_else(
            pa.array(missing), RAW_MISSING, pc.cast(data["video_category"], pa.string())
        )
    # Repeat exposures of an item to a user happen naturally; count those with both labels.
    pair = pop.user_ids[pop.row_user[sel]] * len(items.cdf) + pop.row_item[sel]
    _, inv = np.unique(pair, return_inverse=True)
    pos = np.bincount(inv, weights=y[sel])
    cnt = np.bincount(inv)
    stats = {
        "rows": len(rows),
        "likes": int(like.sum()),
        "duplicates": _adjacent_duplicates(data),
        "missing_category": missing_count,
        "conflicting_pairs": int(((pos > 0) & (pos < cnt)).sum()),
        "users": len(np.unique(user)),
    }
    return pa.table(data), p[rows], stats


# ---------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------


def generate(
    output_dir: Path,
    num_users: int = DEFAULT_USERS,
    seed: int = 0,
    config: GeneratorConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write QK-video.csv, QK-article.csv and oracle.parquet into output_dir; return a summary.

    Same (num_users, seed, config) gives byte-identical files. Users are generated and written
    in chunks of config.users_per_chunk, so memory is bounded by the chunk, not the data size.
    """
    cfg = config or GeneratorConfig()
    cfg.validate()
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)

    world = _make_world(seed, num_users, cfg)
    intercept = _calibrate_intercepts(seed, world, cfg)
    say(f"intercepts: video {intercept[0]:.4f}, article {intercept[1]:.4f}")

    totals = {
        e: dict.fromkeys(
            ("rows", "likes", "duplicates", "missing_category", "conflicting_pairs", "users"), 0
        )
        for e in ENTITIES
    }
    p_sum = dict.fromkeys(ENTITIES, 0.0)
    article_only = 0
    files = {e: open(output_dir / FILE_NAMES[e], "wb") for e in ENTITIES}  # noqa: SIM115
    writers: dict[str, pacsv.CSVWriter] = {}
    oracle = pq.ParquetWriter(output_dir / ORACLE_FILE, ORACLE_SCHEMA)
    try:
        for e in ENTITIES:
            files[e].write((HEADERS[e] + "\n").encode())
        for chunk, first in enumerate(range(0, num_users, cfg.users_per_chunk)):
            rng = _rng(seed, _STREAM_CHUNK, chunk)
            user_ids = np.arange(first, min(first + cfg.users_per_chunk, num_users))
            pop = _draw_population(rng, user_ids, world, cfg)
            p, y = _run_dynamics(pop, intercept, cfg)
            rows_per_user = [
                np.bincount(pop.row_user[pop.row_entity == c], minlength=len(user_ids))
                for c in range(2)
            ]
            article_only += int(((rows_per_user[0] == 0) & (rows_per_user[1] > 0)).sum())
            for e in ENTITIES:
                table, p_rows, stats = _entity_table(rng, e, pop, p, y, world, cfg)
                if e not in writers:
                    writers[e] = pacsv.CSVWriter(
                        files[e],
                        table.schema,
                        write_options=pacsv.WriteOptions(
                            include_header=False, quoting_style="none"
                        ),
                    )
                writers[e].write_table(table)
                start = totals[e]["rows"] + 1
                oracle.write_table(
                    pa.table(
                        {
                            "entity": pa.array([e] * len(p_rows), pa.string()),
                            "line_no": pa.array(np.arange(start, start + len(p_rows))),
                            "p_like": pa.array(p_rows),
                        },
                        schema=ORACLE_SCHEMA,
                    )
                )
                p_sum[e] += float(p_rows.sum())
                for key, value in stats.items():
                    totals[e][key] += value
            say(
                f"users {user_ids[-1] + 1}/{num_users}: video rows {totals[VIDEO]['rows']}, "
                f"article rows {totals[ARTICLE]['rows']}"
            )
    finally:
        for w in writers.values():
            w.close()
        for f in files.values():
            f.close()
        oracle.close()

    summary: dict = {
        "users": num_users,
        "article_only_users": article_only,
        "seed": seed,
        "output_dir": str(output_dir),
    }
    for i, e in enumerate(ENTITIES):
        t = totals[e]
        summary[e] = {
            **t,
            "like_rate": t["likes"] / max(t["rows"], 1),
            "mean_p_like": p_sum[e] / max(t["rows"], 1),
            "target_like_rate": cfg.target_like_rate[e],
            "intercept": float(intercept[i]),
        }
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="RAW_DIR to write into")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="number of users")
    parser.add_argument("--seed", type=int, default=0)
    defaults = GeneratorConfig()
    parser.add_argument(
        "--no-cross-entity-link",
        dest="cross_entity_link",
        action="store_false",
        help="the two entities share nothing about a user but gender and age (docs/generator.md)",
    )
    # The size knobs besides --users: rows per user and items per user, e.g. Tenrec's
    # vocabularies at 20M rows (docs/BENCHMARKS.md, "A Tenrec-size run").
    for name in (
        "users_per_chunk",
        "duplicate_rate",
        "missing_category_rate",
        "max_rows_per_user",
        "video_rows_median",
        "article_rows_median",
        "video_items_per_user",
        "article_items_per_user",
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(getattr(defaults, name)),
            default=getattr(defaults, name),
        )
    parser.add_argument("--video-like-rate", type=float, default=defaults.target_like_rate[VIDEO])
    parser.add_argument(
        "--article-like-rate", type=float, default=defaults.target_like_rate[ARTICLE]
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in fields(GeneratorConfig) if hasattr(args, f.name)
    }
    overrides["target_like_rate"] = {VIDEO: args.video_like_rate, ARTICLE: args.article_like_rate}
    try:
        summary = generate(
            args.output, args.users, args.seed, GeneratorConfig(**overrides), log=print
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def cli() -> None:
    """The command line, also installed as `mkt-generate` (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
