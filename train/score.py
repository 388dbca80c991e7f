"""Score a Delta table with a serving artifact on Ray; write `entity, line_no, score, error`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python train/score.py --artifact ARTIFACT --input OUT_DIR/samples --output SCORES \\
        [--kind samples|raw] [--split test] [--workers 2] [--cpus-per-worker 1]

`--kind samples` (default) reads rows of the ETL's samples table (indices); `--kind raw`
reads raw requests: one column per raw field, `recent_likes` as a struct of one list of raw
item ids per entity, and `line_no`. Only the artifact's target entity is scored (when the
table has an `entity` column, other entities' rows are not read).

The driver reads and checks the artifact once and hands its bytes to the workers, so they
need no shared file system. A table the artifact cannot read (a column missing or of the
wrong type) fails at once with exit status 2; a bad row is written with a null `score` and
its reason in `error`, and counted in the summary the job prints. Beyond those checks, a batch
whose scoring raises anyway is scored again row by row: the rows that still fail are written
like other bad rows, with `error` = `scoring failed: <exception type>: <message>`, and the
batch's other rows are scored (one bad row never fails the job). Without a cluster address
(`--ray-address` or RAY_ADDRESS) it starts a local Ray on 127.0.0.1. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from mkt.serving import RECENT_LIKES, Artifact, ArtifactError, ScoreResult, read_artifact_files
from train.cluster import ray_session

KINDS = ("samples", "raw")
ENTITY, LINE_NO, SPLIT = "entity", "line_no", "split"
OUTPUT_SCHEMA = pa.schema(
    [(ENTITY, pa.string()), (LINE_NO, pa.int64()), ("score", pa.float64()), ("error", pa.string())]
)


log = logging.getLogger(__name__)
SCORING_FAILED = "scoring failed"


class ScoreInputError(ValueError):
    """The input table cannot be scored at all; the message names the column."""


class BatchScorer:
    """Ray Data actor: loads the artifact from its bytes once, then scores batches."""

    def __init__(self, files: Mapping[str, bytes], kind: str, torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.artifact = Artifact.from_files(files)
        self.kind = kind

    def _score(self, batch: pa.Table) -> ScoreResult:
        if self.kind == "samples":
            return self.artifact.score_samples(batch)
        return self.artifact.score(batch)

    def _score_rows(self, batch: pa.Table) -> ScoreResult:
        """One row at a time: a row whose scoring raises gets the exception as its error."""
        scores = np.full(batch.num_rows, np.nan)
        errors: dict[int, str] = {}
        for i in range(batch.num_rows):
            try:
                one = self._score(batch.slice(i, 1))
            except Exception as e:  # any failure is the row's, kept and counted
                # One line, no "; " (the summary splits reasons on it).
                text = " ".join(str(e).split()).replace("; ", ", ")
                errors[i] = f"{SCORING_FAILED}: {type(e).__name__}: {text}"
                continue
            scores[i] = one.scores[0]
            if 0 in one.errors:
                errors[i] = one.errors[0]
        return ScoreResult(scores, errors)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            result = self._score(batch)
        except Exception as e:  # never fail the batch: retry its rows alone
            log.warning(
                "scoring a batch of %d rows raised %s: %s; scoring its rows one by one",
                batch.num_rows,
                type(e).__name__,
                e,
            )
            result = self._score_rows(batch)
        n = batch.num_rows
        errors = [result.errors.get(i) for i in range(n)]
        return pa.table(
            {
                ENTITY: pa.array([self.artifact.interface.target_entity] * n, pa.string()),
                LINE_NO: batch.column(LINE_NO).cast(pa.int64()),
                "score": pa.array(result.scores, pa.float64(), mask=~result.ok),
                "error": pa.array(errors, pa.string()),
            },
            schema=OUTPUT_SCHEMA,
        )


def input_columns(table_schema: pa.Schema, artifact: Artifact, kind: str) -> list[str]:
    """The columns to read; raises ScoreInputError for a table no row of which could be
    scored (a column missing, or of a type the artifact cannot take)."""
    interface = artifact.interface
    names = set(table_schema.names)
    if kind == "samples":
        needed = [*interface.scalars, *interface.sequences]
    else:
        needed = [*artifact.requests.fields, RECENT_LIKES]
    missing = [c for c in [LINE_NO, *needed] if c not in names]
    if missing:
        raise ScoreInputError(f"input table lacks columns {missing} (--kind {kind})")
    if not pa.types.is_integer(table_schema.field(LINE_NO).type):
        raise ScoreInputError(f"column {LINE_NO!r} is {table_schema.field(LINE_NO).type}")
    if kind == "samples":
        for name in interface.scalars:
            if not pa.types.is_integer(table_schema.field(name).type):
                raise ScoreInputError(f"column {name!r} is {table_schema.field(name).type}")
        for name in interface.sequences:
            kind_of = table_schema.field(name).type
            if not (pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of)) or not (
                pa.types.is_integer(kind_of.value_type)
            ):
                raise ScoreInputError(f"column {name!r} is {kind_of}, not a list of integers")
    elif not pa.types.is_struct(table_schema.field(RECENT_LIKES).type):
        raise ScoreInputError(
            f"column {RECENT_LIKES!r} is {table_schema.field(RECENT_LIKES).type}; expected a "
            "struct with one list of item ids per entity"
        )
    return [LINE_NO, *needed, *([ENTITY] if ENTITY in names else [])]


def summarize(output: str) -> dict[str, Any]:
    """Rows written, scored and rejected, and rejected rows by the field at fault."""
    errors = DeltaTable(output).to_pyarrow_dataset().to_table(columns=["error"]).column("error")
    rejected = errors.filter(pc.is_valid(errors)).to_pylist()
    by_field: Counter[str] = Counter()
    for text in rejected:
        by_field.update({part.split(":")[0] for part in text.split("; ")})
    return {
        "rows": len(errors),
        "scored": len(errors) - len(rejected),
        "rejected": len(rejected),
        "rejected_by_field": dict(sorted(by_field.items())),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, help="directory written by train/export.py")
    parser.add_argument("--input", required=True, help="Delta table to score")
    parser.add_argument("--output", required=True, help="Delta table to write (overwritten)")
    parser.add_argument("--kind", choices=KINDS, default="samples", help="what the rows hold")
    parser.add_argument("--split", help="samples kind: only rows of this split")
    parser.add_argument("--workers", type=int, default=2, help="scoring actors")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--torch-threads", type=int, default=1, help="per actor")
    parser.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, else local)")
    # More logical CPUs than a 2-core machine has, as for training (conf/run/default.yaml):
    # scoring actors that take every CPU leave Ray Data's read tasks none, and the job hangs.
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of a local Ray")
    args = parser.parse_args(argv)
    if args.split and args.kind != "samples":
        parser.error("--split applies to --kind samples only")
    for name in ("workers", "batch_size", "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cpus_per_worker <= 0:
        parser.error("--cpus-per-worker must be > 0")
    return args


def score_table(args: argparse.Namespace) -> dict[str, Any]:
    files = read_artifact_files(args.artifact)
    artifact = Artifact.from_files(files, origin=args.artifact)
    try:
        table = DeltaTable(args.input)
    except TableNotFoundError as e:
        raise ScoreInputError(f"--input {args.input}: not a Delta table ({e})") from e
    table_schema = pa.schema(table.schema().to_arrow())
    columns = input_columns(table_schema, artifact, args.kind)
    if args.split and SPLIT not in table_schema.names:
        raise ScoreInputError(f"--split {args.split}: the input table has no {SPLIT!r} column")

    with ray_session({"ray": {"address": args.ray_address, "num_cpus": args.num_cpus}}):
        # Imported only now: Ray's environment is set before Ray is first imported.
        import ray
        from ray.data import ActorPoolStrategy, SaveMode
        from ray.data.expressions import col

        print(
            f"[score] {args.input} ({args.kind}{f', split {args.split}' if args.split else ''}) "
            f"with {args.artifact}, {args.workers} actor(s) x {args.cpus_per_worker} CPU, into "
            f"{args.output}",
            flush=True,
        )
        read = [*columns, *([SPLIT] if args.split else [])]
        rows = ray.data.read_delta(args.input, columns=read)
        if ENTITY in columns:
            rows = rows.filter(expr=col(ENTITY) == artifact.interface.target_entity)
        if args.split:
            rows = rows.filter(expr=col(SPLIT) == args.split)
        scored = rows.map_batches(
            BatchScorer,
            fn_constructor_kwargs={
                "files": files,
                "kind": args.kind,
                "torch_threads": args.torch_threads,
            },
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=args.workers),
            num_cpus=args.cpus_per_worker,
        )
        scored.write_delta(args.output, mode=SaveMode.OVERWRITE)
    summary = {
        "artifact": artifact.manifest["run"].get("run_id"),
        "input": args.input,
        "output": args.output,
        **summarize(args.output),
    }
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = score_table(args)
    except (ArtifactError, ScoreInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Bad rows are the data's fault and do not fail the job; every row failing inside the
    # model is the artifact's or the installation's, and must not look like a success.
    if summary["rows"] and summary["rejected_by_field"].get(SCORING_FAILED) == summary["rows"]:
        print(
            f"error: scoring raised on every one of the {summary['rows']} rows (see `error` in "
            f"{args.output}): the artifact or its runtime is broken, not the input",
            file=sys.stderr,
        )
        return 1
    return 0


def cli() -> None:
    """The command line, also installed as `mkt-score` (pyproject.toml)."""
    status = main()
    # Everything is written and printed by now. Leave without finalizing the interpreter:
    # pyarrow dataset readahead left by the Delta reads in this process can abort (SIGABRT)
    # in its destructors during finalization, seen as exit status -6 after a complete run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    cli()
