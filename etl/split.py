"""Phase 3 of the ETL (etl/build_samples.py): the one shuffle by user; each user's rows of an
entity split in line order (train / valid / test), like counts; the summary's counts, checked
to reconcile, and the summary's log at the job's end.

Apart because every later phase relies on what this shuffle leaves: the groups of users that
become the samples files, and the order (user, HISTORY_KEY: entity and likes before, line)
that the sequence window reads without another shuffle or sort.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.config import DataConfig
from etl.raw_lines import _raw
from mkt.contract import SPLITS

# The job's logger (etl/build_samples.py sets its handler).
log = logging.getLogger("etl.build_samples")

# The columns of every row between the shuffle by user and the encoding.
USER = ["user_hash", "user_key", "entity"]
# Each row's place in its user's histories, one number (a range frame's order key must be one
# column): the entity's ordinal in the config above ENTITY_SHIFT bits, the user's likes on
# earlier lines of that entity below. The sequence window (etl/encode.py) orders by it.
HISTORY_KEY = "history_key"
ENTITY_SHIFT = 40
# With `sequence.activity`: the user's rows and likes of the row's entity on earlier lines.
ROWS_BEFORE, LIKES_BEFORE = "rows_before", "likes_before"


def _split_rows(parsed: DataFrame, config: DataConfig, files: int) -> DataFrame:
    """Every line, shuffled into `files` groups of users, with its split and like count.

    The groups are the samples table's files (rows of one user stay in one file); every later
    step runs per user inside them. A quarantined line (`reason` not null) comes along, so that
    the lines are parsed in the shuffle's map tasks and nothing is staged; it is not `kept`,
    and counts for nothing below. Per (entity, user), kept rows in line order; n rows, n_test =
    floor(test_fraction * n + 0.5) last rows are test, of n_fit = n - n_test the last
    floor(valid_fraction * n_fit + 0.5) are valid. HISTORY_KEY holds the entity and the
    user's likes on earlier lines of it. An exact duplicate is `kept` = false when they are
    dropped (it stays here only to be counted).

    Output ordered by (user_hash, user_key, HISTORY_KEY, line_no): each entity's rows in line
    order, and what the sequence window, one per user whose frames are counted in likes,
    needs without a sort of its own.
    """
    # Both frames under one order: Spark evaluates them in one window operator, which buffers
    # each (user, entity)'s rows once; an unordered whole-partition window was a second one.
    in_order = Window.partitionBy(*USER).orderBy("line_no")
    running = in_order.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    user = in_order.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    rows = parsed.withColumn("user_hash", F.xxhash64("user_key")).repartition(files, "user_hash")
    good = F.col("reason").isNull()
    if config.duplicates == "drop":
        # Identical lines are all good or all quarantined: a good line's copies are good lines.
        copies = Window.partitionBy(*USER, "line_hash").orderBy("line_no")
        rows = rows.withColumn("kept", good & (F.row_number().over(copies) == 1))
    else:
        rows = rows.withColumn("kept", good)
    counted = F.col("kept").cast("long")
    # A quarantined line's label may be null: its term is null, which sum skips.
    liked = counted * F.col("label")
    rows = rows.select(
        "*",
        F.sum(counted).over(running).alias("rank"),
        F.sum(counted).over(user).alias("n"),
        (F.sum(liked).over(running) - F.coalesce(liked, F.lit(0))).alias("likes_before"),
    )
    n_test = F.floor(F.col("n") * config.test_fraction + 0.5)
    n_fit = F.col("n") - n_test
    n_train = n_fit - F.floor(n_fit * config.valid_fraction + 0.5)
    split = (
        F.when(F.col("rank") <= n_train, "train")
        .when(F.col("rank") <= n_fit, "valid")
        .otherwise("test")
    )
    return rows.select(
        *USER,
        "line_no",
        "label",
        "kept",
        "line_hash",
        "reason",
        "raw_line",
        split.alias("split"),
        _history_key(config).alias(HISTORY_KEY),
        *[_raw(f) for f in config.features],
        *(
            [(F.col("rank") - counted).alias(ROWS_BEFORE), F.col(LIKES_BEFORE)]
            if config.activity
            else []
        ),
    ).sortWithinPartitions("user_hash", "user_key", HISTORY_KEY, "line_no")


def _history_key(config: DataConfig) -> Column:
    ordinal = reduce(
        lambda chosen, e: chosen.when(F.col("entity") == e, config.entity_names.index(e)),
        config.entity_names,
        F.when(F.lit(False), 0),
    )
    return F.shiftleft(ordinal.cast("long"), ENTITY_SHIFT) + F.col("likes_before")


def _summarize(
    rows: DataFrame,
    kept: DataFrame,
    input_lines: dict[str, int],
    config: DataConfig,
) -> dict[str, Any]:
    """Counts per entity and split; raises if input lines != samples + quarantined + removed.

    Two jobs, each aggregating per user first, inside the shuffled groups (no further
    shuffle): one gives the users per set of entities (the overlap) with their rows, likes
    and users per (entity, split); the other the exact duplicates among the good lines and
    the quarantined lines per reason kind (the text before ':').
    """
    parts = [(e, s) for e in config.entity_names for s in SPLITS]

    def part(e: str, s: str) -> Column:
        return (F.col("entity") == e) & (F.col("split") == s)

    per_user = kept.groupBy("user_hash", "user_key").agg(
        *[F.max(F.col("entity") == e).alias(f"in__{e}") for e in config.entity_names],
        *[F.count(F.when(part(e, s), 1)).alias(f"rows__{e}__{s}") for e, s in parts],
        *[F.sum(F.when(part(e, s), F.col("label"))).alias(f"likes__{e}__{s}") for e, s in parts],
    )
    by_entities = (
        per_user.groupBy(*[f"in__{e}" for e in config.entity_names])
        .agg(
            F.count(F.lit(1)).alias("users"),
            *[
                F.sum(f"{k}__{e}__{s}").alias(f"{k}__{e}__{s}")
                for k in ("rows", "likes")
                for e, s in parts
            ],
            *[
                F.count(F.when(F.col(f"rows__{e}__{s}") > 0, 1)).alias(f"users__{e}__{s}")
                for e, s in parts
            ],
        )
        .collect()
    )
    overlap = {
        "+".join(sorted(e for e in config.entity_names if r[f"in__{e}"])): r.users
        for r in by_entities
    }

    def total(key: str) -> int:
        return sum(r[key] or 0 for r in by_entities)

    # Copies of a line share its reason: grouped by it too, the good lines' groups (kind
    # null) give the duplicates, the quarantined lines' the count per reason kind.
    kind = F.substring_index("reason", ":", 1).alias("kind")
    copies = rows.groupBy(*USER, "line_hash", kind).agg(F.count(F.lit(1)).alias("copies"))
    duplicates: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {e: {} for e in config.entity_names}
    for r in (
        copies.groupBy("entity", "kind")
        .agg(
            F.sum(F.col("copies") - 1).alias("duplicates"),
            F.sum("copies").alias("lines"),
        )
        .collect()
    ):
        if r.kind is None:
            duplicates[r.entity] = r.duplicates
        else:
            reasons[r.entity][r.kind] = r.lines

    entities = {}
    for e in config.entity_names:
        quarantined = sum(reasons[e].values())
        found = duplicates.get(e) or 0
        removed = found if config.duplicates == "drop" else 0
        splits = {}
        for s in SPLITS:
            n_rows, likes = total(f"rows__{e}__{s}"), total(f"likes__{e}__{s}")
            splits[s] = {
                "rows": n_rows,
                "likes": likes,
                "like_rate": likes / n_rows if n_rows else None,
                "users": total(f"users__{e}__{s}"),
            }
        samples = sum(s["rows"] for s in splits.values())
        if input_lines[e] != samples + quarantined + removed:
            raise RuntimeError(
                f"{e}: {input_lines[e]} input lines != {samples} samples + {quarantined} "
                f"quarantined + {removed} removed duplicates"
            )
        entities[e] = {
            "input_lines": input_lines[e],
            "samples": samples,
            "quarantined": quarantined,
            "quarantine_reasons": reasons[e],
            "duplicates_found": found,
            "duplicates_removed": removed,
            "users": sum(n for key, n in overlap.items() if e in key.split("+")),
            "splits": splits,
        }
    return {
        "dataset": config.name,
        "history_mode": config.history_mode,
        "duplicates": config.duplicates,
        "seq_len": config.seq_len,
        "entities": entities,
        "user_overlap": dict(sorted(overlap.items())),
    }


def _log_summary(summary: dict[str, Any]) -> None:
    for entity, s in summary["entities"].items():
        log.info(
            "%s: %d input lines = %d samples + %d quarantined + %d removed duplicates "
            "(%d duplicates found); %d users",
            entity,
            s["input_lines"],
            s["samples"],
            s["quarantined"],
            s["duplicates_removed"],
            s["duplicates_found"],
            s["users"],
        )
        for split, v in s["splits"].items():
            rate = "n/a" if v["like_rate"] is None else f"{v['like_rate']:.4f}"
            log.info("  %-5s %9d rows, like rate %s, %d users", split, v["rows"], rate, v["users"])
        if s["quarantine_reasons"]:
            log.info("  quarantine reasons: %s", s["quarantine_reasons"])
    log.info("user overlap (users by the entities they appear in): %s", summary["user_overlap"])
    # Features with `min_count` > 1 that folded something (the etl_summary.json lists all).
    for name, rare in summary["rare_ids"].items():
        if not rare["oov_values"]:
            continue
        log.info(
            "%s: %d values on fewer than %d train rows are OOV (%d train rows)",
            name,
            rare["oov_values"],
            rare["min_count"],
            rare["oov_train_rows"],
        )
    log.info(
        "history mode %s, duplicates %s, %.1fs, written to %s",
        summary["history_mode"],
        summary["duplicates"],
        summary["wall_s"],
        summary["output_dir"],
    )
