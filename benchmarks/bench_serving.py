"""Serving speed on one CPU core: the artifact against the training model in eager mode.

    python benchmarks/bench_serving.py --run RUN_DIR [--artifact DIR] [--requests 2000]
                                 [--seconds 2] [--output runs/bench_serving.json]

Rows: the target entity's test rows of the run's samples. The artifact gets them as raw
requests, made by decoding each samples row through the vocabularies (index -> raw value,
bucket -> its lower bound, missing -> `\\N`, OOV -> an unseen value); the job first checks
that the artifact encodes every request back to exactly the samples row. The eager model
(the run's final model rebuilt from its checkpoints, `torch.no_grad`) gets the samples rows
through `mkt.features.to_tensors`, as the trainer feeds it.

Measured in one run, pinned to one core with one torch thread:
- single-request latency (p50, p99) over `--requests` requests, one row each;
- throughput (rows/s) at batch sizes 1, 64 and 1024, each for about `--seconds`;
for the artifact end to end (raw values -> checks -> encoding -> graph), the artifact's graph
alone (packed indices -> probability) and the eager model, with the ratios artifact / eager.
docs/serving.md records the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deltalake import DeltaTable

from mkt.contract import MISSING, OOV
from mkt.features import to_tensors
from mkt.schema import FeatureSchema
from mkt.serving import RECENT_LIKES, Artifact
from train.checkpoints import build_chain
from train.export import export_run, final_chain, read_run

BATCH_SIZES = (1, 64, 1024)
UNSEEN = "\u2400unseen"  # no vocabulary holds it


def decoder(schema: FeatureSchema, vocab: Any) -> Callable[[str, int, str], Any]:
    """(feature, index, entity) -> a raw value that the ETL's rules encode back to index."""
    raw: dict[tuple[str, str | None, int], str] = {}
    for f, e, value, i in zip(
        *(vocab.column(c).to_pylist() for c in ("feature", "entity", "raw_value", "index")),
        strict=True,
    ):
        raw[(f, e, i)] = value

    def decode(feature: str, index: int, entity: str) -> Any:
        f = schema.feature(feature)
        if index == MISSING:
            return "\\N"
        if index == OOV:
            return UNSEEN
        if f.kind == "bucketized":
            return "-inf" if index == 3 else repr(f.boundaries[index - 4])
        return raw.get((feature, None, index), raw.get((feature, entity, index)))

    return decode


def requests_from_samples(artifact: Artifact, rows: dict[str, np.ndarray], vocab: Any) -> list:
    schema = artifact.schema
    decode = decoder(schema, vocab)
    target = schema.target_entity
    out = []
    for r in range(len(rows["line_no"])):
        request: dict[str, Any] = {
            name: decode(name, int(rows[name][r]), target) for name in artifact.requests.fields
        }
        likes = {}
        for f in schema.sequences:
            length = int(rows[f.length_column][r])
            items = rows[f.name][r][:length]
            likes[f.entity] = [decode(schema.item_feature, int(i), f.entity) for i in items]
        request[RECENT_LIKES] = likes
        out.append(request)
    return out


def pin_one_core() -> str:
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # set already in this process
        torch.set_num_interop_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "unpinned (no sched_setaffinity)"


Runner = Callable[[int, int], Any]  # (first row, rows) -> scores


def latencies_us(runners: dict[str, Runner], rows: int, n: int) -> dict[str, np.ndarray]:
    """One request at a time, the runners taking turns on the same request, so that a busy
    machine slows them alike."""
    times = {name: np.empty(n) for name in runners}
    for i in range(-min(n, 50), n):  # the first calls warm up
        for name, run in runners.items():
            start = time.perf_counter()
            run(i % rows, 1)
            if i >= 0:
                times[name][i] = time.perf_counter() - start
    return {name: t * 1e6 for name, t in times.items()}


def rows_per_second(runners: dict[str, Runner], rows: int, batch: int, seconds: float) -> dict:
    """Batches of `batch` rows, the runners taking turns (2048 rows each per turn), until
    each has run for about `seconds`."""
    calls = max(1, 2048 // batch)
    spent = dict.fromkeys(runners, 0.0)
    for run in runners.values():
        run(0, batch)
    turns = 0
    while min(spent.values()) < seconds:
        for name, run in runners.items():
            start = time.perf_counter()
            for c in range(calls):
                run(((turns * calls + c) * batch) % (rows - batch + 1), batch)
            spent[name] += time.perf_counter() - start
        turns += 1
    return {name: turns * calls * batch / t for name, t in spent.items()}


def bench(run_dir: Path, artifact_dir: Path | None, n_requests: int, seconds: float) -> dict:
    config, metrics = read_run(run_dir)
    samples_dir = Path(config["invocation"]["samples"])
    schema = FeatureSchema.load(samples_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if artifact_dir is None:
            artifact_dir = Path(tmp) / "artifact"
            export_run(run_dir, artifact_dir)
        artifact = Artifact.load(artifact_dir)
    model = build_chain(schema, final_chain(config, metrics, run_dir)).eval()
    interface = artifact.interface
    columns = [*schema.index_columns, *interface.sequences, "entity", "line_no"]
    table = DeltaTable(str(samples_dir / "samples")).to_pyarrow_table(
        columns=columns,
        filters=[("entity", "=", schema.target_entity), ("split", "=", "test")],
    )
    # Enough rows for the largest batch: the test rows, repeated.
    repeats = -(-max(BATCH_SIZES) // table.num_rows)
    rows = {
        c: np.concatenate([table.column(c).to_numpy(zero_copy_only=False)] * repeats)
        for c in columns
    }
    vocab = DeltaTable(str(samples_dir / "vocab")).to_pyarrow_table()
    requests = requests_from_samples(artifact, rows, vocab)
    packed = artifact.encode(requests)
    expected = np.stack([rows[c] for c in interface.scalars], axis=1)
    if packed.errors or not np.array_equal(packed.scalars, expected):
        raise RuntimeError("decoded requests do not encode back to the samples rows")
    scalars, sequences = torch.from_numpy(packed.scalars), torch.from_numpy(packed.sequences)

    def end_to_end(start: int, size: int) -> None:
        artifact.score(requests[start : start + size])

    def graph(start: int, size: int) -> None:
        artifact.run_graph(scalars[start : start + size], sequences[start : start + size])

    def eager(start: int, size: int) -> None:
        part = {k: v[start : start + size] for k, v in rows.items()}
        with torch.no_grad():
            torch.sigmoid(model(to_tensors(schema, part))["logit"])

    n = len(requests)
    runners = {"artifact": end_to_end, "artifact_graph": graph, "eager": eager}
    result: dict[str, Any] = {"rows_available": n}
    result["latency_us"] = {
        name: {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99))}
        for name, t in latencies_us(runners, n, n_requests).items()
    }
    by_batch = {b: rows_per_second(runners, n, b, seconds) for b in BATCH_SIZES}
    result["rows_per_s"] = {
        name: {str(b): by_batch[b][name] for b in BATCH_SIZES} for name in runners
    }
    latency, rate = result["latency_us"], result["rows_per_s"]
    result["artifact_over_eager"] = {
        "latency_p50": latency["artifact"]["p50"] / latency["eager"]["p50"],
        "latency_p99": latency["artifact"]["p99"] / latency["eager"]["p99"],
        **{
            f"rows_per_s_batch_{b}": rate["artifact"][str(b)] / rate["eager"][str(b)]
            for b in BATCH_SIZES
        },
    }
    result["artifact_bytes"] = artifact.manifest["total_bytes"]
    result["run_id"] = artifact.manifest["run"].get("run_id")
    return result


def markdown(result: dict) -> str:
    lines = [
        "| | p50 latency (µs) | p99 latency (µs) | "
        + " | ".join(f"rows/s, batch {b}" for b in BATCH_SIZES)
        + " |",
        "|---|---|---|" + "---|" * len(BATCH_SIZES),
    ]
    labels = {
        "artifact": "artifact, raw requests (end to end)",
        "artifact_graph": "artifact graph alone (indices)",
        "eager": "training model, eager (indices)",
    }
    for key, label in labels.items():
        lat = result["latency_us"][key]
        rates = " | ".join(f"{result['rows_per_s'][key][str(b)]:,.0f}" for b in BATCH_SIZES)
        lines.append(f"| {label} | {lat['p50']:,.0f} | {lat['p99']:,.0f} | {rates} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="RUN_DIR of train/run.py")
    parser.add_argument("--artifact", help="artifact of that run (default: exported here)")
    parser.add_argument("--requests", type=int, default=2000, help="single requests timed")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput figure")
    parser.add_argument("--output", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    where = pin_one_core()
    # Other processes on the machine share the core: record how busy it was.
    load_before = os.getloadavg()[0]
    result = bench(
        Path(args.run).resolve(),
        Path(args.artifact) if args.artifact else None,
        args.requests,
        args.seconds,
    )
    result["cpu"] = where
    result["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(markdown(result))
    print(f"{where}; 1-minute load average {result['load_average_1m']}")
    print(json.dumps({"artifact_over_eager": result["artifact_over_eager"]}, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
