"""Phase 3 of the ETL (etl/build_samples.py), Spark's side: the one shuffle by user, which
hands each group of users to the Arrow pass (etl/split_pass.py) in (user, entity, line) order;
the summary from the pass's counts, checked to reconcile; and the summary's log at the job's end.

Apart because every later phase relies on what this shuffle leaves: the groups of users that
become the samples files, and the rows staged in that order.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from etl.config import DataConfig
from etl.encode import _pass_columns
from etl.samples_pass import GROUP
from etl.split_pass import STAT_SEPARATOR, SplitPass, output_schema
from mkt.contract import SPLITS

# The job's logger (etl/build_samples.py sets its handler).
log = logging.getLogger("etl.build_samples")


def _split_groups(parsed: DataFrame, config: DataConfig, files: int, staging_uri: str) -> DataFrame:
    """Every line, shuffled into `files` groups of users, through the split pass.

    The groups are the samples table's files (rows of one user stay in one file). A
    quarantined line (`reason` not null) comes along, so that the lines are parsed in the
    shuffle's map tasks and nothing is read twice. Each task orders its group by (user,
    entity, line) itself (numpy sorts the group's keys faster than Spark sorts its rows),
    stages the group's kept rows under staging_uri and returns the rows of
    etl.split_pass.output_schema. The entity goes as its ordinal in the config.
    """
    entity = F.when(F.lit(False), F.lit(0))
    for i, e in enumerate(config.entity_names):
        entity = entity.when(F.col("entity") == e, F.lit(i))
    lines = (
        parsed.withColumn("user_hash", F.xxhash64("user_key"))
        .repartition(files, "user_hash")
        .select(
            entity.cast("tinyint").alias("entity"),
            "line_no",
            "reason",
            "raw_line",
            "line_hash",
            "user_key",
            "label",
            F.spark_partition_id().alias(GROUP),
            *_pass_columns(config),
        )
    )
    return lines.mapInArrow(
        SplitPass(config, staging_uri), from_arrow_schema(output_schema(config))
    )


def _summarize(
    stats: dict[str, int], input_lines: dict[str, int], config: DataConfig
) -> dict[str, Any]:
    """Counts per entity and split from the pass's per-group counts (summed over the groups);
    raises if input lines != samples + quarantined + removed."""

    def stat(*key: str) -> int:
        return stats.get(STAT_SEPARATOR.join(key), 0)

    overlap = {
        key.split(STAT_SEPARATOR, 1)[1]: n for key, n in stats.items() if key.startswith("overlap")
    }
    entities = {}
    for e in config.entity_names:
        prefix = f"reason{STAT_SEPARATOR}{e}{STAT_SEPARATOR}"
        reasons = {k[len(prefix) :]: n for k, n in stats.items() if k.startswith(prefix)}
        quarantined = sum(reasons.values())
        found = stat("duplicates", e)
        removed = found if config.duplicates == "drop" else 0
        splits = {}
        for s in SPLITS:
            n_rows, likes = stat("rows", e, s), stat("likes", e, s)
            splits[s] = {
                "rows": n_rows,
                "likes": likes,
                "like_rate": likes / n_rows if n_rows else None,
                "users": stat("users", e, s),
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
            "quarantine_reasons": dict(sorted(reasons.items())),
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
