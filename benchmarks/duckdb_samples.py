"""The ETL's samples computed by DuckDB in one process: the reference for benchmarks/bench_etl.py.

    python benchmarks/duckdb_samples.py --config conf/data/tenrec.yaml --input RAW_DIR --output DIR \
        [--threads 2] [--memory-limit 6GB] [--history-mode ...] [--seq-len N] [--duplicates ...] [--activity]

Same rules as etl/build_samples.py (docs/etl.md): line numbers, quarantine reasons, duplicates,
per-user split, vocabularies (train split, by descending count, entity, raw value), bucket
boundaries, encoding and liked-item sequences (the same bounded snapshot join). It writes
DIR/samples (Parquet, hive-partitioned by entity and split), DIR/vocab.parquet and
DIR/quarantine.parquet with the columns of docs/data-contract.md, and prints a summary.

Differences, on purpose, from the Spark job:
- Bucket boundaries are exact quantiles (the value at rank ceil(p * n)), which is what Spark's
  percentile_approx returns while the train values are few (under ~1/(2 * accuracy^-1), 5000
  at accuracy 10000); above that Spark's are approximate, so bucket indices may differ in
  a few rows near a boundary.
- Input must be UTF-8 (DuckDB's CSV reader rejects other bytes); the Spark job quarantines
  such lines. It is a reference for measurements and equality checks, not a second ETL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

from etl.config import DataConfig, Feature, load_config
from mkt.contract import (
    ACTIVITY_BOUNDARIES,
    ACTIVITY_COUNTS,
    ACTIVITY_RELATIONS,
    FIRST_INDEX,
    MISSING,
    MISSING_TOKENS,
    OOV,
    PAD,
    SPLITS,
    activity_feature,
)

# Spark's string -> long cast ignores leading and trailing characters <= ' '.
_SPARK_BLANK = "[\\x00-\\x20]"


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _raw(feature: Feature) -> str:
    return f"raw__{feature.name}"


def _read_header(path: Path) -> list[str]:
    with path.open("rb") as fh:
        first = fh.readline().decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
    return [c.strip() for c in first.split(",")]


def _parsed_sql(config: DataConfig, entity: str, path: Path, header: list[str]) -> str:
    """One SELECT of an entity's lines: line_no, raw_line, a hash of it, reason, user_key, label,
    raw features. Every field is trimmed, and every id parsed, once, in its own subquery."""
    ids = list(dict.fromkeys((config.user_key, *config.id_columns)))
    used = [config.label, *ids, *(f.columns[entity] for f in config.features_of(entity))]
    columns = list(dict.fromkeys(used))

    def as_long(value: str) -> str:
        stripped = f"regexp_replace({value}, '^{_SPARK_BLANK}+|{_SPARK_BLANK}+$', '', 'g')"
        return (
            f"CASE WHEN regexp_full_match({stripped}, '[+-]?[0-9]+') "
            f"THEN try_cast({stripped} AS BIGINT) END"
        )

    checks = [
        f"WHEN n_fields != {len(header)} THEN "
        f"'wrong column count: ' || n_fields || ', expected {len(header)}'"
    ]
    for column in ids:
        checks += [
            f"WHEN \"v__{column}\" = '' THEN {_sql_str(f'empty {column}')}",
            f'WHEN "id__{column}" IS NULL THEN {_sql_str(f"non-numeric {column}: ")} '
            f"|| '''' || \"v__{column}\" || ''''",
        ]
    label = f'"v__{config.label}"'
    checks.append(
        f"WHEN {label} NOT IN ('0', '1') THEN "
        f"{_sql_str(f'label {config.label} not in {{0,1}}: ')} || '''' || {label} || ''''"
    )
    features = []
    for f in config.features:
        if entity not in f.columns:
            features.append(f"NULL::VARCHAR AS {_raw(f)}")
        elif f.columns[entity] in ids:
            # Ids are integers: their canonical text, as user_key, is the vocabulary value.
            features.append(f'"id__{f.columns[entity]}"::VARCHAR AS {_raw(f)}')
        else:
            features.append(f'"v__{f.columns[entity]}" AS {_raw(f)}')
    lines = (
        f"SELECT row_number() OVER () - 1 AS line_no, coalesce(raw_line, '') AS raw_line "
        f"FROM read_csv({_sql_str(str(path))}, columns = {{'raw_line': 'VARCHAR'}}, "
        "header = false, delim = '\\x1f', quote = '', escape = '', auto_detect = false, "
        "strict_mode = false)"
    )
    fields = ", ".join(f"trim(f[{header.index(c) + 1}], ' ') AS \"v__{c}\"" for c in columns)
    parsed_ids = ", ".join(as_long(f'"v__{c}"') + f' AS "id__{c}"' for c in ids)
    return f"""
        SELECT {_sql_str(entity)} AS entity, line_no, raw_line, hash(raw_line) AS line_hash,
               CASE {" ".join(checks)} END AS reason,
               "id__{config.user_key}" AS user_key,
               try_cast({label} AS TINYINT) AS label,
               {", ".join(features)}
        FROM (SELECT *, {parsed_ids} FROM (
            SELECT line_no, raw_line, len(f) AS n_fields, {fields}
            FROM (SELECT *, string_split(raw_line, ',') AS f FROM ({lines}) WHERE line_no >= 1)))
    """


def _boundaries(con: duckdb.DuckDBPyConnection, config: DataConfig) -> dict[str, list[float]]:
    """Exact train quantiles at rank ceil(i/B * n), minus any equal to the train minimum."""
    result = {}
    for f in config.features:
        if f.kind != "bucketized":
            continue
        values = f"SELECT try_cast({_raw(f)} AS DOUBLE) AS v FROM ranked WHERE split = 'train'"
        n, lowest = con.execute(f"SELECT count(v), min(v) FROM ({values})").fetchone()
        ranks = sorted({math.ceil(i / f.buckets * n) for i in range(1, f.buckets)} if n else [])
        quantiles = [
            v
            for (v,) in con.execute(
                f"SELECT v FROM (SELECT v, row_number() OVER (ORDER BY v) AS r FROM ({values}) "
                f"WHERE v IS NOT NULL) WHERE r IN ({', '.join(map(str, ranks)) or 'NULL'})"
            ).fetchall()
        ]
        result[f.name] = sorted({float(q) for q in quantiles if q > lowest})
    return result


def _encoded_sql(config: DataConfig, boundaries: dict[str, list[float]]) -> str:
    joins, columns = [], []
    missing = ", ".join(_sql_str(token) for token in sorted(MISSING_TOKENS))
    for i, f in enumerate(config.features):
        raw = f"r.{_raw(f)}"
        applies = ", ".join(_sql_str(e) for e in f.columns)
        if f.kind == "categorical":
            on = f"v{i}.feature = {_sql_str(f.name)} AND v{i}.raw_value = {raw}"
            if f.per_entity_ids:
                on += f" AND v{i}.entity = r.entity"
            joins.append(f"LEFT JOIN vocab v{i} ON {on}")
            known = f"coalesce(v{i}.index, {OOV})"
        else:
            value = f"try_cast({raw} AS DOUBLE)"
            bucket = " + ".join(
                [str(FIRST_INDEX), *[f"({value} >= {b!r})::BIGINT" for b in boundaries[f.name]]]
            )
            known = f"CASE WHEN {value} IS NULL THEN {OOV} ELSE {bucket} END"
        columns.append(
            f"CASE WHEN r.entity NOT IN ({applies}) THEN {PAD} "
            f"WHEN {raw} IS NULL OR {raw} IN ({missing}) THEN {MISSING} "
            f"ELSE {known} END::BIGINT AS {f.name}"
        )
    return f"""
        SELECT r.entity, r.split, r.line_no, r.user_key, r.label, {", ".join(columns)},
               r.rows_before, r.likes_before, r.likes_train, r.likes_fit, r.history_likes
        FROM ranked r {" ".join(joins)}
    """


def _activity_join(entities: tuple[str, ...]) -> str:
    """Each user's rows and likes of every entity's train and train + valid blocks."""
    columns = ", ".join(
        f"count(*) FILTER (WHERE entity = {_sql_str(e)} AND {block}) AS rows_{name}__{e}, "
        f"coalesce(sum(label) FILTER (WHERE entity = {_sql_str(e)} AND {block}), 0) "
        f"AS likes_{name}__{e}"
        for e in entities
        for name, block in (("train", "split = 'train'"), ("fit", "split != 'test'"))
    )
    return (
        f"LEFT JOIN (SELECT user_key, {columns} FROM encoded GROUP BY user_key) activity "
        "ON activity.user_key = s.user_key"
    )


def _activity_sql(config: DataConfig, count: str, relation: str) -> str:
    """One activity feature: the count of the entity in `relation` to the row (its own or the
    other one) over the block of that entity's history the row sees."""

    def block(name: str) -> str:
        cases = " ".join(
            f"WHEN {_sql_str(e)} THEN activity.{count}_{name}__{partner}"
            for e in config.entity_names
            for partner in config.entity_names
            if (partner == e) == (relation == "own")
        )
        return f"coalesce(CASE s.entity {cases} END, 0)"

    if relation == "other":
        value = f"CASE WHEN s.split = 'test' THEN {block('fit')} ELSE {block('train')} END"
    elif config.history_mode == "online":
        value = f"s.{count}_before"
    else:
        value = (
            f"CASE s.split WHEN 'train' THEN s.{count}_before WHEN 'valid' THEN {block('train')} "
            f"ELSE {block('fit')} END"
        )
    bucket = " + ".join(
        [str(FIRST_INDEX), *[f"(({value}) >= {float(b)!r})::BIGINT" for b in ACTIVITY_BOUNDARIES]]
    )
    return f"({bucket})::BIGINT AS {activity_feature(count, relation)}"


def build_samples_duckdb(
    config_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    history_mode: str | None = None,
    seq_len: int | None = None,
    duplicates: str | None = None,
    activity: bool | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """Compute and write the samples, vocab and quarantine tables; return a summary dict."""
    started = time.monotonic()
    config = load_config(config_path).with_overrides(
        history_mode=history_mode, seq_len=seq_len, duplicates=duplicates, activity=activity
    )
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
    con.execute(f"SET temp_directory = {_sql_str(str(output_dir / '_duckdb_tmp'))}")
    con.execute(f"SET VARIABLE seq_len = {config.seq_len}")

    parts = []
    for e in config.entities:
        path = input_dir / e.file
        header = _read_header(path)
        config.check_header(e.name, header)
        parts.append(_parsed_sql(config, e.name, path, header))
    # Exact copies found by a 64-bit hash of the line, as the Spark job does; only a quarantined
    # line keeps its text (windowing and storing every line's text cost more than all the rest).
    con.execute(
        "CREATE TEMP TABLE parsed AS SELECT * EXCLUDE (line_hash) "
        "REPLACE (CASE WHEN reason IS NOT NULL THEN raw_line END AS raw_line), "
        "row_number() OVER (PARTITION BY entity, user_key, line_hash ORDER BY line_no) "
        "AS occurrence FROM (" + " UNION ALL ".join(parts) + ")"
    )

    keep = "reason IS NULL" + (" AND occurrence = 1" if config.duplicates == "drop" else "")
    n_test = f"floor(n * {config.test_fraction!r} + 0.5)"
    n_fit = f"(n - {n_test})"
    n_train = f"({n_fit} - floor({n_fit} * {config.valid_fraction!r} + 0.5))"
    if config.history_mode == "online":
        history = "likes_before"
    else:
        history = (
            "CASE split WHEN 'train' THEN likes_before WHEN 'valid' THEN likes_train "
            "ELSE likes_fit END"
        )
    raw_columns = ", ".join(_raw(f) for f in config.features)
    con.execute(f"""
        CREATE TEMP TABLE ranked AS
        WITH counted AS (
            SELECT entity, line_no, user_key, label, {raw_columns},
                   row_number() OVER w AS rank,
                   count(*) OVER (PARTITION BY entity, user_key) AS n,
                   coalesce(sum(label) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                            0) AS likes_before
            FROM parsed WHERE {keep}
            WINDOW w AS (PARTITION BY entity, user_key ORDER BY line_no)
        ), split AS (
            SELECT * EXCLUDE (rank, n), rank - 1 AS rows_before,
                   CASE WHEN rank <= {n_train} THEN 'train' WHEN rank <= {n_fit} THEN 'valid'
                        ELSE 'test' END AS split
            FROM counted
        ), fit AS (
            SELECT *,
                   sum(CASE WHEN split = 'train' THEN label ELSE 0 END)
                       OVER (PARTITION BY entity, user_key) AS likes_train,
                   sum(CASE WHEN split != 'test' THEN label ELSE 0 END)
                       OVER (PARTITION BY entity, user_key) AS likes_fit
            FROM split
        )
        SELECT *, ({history})::BIGINT AS history_likes FROM fit
    """)

    counts = []
    for f in config.features:
        if f.kind != "categorical":
            continue
        for entity in f.columns:
            scope = _sql_str(entity) if f.per_entity_ids else "NULL::VARCHAR"
            counts.append(
                f"SELECT {_sql_str(f.name)} AS feature, {scope} AS entity, "
                f"{_raw(f)} AS raw_value FROM ranked WHERE split = 'train' "
                f"AND entity = {_sql_str(entity)}"
            )
    # A value on fewer train rows than its feature's min_count has no index: OOV.
    min_counts = " ".join(
        f"WHEN {_sql_str(f.name)} THEN {f.min_count}"
        for f in config.features
        if f.kind == "categorical"
    )
    con.execute(f"""
        CREATE TEMP TABLE vocab AS
        SELECT feature, entity, raw_value,
               (row_number() OVER (PARTITION BY feature
                   ORDER BY count DESC, entity ASC NULLS FIRST, raw_value) + {FIRST_INDEX - 1}
               )::BIGINT AS index,
               count
        FROM (SELECT feature, entity, raw_value, count(*)::BIGINT AS count
              FROM ({" UNION ALL ".join(counts)})
              WHERE raw_value IS NOT NULL AND raw_value NOT IN ('\\N', '')
              GROUP BY ALL)
        WHERE count >= CASE feature {min_counts} END
    """)
    boundaries = _boundaries(con, config)
    con.execute(f"CREATE TEMP TABLE encoded AS {_encoded_sql(config, boundaries)}")
    bucket_rows = []
    for f in config.features:
        if f.kind != "bucketized":
            continue
        per_bucket = dict(
            con.execute(
                f"SELECT {f.name}, count(*) FROM encoded WHERE split = 'train' GROUP BY 1"
            ).fetchall()
        )
        for i, lower in enumerate([float("-inf"), *boundaries[f.name]]):
            index = FIRST_INDEX + i
            bucket_rows.append((f.name, None, repr(lower), index, per_bucket.get(index, 0)))
    if bucket_rows:
        con.executemany("INSERT INTO vocab VALUES (?, ?, ?, ?, ?)", bucket_rows)

    item, entities = config.item_feature, config.entity_names

    def block_end(block: str) -> str:
        # Each entity's items at the user's like that ends `block` (train, or train + valid).
        columns = ", ".join(
            f"any_value(items) FILTER (WHERE entity = {_sql_str(e)}) AS {block}__{e}"
            for e in entities
        )
        return (
            f"(SELECT user_key, {columns} FROM snapshots WHERE like_no = likes_{block} "
            f"GROUP BY user_key) {block} ON {block}.user_key = s.user_key"
        )

    sequences = []
    for e in entities:
        other = f"CASE WHEN s.split = 'test' THEN fit.fit__{e} ELSE train.train__{e} END"
        items = f"coalesce(CASE WHEN s.entity = {_sql_str(e)} THEN own.items ELSE {other} END, [])"
        sequences += [
            f"list_resize(list_reverse({items}), {config.seq_len}, 0)::BIGINT[] AS seq_{e}",
            f"len({items})::BIGINT AS seq_{e}_len",
        ]
    features = ", ".join(f"s.{f.name}" for f in config.features)
    if config.activity:
        features += ", " + ", ".join(
            _activity_sql(config, count, relation)
            for relation in ACTIVITY_RELATIONS
            for count in ACTIVITY_COUNTS
        )
    con.execute(f"""
        CREATE TEMP TABLE snapshots AS
        SELECT entity, user_key, likes_before + 1 AS like_no, likes_train, likes_fit,
               list({item}) OVER (PARTITION BY entity, user_key ORDER BY line_no
                                  ROWS BETWEEN {config.seq_len - 1} PRECEDING AND CURRENT ROW)
                   AS items
        FROM encoded WHERE label = 1
    """)
    samples = f"""
        SELECT s.entity, s.split, s.line_no, s.user_key, s.label, {features}, {", ".join(sequences)}
        FROM encoded s
        LEFT JOIN snapshots own ON own.entity = s.entity AND own.user_key = s.user_key
                               AND own.like_no = s.history_likes
        LEFT JOIN {block_end("train")}
        LEFT JOIN {block_end("fit")}
        {_activity_join(entities) if config.activity else ""}
    """
    con.execute(
        f"COPY ({samples}) TO {_sql_str(str(output_dir / 'samples'))} "
        "(FORMAT parquet, PARTITION_BY (entity, split), OVERWRITE_OR_IGNORE)"
    )
    con.execute(f"COPY vocab TO {_sql_str(str(output_dir / 'vocab.parquet'))} (FORMAT parquet)")
    con.execute(
        "COPY (SELECT entity, line_no, raw_line, reason FROM parsed WHERE reason IS NOT NULL) "
        f"TO {_sql_str(str(output_dir / 'quarantine.parquet'))} (FORMAT parquet)"
    )
    summary = _summary(con, config)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    con.close()
    return summary


def _summary(con: duckdb.DuckDBPyConnection, config: DataConfig) -> dict[str, Any]:
    """Per entity: input lines = samples + quarantined + removed duplicates (checked)."""
    entities = {}
    for e in config.entity_names:
        lines, quarantined, found = con.execute(
            "SELECT count(*), count(reason), count(*) FILTER (reason IS NULL AND occurrence > 1) "
            "FROM parsed WHERE entity = ?",
            [e],
        ).fetchone()
        splits = dict(
            con.execute(
                "SELECT split, count(*) FROM encoded WHERE entity = ? GROUP BY split", [e]
            ).fetchall()
        )
        removed = found if config.duplicates == "drop" else 0
        samples = sum(splits.values())
        if lines != samples + quarantined + removed:
            raise RuntimeError(
                f"{e}: {lines} input lines != {samples} samples + {quarantined} quarantined "
                f"+ {removed} removed duplicates"
            )
        entities[e] = {
            "input_lines": lines,
            "samples": samples,
            "quarantined": quarantined,
            "duplicates_found": found,
            "duplicates_removed": removed,
            "splits": {s: splits.get(s, 0) for s in SPLITS},
        }
    return {"history_mode": config.history_mode, "seq_len": config.seq_len, "entities": entities}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--history-mode", choices=("frozen", "online"))
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--duplicates", choices=("keep", "drop"))
    parser.add_argument("--activity", action="store_true", default=None)
    parser.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")
    parser.add_argument("--memory-limit", help="DuckDB memory_limit, e.g. 6GB")
    args = parser.parse_args(argv)
    summary = build_samples_duckdb(
        args.config,
        args.input,
        args.output,
        history_mode=args.history_mode,
        seq_len=args.seq_len,
        duplicates=args.duplicates,
        activity=args.activity,
        threads=args.threads,
        memory_limit=args.memory_limit,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
