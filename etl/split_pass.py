"""Phase 3 of the ETL (etl/build_samples.py), as one Arrow pass per group of users: exact
duplicates, each user's split, the summary's counts, the train counts of the categorical
features, and the group's kept rows staged for phase 5.

Spark hands each task every line of one group of users (the shuffle's groups, which become the
samples files), parsed and ordered by (user, entity, line). Per (user, entity) in line order,
with n kept rows: n_test = floor(test_fraction * n + 0.5) last rows are test, of n_fit = n -
n_test the last floor(valid_fraction * n_fit + 0.5) are valid, the rest train (docs/etl.md,
"Split"). The task writes the group's kept rows, with their split, to one Arrow file under the
run's staging directory (phase 5 reads it back, once), and returns to Spark only what the
driver's aggregations need: the quarantined lines, per-group counts for the summary and the
vocabularies, and the train rows' bucketized values (Spark's `percentile_approx` gives the
bucket boundaries, as before). At 5M raw rows Spark's sort, window and cache took 22.5 CPU s
and the summary's jobs 3.9; this pass takes about 7 of Python, the hand-over of the rows to it
more of the JVM's (docs/BENCHMARKS.md, "Stop 37").

Runs in Spark's Python workers and computes with numpy and pyarrow: no Spark API here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs

from etl import spark_hash
from etl.config import DataConfig
from etl.raw_lines import _raw
from etl.samples_pass import (
    GROUP,
    bucketized,
    categorical_values,
    number_column,
    staged_file,
)
from mkt.contract import SPLITS

# What each returned row is (the `kind` column); the other kinds' columns are null.
QUARANTINED, TRAIN_COUNT, TRAIN_VALUES, STAT = 0, 1, 2, 3
# A summary count's name: "rows|<entity>|<split>", "likes|..", "users|..",
# "duplicates|<entity>", "reason|<entity>|<text before ':'>", "overlap|<entities joined by +>".
STAT_SEPARATOR = "|"


def output_schema(config: DataConfig) -> pa.Schema:
    """The rows the pass returns to Spark, all kinds in one schema."""
    return pa.schema(
        [
            ("kind", pa.int8()),
            # QUARANTINED
            ("entity", pa.string()),
            ("line_no", pa.int64()),
            ("raw_line", pa.string()),
            ("reason", pa.string()),
            # TRAIN_COUNT: (feature ordinal, entity ordinal of a per-entity id space or null,
            # the value as a number or as text, train rows)
            ("f", pa.int32()),
            ("e", pa.int32()),
            ("number", pa.int64()),
            ("text", pa.string()),
            ("count", pa.int64()),
            # TRAIN_VALUES: the bucketized features' parsed values (null: missing or not a
            # number), named as the raw columns, which is what the boundaries are taken of
            *[(_raw(f), pa.float64()) for f in config.features if f.kind == "bucketized"],
            # STAT (its count in `count`)
            ("name", pa.string()),
        ]
    )


@dataclass(frozen=True)
class SplitPass:
    """What every task needs; pickled once into the job's closure."""

    config: DataConfig
    staging_uri: str

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        lines = self._in_order(pa.Table.from_batches(list(batches)))
        if lines.num_rows == 0:
            return
        schema = output_schema(self.config)
        good = lines.column("reason").is_null().to_numpy(zero_copy_only=False)
        bad = lines.filter(pa.array(~good))
        names = np.array(self.config.entity_names, object)
        parts = [
            {
                "kind": QUARANTINED,
                "entity": pa.array(names[bad.column("entity").to_numpy()], pa.string()),
                **{c: bad.column(c) for c in ("line_no", "raw_line", "reason")},
            }
        ]
        stats = self._reason_stats(bad)
        group = lines.column(GROUP)[0].as_py()
        kept, found = self._kept(lines.filter(pa.array(good)))
        del lines  # a worker holds the group's lines once, not twice
        stats.update(found)
        split = self._split(kept)
        stats.update(self._summary_stats(kept, split))
        parts.append({"kind": STAT, "name": list(stats), "count": list(stats.values())})
        train = kept.filter(pa.array(split == 0))
        parts += self._train_counts(train)
        parts.append(self._train_values(train))
        del train
        self._stage(kept, split, group)
        del kept
        for part in parts:
            table = _table(part, schema)
            if table.num_rows:
                yield from table.to_batches()

    def _in_order(self, lines: pa.Table) -> pa.Table:
        """The group's lines ordered by (user, entity, line), the user as Spark orders the
        shuffle's keys: its xxhash64, then the id (null first); the entities by name. The
        order of the users decides the order of the train values that `percentile_approx`
        sketches, hence the bucket boundaries: it is the order the job has always used."""
        if lines.num_rows == 0:
            return lines
        user_key = lines.column("user_key")
        valid = user_key.is_valid().to_numpy(zero_copy_only=False)
        key = user_key.fill_null(np.iinfo(np.int64).min).to_numpy()
        seed = np.full(len(key), spark_hash.SEED)
        user_hash = spark_hash.signed(spark_hash.hash_long(key, seed, valid))
        by_name = np.argsort(np.argsort(np.array(self.config.entity_names)))
        entity = by_name[lines.column("entity").to_numpy()]
        order = np.lexsort((lines.column("line_no").to_numpy(), entity, key, user_hash))
        return lines.take(pa.array(order))

    def _kept(self, good: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        """The good lines minus removed duplicates, and the exact duplicates found per entity:
        lines of one user and entity with the same text hash, after the first."""
        entities = self.config.entity_names
        block = _blocks(good)
        line_hash = good.column("line_hash").to_numpy()
        # Sorted by (block, hash, line): a copy is a row whose block and hash equal the
        # previous row's; the first of each run is the earliest line.
        order = np.lexsort((good.column("line_no").to_numpy(), line_hash, block))
        copy = np.zeros(len(order), bool)
        copy[1:] = (block[order][1:] == block[order][:-1]) & (
            line_hash[order][1:] == line_hash[order][:-1]
        )
        is_copy = np.zeros(len(order), bool)
        is_copy[order] = copy
        entity = good.column("entity").to_numpy()
        found = {
            f"duplicates{STAT_SEPARATOR}{e}": int(is_copy[entity == i].sum())
            for i, e in enumerate(entities)
        }
        if self.config.duplicates == "drop":
            good = good.filter(pa.array(~is_copy))
        return good, found

    def _split(self, kept: pa.Table) -> np.ndarray:
        """Each kept row's split code (index in SPLITS), per (user, entity) in line order."""
        block = _blocks(kept)
        start = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
        n = np.diff(np.r_[start, len(block)])[block]
        rank = np.arange(len(block)) - start[block] + 1
        n_test = np.floor(n * self.config.test_fraction + 0.5)
        n_fit = n - n_test
        n_train = n_fit - np.floor(n_fit * self.config.valid_fraction + 0.5)
        return np.where(rank <= n_train, 0, np.where(rank <= n_fit, 1, 2)).astype(np.int8)

    def _reason_stats(self, bad: pa.Table) -> dict[str, int]:
        """Quarantined lines per entity and kind of reason (the text before ':')."""
        if bad.num_rows == 0:
            return {}
        kind = pc.list_element(pc.split_pattern(bad.column("reason"), ":", max_splits=1), 0)
        counted = (
            pa.table({"entity": bad.column("entity"), "kind": kind})
            .group_by(["entity", "kind"])
            .aggregate([([], "count_all")])
        )
        names = self.config.entity_names
        return {
            STAT_SEPARATOR.join(("reason", names[e], k)): n
            for e, k, n in zip(
                *(counted.column(c).to_pylist() for c in ("entity", "kind", "count_all")),
                strict=True,
            )
        }

    def _summary_stats(self, kept: pa.Table, split: np.ndarray) -> dict[str, int]:
        """Rows, likes and users per (entity, split); users per set of entities they have rows
        in. Sums over the groups give the job's summary (a user is in one group)."""
        entities = self.config.entity_names
        stats: dict[str, int] = {}
        if kept.num_rows == 0:
            return stats
        entity = kept.column("entity").to_numpy()
        user_key = kept.column("user_key").to_numpy()
        new_user = np.r_[True, user_key[1:] != user_key[:-1]]
        user = np.cumsum(new_user) - 1
        label = kept.column("label").to_numpy(zero_copy_only=False)
        present = np.zeros((user[-1] + 1, len(entities)), bool)
        present[user, entity] = True
        for i, e in enumerate(entities):
            for s, name in enumerate(SPLITS):
                chosen = (entity == i) & (split == s)
                key = f"{e}{STAT_SEPARATOR}{name}"
                stats[f"rows{STAT_SEPARATOR}{key}"] = int(chosen.sum())
                stats[f"likes{STAT_SEPARATOR}{key}"] = int(label[chosen].sum())
                stats[f"users{STAT_SEPARATOR}{key}"] = len(np.unique(user[chosen]))
        sets, users = np.unique(present, axis=0, return_counts=True)
        for members, count in zip(sets, users, strict=True):
            names = "+".join(sorted(e for e, m in zip(entities, members, strict=True) if m))
            stats[f"overlap{STAT_SEPARATOR}{names}"] = int(count)
        return stats

    def _train_counts(self, train: pa.Table) -> list[dict[str, object]]:
        """Per categorical feature, its train rows per (entity of a per-entity id space, value),
        for Spark to sum over the groups."""
        config = self.config
        entities = config.entity_names
        names = [f.name for f in config.features]
        entity = train.column("entity").to_numpy()
        parts = []
        for f in config.features:
            if f.kind != "categorical":
                continue
            column = categorical_values(train, f)
            numeric = pa.types.is_integer(column.type)
            scopes = (
                [(i, entity == i) for i, e in enumerate(entities) if e in f.columns]
                if f.per_entity_ids
                else [(None, np.isin(entity, [entities.index(e) for e in f.columns]))]
            )
            for scope, mask in scopes:
                values = column.filter(pa.array(mask)).drop_null()
                if len(values) == 0:
                    continue
                counted = pc.value_counts(values)
                distinct = counted.field("values")
                parts.append(
                    {
                        "kind": TRAIN_COUNT,
                        "f": [names.index(f.name)] * len(distinct),
                        "e": [scope] * len(distinct),
                        "number" if numeric else "text": distinct,
                        "count": counted.field("counts"),
                    }
                )
        return parts

    def _train_values(self, train: pa.Table) -> dict[str, object]:
        """The train rows' bucketized values, of the entities they apply to, in row order."""
        features = bucketized(self.config)
        if not features:
            return {"kind": TRAIN_VALUES}
        entities = self.config.entity_names
        applies = sorted({entities.index(e) for f in features for e in f.columns})
        rows = train.filter(pa.array(np.isin(train.column("entity").to_numpy(), applies)))
        return {
            "kind": TRAIN_VALUES,
            **{_raw(f): rows.column(number_column(f)) for f in features},
        }

    def _stage(self, kept: pa.Table, split: np.ndarray, group: int) -> None:
        """The group's kept rows, with their split code, for phase 5 (etl/samples_pass.py)."""
        # What only this pass reads stays behind.
        table = kept.drop_columns(["reason", "raw_line", "line_hash", GROUP]).append_column(
            "split", pa.array(split)
        )
        filesystem, path = pafs.FileSystem.from_uri(staged_file(self.staging_uri, group))
        with (
            filesystem.open_output_stream(path) as sink,
            pa.ipc.new_file(sink, table.schema) as out,
        ):
            out.write_table(table)


def _blocks(rows: pa.Table) -> np.ndarray:
    """Each row's (user, entity) block, numbered in row order (rows sorted by user, entity)."""
    user_key = rows.column("user_key").to_numpy(zero_copy_only=False)
    entity = rows.column("entity").to_numpy()
    new = np.ones(len(user_key), bool)
    new[1:] = (user_key[1:] != user_key[:-1]) | (entity[1:] != entity[:-1])
    return np.cumsum(new) - 1


def _table(part: dict[str, object], schema: pa.Schema) -> pa.Table:
    """One kind's rows in the output schema, the other columns null."""
    length = max((len(v) for k, v in part.items() if k != "kind"), default=0)
    arrays = []
    for field in schema:
        if field.name == "kind":
            arrays.append(pa.array(np.full(length, part["kind"], np.int8)))
        elif field.name in part:
            value = part[field.name]
            if isinstance(value, pa.ChunkedArray):
                value = value.combine_chunks()
            arrays.append(
                pa.array(value, field.type) if isinstance(value, list) else value.cast(field.type)
            )
        else:
            arrays.append(pa.nulls(length, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
