"""Bounded memory while streaming a samples table larger than a quarter of the machine's RAM.

    python benchmarks/bench_streaming.py --source data/quickstart/samples --copies 28 \
        --work-dir /tmp/stream-bench [--layout single|per-copy] [--model mem] [--workers 2] \
        [--time-budget-s 1500] [--plot docs/results/streaming_memory.png] [key=value ...]

1. Table (skipped when WORK_DIR/table already holds one made from the same source, copies
   and layout): the train rows of a real samples table (OUT_DIR of etl/build_samples.py) are
   written --copies times into a new Delta table with deltalake, chunk by chunk, never through
   Spark; valid and test rows once. Every copy after the first renumbers `line_no` and
   `user_key` and relabels `user_id` and `item_id` (item sequences included) with a random
   permutation of the copy's own, so the copies are not byte-identical but keep the schema,
   the vocabularies and the distributions. feature_schema.json is copied with the new train
   counts, so train/ reads the table like any ETL output. --layout single writes one commit
   whose files delta-rs cuts by size (what the ETL's rs writer gives); per-copy writes one
   commit, hence one file per train partition, per copy.
2. Streaming: one stage (MEM by default: both entities' train rows, two streams) for one
   epoch through the real path (train.stage.run_stage: Delta -> Ray Data read_delta -> Ray
   Train workers, DDP, validation, checkpoint), in a child process that starts the embedded
   Ray, so the child's process tree is the driver, GCS, raylet and every Ray worker. Every
   --interval-s this process samples that tree: summed RSS (counts shared pages, the object
   store's included, once per process that maps them) and summed PSS (shared pages split
   between the processes: the tree's real footprint), plus the object store's usage and
   spilling as Ray reports them. Rows trained come from the first worker's progress lines.
   Past --time-budget-s the child's tree is stopped and the result says how far it got.

Table size is given as the Arrow in-memory size of its rows (pyarrow `nbytes`, as decoded
for training) and as the Delta files on disk. Results: WORK_DIR/streaming.json, a PNG of
memory against rows trained, and a summary printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import process_tree, read_proc
from etl.storage import ROW_GROUP_ROWS

REPO = Path(__file__).resolve().parents[1]

GIB = 2**30
# Chunk of rows handed to the Delta writer at a time: keeps this process small.
CHUNK_ROWS = 65536
# Written by the child, one line each, parsed by the parent.
OBJECT_STORE_TAG = "BENCH_OBJECT_STORE"
PROGRESS = re.compile(r"\[(\w+)\] epoch (\d+) step (\d+): ~(\d+) rows")
EPOCH_DONE = re.compile(r"\[(\w+)\] epoch (\d+)/\d+: (\d+) rows, ([\d,]+) rows/s")


# --------------------------------------------------------------------------------------------
# 1. The table.
# --------------------------------------------------------------------------------------------


def make_table(
    source: Path,
    out: Path,
    copies: int,
    layout: str = "single",
    seed: int = 0,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, Any]:
    """Writes OUT/samples (train rows x copies) and OUT/feature_schema.json; returns its sizes.

    Row groups of at most `row_group_rows`, as the ETL writes them (etl.storage.ROW_GROUP_ROWS).
    Reuses OUT when its marker says it was made from the same source, copies and layout.
    """
    marker = out / "bench_table.json"
    wanted = {
        "source": str(source.resolve()),
        "copies": copies,
        "layout": layout,
        "seed": seed,
        "row_group_rows": row_group_rows,
    }
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in wanted} == wanted:
            print(f"table: reusing {out}", flush=True)
            return info
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, WriterProperties, write_deltalake

    row_groups = WriterProperties(max_row_group_size=row_group_rows)

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    schema = json.loads((source / "feature_schema.json").read_text())
    vocab = {f["name"]: f["vocab_size"] for f in schema["features"]}
    sequences = [f["name"] for f in schema["features"] if f["kind"] == "sequence"]
    source_table = DeltaTable(str(source / "samples"))
    partitions = source_table.metadata().partition_columns
    parts = {
        (entity, split): source_table.to_pyarrow_table(
            filters=[("entity", "=", entity), ("split", "=", split)]
        )
        for entity in schema["entities"]
        for split in ("train", "valid", "test")
    }
    line_step = 1 + max(pc.max(t["line_no"]).as_py() or 0 for t in parts.values())
    user_step = 1 + max(pc.max(t["user_key"]).as_py() or 0 for t in parts.values())
    rng = np.random.default_rng(seed)
    reserved = schema["reserved_indices"]
    first_index = 1 + max(reserved.values())

    def relabel(size: int) -> np.ndarray:
        """Index map of one copy: reserved indices stay, the others are permuted."""
        mapping = np.arange(size)
        mapping[first_index:] = first_index + rng.permutation(size - first_index)
        return mapping

    def perturbed(table: pa.Table, copy: int, maps: dict[str, np.ndarray]) -> pa.Table:
        if copy == 0:
            return table
        columns = {
            "line_no": pc.add(table["line_no"], copy * line_step),
            "user_key": pc.add(table["user_key"], copy * user_step),
            "user_id": maps["user_id"][table["user_id"].to_numpy()],
            "item_id": maps["item_id"][table["item_id"].to_numpy()],
        }
        for name in sequences:
            lists = table[name].combine_chunks()
            values = maps["item_id"][lists.values.to_numpy()]
            columns[name] = pa.ListArray.from_arrays(lists.offsets, values, type=lists.type)
        for name, values in columns.items():
            table = table.set_column(
                table.schema.get_field_index(name),
                table.schema.field(name),
                pa.array(values, type=table.schema.field(name).type)
                if isinstance(values, np.ndarray)
                else values,
            )
        return table

    counts = {e: {s: 0 for s in ("train", "valid", "test")} for e in schema["entities"]}
    likes = {e: {s: 0 for s in ("train", "valid", "test")} for e in schema["entities"]}
    arrow_bytes = {"train": 0, "other": 0}

    def batches(copy: int) -> Iterator[pa.RecordBatch]:
        maps = {name: relabel(vocab[name]) for name in ("user_id", "item_id")}
        for (entity, split), table in parts.items():
            if split != "train" and copy > 0:
                continue
            chunk = perturbed(table, copy, maps)
            counts[entity][split] += chunk.num_rows
            likes[entity][split] += pc.sum(chunk["label"]).as_py() or 0
            arrow_bytes["train" if split == "train" else "other"] += chunk.nbytes
            yield from chunk.to_batches(max_chunksize=CHUNK_ROWS)

    arrow_schema = next(iter(parts.values())).schema
    started = time.monotonic()
    if layout == "single":
        # One commit, files cut by delta-rs's target size: the layout the ETL's rs writer
        # gives (1-2 files per partition at 20M raw rows).
        def all_copies() -> Iterator[pa.RecordBatch]:
            for copy in range(copies):
                yield from batches(copy)
                print(f"table: copy {copy + 1}/{copies} written", flush=True)

        write_deltalake(
            str(out / "samples"),
            pa.RecordBatchReader.from_batches(arrow_schema, all_copies()),
            mode="overwrite",
            partition_by=partitions,
            writer_properties=row_groups,
        )
    else:
        # One commit per copy: one file per copy in every train partition, as a many-task
        # Spark write would give.
        for copy in range(copies):
            write_deltalake(
                str(out / "samples"),
                pa.RecordBatchReader.from_batches(arrow_schema, batches(copy)),
                mode="overwrite" if copy == 0 else "append",
                partition_by=partitions,
                writer_properties=row_groups,
            )
            print(f"table: copy {copy + 1}/{copies} written", flush=True)
    schema["counts"], schema["likes"] = counts, likes
    (out / "feature_schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    files = [f for f in (out / "samples").rglob("*.parquet")]
    info = {
        **wanted,
        "rows": sum(sum(c.values()) for c in counts.values()),
        "counts": counts,
        "arrow_bytes": sum(arrow_bytes.values()),
        "arrow_bytes_train": arrow_bytes["train"],
        "delta_bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "write_s": round(time.monotonic() - started, 1),
    }
    marker.write_text(json.dumps(info, indent=2))
    print(
        f"table: {info['rows']:,} rows, {info['arrow_bytes'] / GIB:.2f} GiB Arrow, "
        f"{info['delta_bytes'] / GIB:.2f} GiB Delta in {info['files']} files, "
        f"{info['write_s']} s",
        flush=True,
    )
    return info


def streamed_arrow_bytes(table_dir: Path, model: str, info: dict[str, Any]) -> int:
    """Arrow size of what the stage reads: its entities' train rows, the columns it asks for."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from benchmarks.common import STAGES
    from mkt.schema import FeatureSchema
    from train.data import model_columns, stage_entities

    schema = FeatureSchema.load(table_dir)
    stage, _ = STAGES[model]
    columns = [*model_columns(schema), "split"]
    total = 0
    for entity in stage_entities(schema, stage.entities):
        # One copy's rows measured; every copy has the same sizes (only values are relabelled).
        dataset = DeltaTable(str(table_dir / "samples")).to_pyarrow_dataset()
        head: pa.Table = dataset.head(
            CHUNK_ROWS,
            columns=columns,
            filter=(pc.field("entity") == entity) & (pc.field("split") == "train"),
        )
        rows = info["counts"][entity]["train"]
        total += round(head.nbytes / max(head.num_rows, 1) * rows)
    return total


# --------------------------------------------------------------------------------------------
# 2. The child: one stage for one epoch (this file run with --child).
# --------------------------------------------------------------------------------------------


def child(table_dir: Path, run_dir: Path, model: str, workers: int, overrides: list[str]) -> None:
    from benchmarks.common import STAGES, bench_config
    from mkt.schema import FeatureSchema
    from train.checkpoints import ModelLink
    from train.cluster import start_ray

    config = bench_config(1, [f"scaling.num_workers={workers}", *overrides])
    schema = FeatureSchema.load(table_dir)
    import ray

    for attempt in range(1, 4):
        # Ray gives its raylet 30 s to register with the GCS; on a 2-core machine shared with
        # other jobs (load 20) that can run out, and a second try usually gets through.
        try:
            start_ray(config)
            break
        except Exception as error:
            print(f"Ray start attempt {attempt} failed: {error}", flush=True)
            ray.shutdown()
            if attempt == 3:
                raise
    from ray._private.internal_api import memory_summary

    from train.stage import run_stage

    stop = threading.Event()

    # This cluster's address: other Ray instances may run on a shared machine.
    address = ray.get_runtime_context().gcs_address

    def object_store() -> None:
        # memory_summary(stats_only) is the raylet's own account: plasma in use, spilled.
        while not stop.wait(2.0):
            try:
                text = memory_summary(address=address, stats_only=True)
            except Exception as error:
                print(f"{OBJECT_STORE_TAG} error {error!r}", flush=True)
                continue
            print(f"{OBJECT_STORE_TAG} {time.time():.2f} {json.dumps(text)}", flush=True)

    threading.Thread(target=object_store, daemon=True).start()
    stage, ancestors = STAGES[model]
    chain = [*ancestors, ModelLink(stage.model, {})]
    try:
        result = run_stage(stage, config, schema, table_dir, run_dir, chain)
        print("BENCH_RESULT " + json.dumps(result.state.history[-1]), flush=True)
    finally:
        stop.set()
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# 3. The parent: run the child, sample its process tree, parse its output.
# --------------------------------------------------------------------------------------------


def _component(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    if read_proc(f"/proc/{pid}/cmdline").startswith("ray::"):
        return "ray workers"
    return "ray core"  # gcs_server, raylet, log monitor, ...


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of stat): with the pid, it names one process."""
    stat = read_proc(f"/proc/{pid}/stat").rsplit(")", 1)
    return stat[1].split()[19] if len(stat) == 2 else ""


def _name(pid: int) -> str:
    """What a process is: Ray's `ray::Task` title of a worker, else its program's name."""
    command = read_proc(f"/proc/{pid}/cmdline").split("\0")[0]
    return command.split()[0] if command.startswith("ray::") else Path(command).name


def sample_memory(root: int, seen: dict[int, str]) -> dict[str, Any]:
    """Summed RSS and PSS (kernel's smaps_rollup) of the tree, RSS by component, and each
    process's PSS; processes that end mid-read are skipped. Adds every member to `seen`
    (pid -> start time)."""
    rss: dict[str, int] = {}
    pss = 0
    processes = 0
    by_process: dict[int, int] = {}
    for pid in process_tree(root):
        seen.setdefault(pid, _start_time(pid))
        fields = {}
        for line in read_proc(f"/proc/{pid}/smaps_rollup").splitlines()[1:]:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024  # kB
        if "Rss" not in fields:
            continue
        kind = _component(pid, root)
        rss[kind] = rss.get(kind, 0) + fields["Rss"]
        pss += fields["Pss"]
        by_process[pid] = fields["Pss"]
        processes += 1
    return {
        "rss": sum(rss.values()),
        "pss": pss,
        "rss_by": rss,
        "processes": processes,
        "pss_by_process": by_process,
    }


def _object_store_bytes(text: str) -> dict[str, float]:
    """Plasma bytes in use and spilled, from memory_summary's stats text."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    out = {}
    used = re.search(r"Plasma memory usage ([\d.]+) (\w+)", text)
    if used:
        out["object_store_used"] = float(used.group(1)) * units.get(used.group(2), 1)
    spilled = re.search(r"Spilled ([\d.]+) (\w+)", text)
    out["object_store_spilled"] = (
        float(spilled.group(1)) * units.get(spilled.group(2), 1) if spilled else 0.0
    )
    return out


def stream(
    table_dir: Path,
    work_dir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    run_dir = work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--work-dir", str(work_dir)]
    cmd += ["--model", args.model, "--workers", str(args.workers), *args.overrides]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    log_path = work_dir / "child.log"
    samples: list[dict[str, Any]] = []
    progress: list[tuple[float, int]] = []  # (time, rows trained)
    store: list[dict[str, float]] = []
    result: dict[str, Any] = {}
    started = time.time()
    load_before = os.getloadavg()[0]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=REPO
    )

    def read_output() -> None:
        with log_path.open("w") as log:
            for line in process.stdout:  # type: ignore[union-attr]
                log.write(line)
                now = time.time()
                if line.startswith(OBJECT_STORE_TAG) and " error " not in line:
                    _, stamp, text = line.rstrip("\n").split(" ", 2)
                    store.append(
                        {"t": float(stamp) - started, **_object_store_bytes(json.loads(text))}
                    )
                elif match := PROGRESS.search(line):
                    progress.append((now - started, int(match.group(4))))
                    print(f"  {now - started:6.0f} s  ~{int(match.group(4)):,} rows", flush=True)
                elif match := EPOCH_DONE.search(line):
                    progress.append((now - started, int(match.group(3))))
                    print(f"  {line.strip()[-160:]}", flush=True)
                elif line.startswith("BENCH_RESULT "):
                    result.update(json.loads(line.split(" ", 1)[1]))

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    stopped = None
    next_print = 0.0
    seen: dict[int, str] = {}
    # pid -> (name, peak PSS): the per-process bound (a process's name read at its peak, as
    # Ray names a worker by the task it runs).
    peaks: dict[int, tuple[str, int]] = {}
    try:
        while process.poll() is None:
            now = time.time() - started
            sample = sample_memory(process.pid, seen)
            for pid, value in sample.pop("pss_by_process").items():
                if value > peaks.get(pid, ("", -1))[1]:
                    peaks[pid] = (_name(pid), value)
            samples.append({"t": now, "load": os.getloadavg()[0], **sample})
            if now >= next_print:
                print(
                    f"  {now:6.0f} s  tree RSS {sample['rss'] / GIB:.2f} GiB, "
                    f"PSS {sample['pss'] / GIB:.2f} GiB, {sample['processes']} processes",
                    flush=True,
                )
                next_print = now + 60
            if now > args.time_budget_s:
                stopped = f"time budget of {args.time_budget_s:.0f} s reached"
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
                break
            time.sleep(args.interval_s)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        _kill_leftovers(seen)
    reader.join(timeout=30)
    if process.returncode != 0 and stopped is None:
        raise RuntimeError(f"the stage exited with {process.returncode}; see {log_path}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": round(time.time() - started, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "stopped": stopped,
        "epoch": result,
        "samples": samples,
        "progress": progress,
        "object_store": store,
        "process_peaks": sorted(
            ({"pid": pid, "name": name, "peak_pss": value} for pid, (name, value) in peaks.items()),
            key=lambda p: -p["peak_pss"],
        ),
    }


def _kill_leftovers(seen: dict[int, str]) -> None:
    """SIGKILL to every process of the child's tree still alive (a Ray process orphaned by a
    stopped or failed driver): only the same pid with the same start time, never a reused pid."""
    for pid, start in seen.items():
        if start and _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# 4. Summary and plot.
# --------------------------------------------------------------------------------------------


def rows_at(progress: list[tuple[float, int]], t: float) -> float | None:
    """Rows trained at time t, interpolated between progress lines (None before the first)."""
    if not progress or t < progress[0][0]:
        return None
    for (t0, r0), (t1, r1) in itertools.pairwise(progress):
        if t0 <= t <= t1:
            return r0 + (r1 - r0) * (t - t0) / max(t1 - t0, 1e-9)
    return float(progress[-1][1])


def summarise(table: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    samples, progress = run["samples"], run["progress"]
    trained = progress[-1][1] if progress else 0
    # Flatness: the peak over the first and over the second half of the rows trained.
    half = trained / 2
    first = [s["pss"] for s in samples if (rows_at(progress, s["t"]) or 0) <= half]
    second = [s["pss"] for s in samples if (rows_at(progress, s["t"]) or 0) > half]
    store = run["object_store"]
    return {
        "table_rows": table["rows"],
        "table_arrow_gib": table["arrow_bytes"] / GIB,
        "streamed_rows": sum(table["counts"][e]["train"] for e in table["streamed_entities"]),
        "streamed_arrow_gib": table["streamed_arrow_bytes"] / GIB,
        "table_delta_gib": table["delta_bytes"] / GIB,
        "rows_trained": trained,
        "peak_rss_gib": max(s["rss"] for s in samples) / GIB,
        "peak_pss_gib": max(s["pss"] for s in samples) / GIB,
        "peak_pss_first_half_gib": max(first, default=0) / GIB,
        "peak_pss_second_half_gib": max(second, default=0) / GIB,
        "peak_object_store_gib": max((s.get("object_store_used", 0) for s in store), default=0)
        / GIB,
        "spilled_gib": max((s.get("object_store_spilled", 0) for s in store), default=0) / GIB,
        "peak_pss_over_table": max(s["pss"] for s in samples) / table["arrow_bytes"],
        # The largest processes at their own peaks (not at the same moment).
        "largest_processes": [
            {"name": p["name"], "pid": p["pid"], "peak_pss_gib": p["peak_pss"] / GIB}
            for p in run["process_peaks"][:6]
        ],
        # The epoch's own figure; for a stopped run, the rate between the progress lines.
        "rows_per_s": run["epoch"].get("rows_per_s")
        or (
            (progress[-1][1] - progress[0][1]) / max(progress[-1][0] - progress[0][0], 1e-9)
            if len(progress) > 1
            else 0.0
        ),
        "wall_s": run["wall_s"],
        "load_mean": sum(s["load"] for s in samples) / len(samples),
        "stopped": run["stopped"],
    }


def plot(run: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = run["progress"]
    points = [(rows_at(progress, s["t"]), s) for s in run["samples"]]
    points = [(r / 1e6, s) for r, s in points if r is not None]
    store = [(rows_at(progress, s["t"]), s) for s in run["object_store"]]
    store = [(r / 1e6, s) for r, s in store if r is not None]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot([r for r, _ in points], [s["pss"] / GIB for _, s in points], label="tree PSS")
    ax.plot([r for r, _ in points], [s["rss"] / GIB for _, s in points], label="tree RSS (sum)")
    ax.plot(
        [r for r, _ in store],
        [s.get("object_store_used", 0) / GIB for _, s in store],
        label="object store in use",
    )
    ax.axhline(summary["table_arrow_gib"], color="k", ls="--", lw=1, label="table (Arrow)")
    ax.set_xlabel("rows trained (millions)")
    ax.set_ylabel("GiB")
    ax.set_title(
        f"{summary['table_rows'] / 1e6:.1f}M rows, {summary['table_arrow_gib']:.1f} GiB Arrow table"
    )
    ax.legend(loc="center right")
    ax.set_ylim(bottom=0)
    ts = [s["t"] for s in run["samples"]]
    ax_t.plot(ts, [s["pss"] / GIB for s in run["samples"]], label="tree PSS")
    for kind in ("driver", "ray core", "ray workers"):
        ax_t.plot(ts, [s["rss_by"].get(kind, 0) / GIB for s in run["samples"]], label=f"RSS {kind}")
    ax_t.set_xlabel("seconds since start (Ray start included)")
    ax_t.set_ylabel("GiB")
    ax_t.set_title("by component")
    ax_t.legend(loc="upper left")
    ax_t.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO / "data" / "quickstart" / "samples")
    parser.add_argument("--copies", type=int, default=28, help="copies of the train rows")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/stream-bench"))
    parser.add_argument(
        "--layout",
        choices=("single", "per-copy"),
        default="single",
        help="files of the table: as the ETL's rs writer cuts them, or one per copy",
    )
    parser.add_argument(
        "--row-group-rows",
        type=int,
        default=ROW_GROUP_ROWS,
        help="rows per Parquet row group of the table (default: the ETL's)",
    )
    parser.add_argument("--model", choices=("mem", "tem"), default="mem")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval-s", type=float, default=0.5)
    parser.add_argument("--time-budget-s", type=float, default=1800)
    parser.add_argument(
        "--plot", type=Path, default=REPO / "docs" / "results" / "streaming_memory.png"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()
    table_dir = work_dir / "table"
    if args.child:
        child(table_dir, work_dir / "run", args.model, args.workers, args.overrides)
        return 0
    work_dir.mkdir(parents=True, exist_ok=True)
    table = make_table(
        args.source.resolve(),
        table_dir,
        args.copies,
        args.layout,
        row_group_rows=args.row_group_rows,
    )
    from benchmarks.common import STAGES
    from mkt.schema import FeatureSchema
    from train.data import stage_entities

    table["streamed_entities"] = stage_entities(
        FeatureSchema.load(table_dir), STAGES[args.model][0].entities
    )
    table["streamed_arrow_bytes"] = streamed_arrow_bytes(table_dir, args.model, table)
    print(f"streaming {args.model} with {args.workers} workers, one epoch", flush=True)
    run = stream(table_dir, work_dir, args)
    summary = summarise(table, run)
    (work_dir / "streaming.json").write_text(
        json.dumps({"table": table, "summary": summary, "run": run}, indent=1)
    )
    plot(run, summary, args.plot)
    s = summary
    print(
        f"\ntable: {s['table_rows']:,} rows, {s['table_arrow_gib']:.2f} GiB Arrow in memory, "
        f"{s['table_delta_gib']:.2f} GiB Delta on disk; the stage streams {s['streamed_rows']:,} "
        f"rows ({s['streamed_arrow_gib']:.2f} GiB Arrow, its columns only)\n"
        f"trained {s['rows_trained']:,} rows in {s['wall_s']:.0f} s "
        f"({s['rows_per_s']:,.0f} rows/s; mean load {s['load_mean']:.1f})"
        f"{'; STOPPED: ' + s['stopped'] if s['stopped'] else ''}\n"
        f"peak memory of the process tree: PSS {s['peak_pss_gib']:.2f} GiB "
        f"(summed RSS {s['peak_rss_gib']:.2f} GiB) for a {s['table_arrow_gib']:.2f} GiB table: "
        f"{s['peak_pss_over_table']:.2f} x its size\n"
        f"PSS peak over the first / second half of the rows: {s['peak_pss_first_half_gib']:.2f} / "
        f"{s['peak_pss_second_half_gib']:.2f} GiB; object store peak "
        f"{s['peak_object_store_gib']:.2f} GiB, spilled {s['spilled_gib']:.2f} GiB\n"
        "largest processes (PSS at their own peaks): "
        + ", ".join(f"{p['name']} {p['peak_pss_gib']:.2f} GiB" for p in s["largest_processes"])
        + f"\nresults: {work_dir / 'streaming.json'}, plot: {args.plot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
