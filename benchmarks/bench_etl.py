"""Benchmark etl/build_samples.py (spark-submit) against the DuckDB reference on generated data.

    python benchmarks/bench_etl.py --rows 1000000 5000000 20000000 --work-dir /tmp/etl-bench \
        [--master local[2]] [--driver-memory 4g] [--java-options OPTS] [--duckdb-threads 2] \
        [--duckdb-max-rss-gb 14] [--no-duckdb] [--activity] [--keep]

Per size: generate Tenrec-format CSVs of about that many raw rows (jobs/generate_tenrec.py, seed
0), run the Spark job as its own spark-submit process with the event log on, run
benchmarks/duckdb_samples.py over the same files in one process, and compare the two outputs row by
row (every column, joined on entity and line_no). Reported: wall time (process start to exit,
JVM start included), rows per second, CPU per raw row, executor CPU seconds and where they go
(phases and staged tables, from the event log: the job tags each phase with a job
description), the JVM's CPU outside the tasks by thread kind (JIT compilers, garbage
collector, the rest), peak resident memory of the JVM (driver and executors: one JVM on a
local master), of the Python driver (which commits the files to Delta with delta-rs) and of
the largest of Spark's Python workers (which run the job's Arrow passes), the CPU of all
Python processes, the JVM heap peak, and the DuckDB/Spark time ratio. Machine load (1-minute load average) before and after each run goes
beside the figures: on a shared machine wall time is not CPU time.

Results: printed as Markdown and written to WORK_DIR/results.json, merged by size: results of
other sizes already there are kept, a size that is run again replaces its entry. Raw data is
generated once per size and reused while WORK_DIR/rows-N/raw holds it; raw data and outputs
are deleted after each size unless --keep (20M rows are ~1 GB of CSV and oracle); event logs
are kept.

The machine is shared, so the DuckDB reference is stopped (and reported as stopped, with the
RSS and time it had reached) if its process tree exceeds --duckdb-max-rss-gb or
--duckdb-timeout-s: its memory_limit bounds its buffer manager, not everything it allocates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import process_tree, read_proc

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
# Generator default: about 23.4 video + 8.0 article raw rows per user (docs/generator.md).
ROWS_PER_USER = 31.36
MB = 1e6
EXECUTOR_PEAKS = (
    "JVMHeapMemory",
    "JVMOffHeapMemory",
    "OnHeapExecutionMemory",
    "OnHeapStorageMemory",
    "ProcessTreeJVMRSS",
)


# --------------------------------------------------------------------------------------------
# Process memory: peak RSS of a process tree, by reading /proc (Linux).
# --------------------------------------------------------------------------------------------


class ProcessTree:
    """Polls a process and its descendants: each one's peak RSS (VmHWM) and CPU time, peak sum;
    and the CPU time of every JVM thread, by kind.

    CPU time is the whole process's (user + system, all threads: GC and JIT included), as last
    seen; a process's final quarter second is missed.
    """

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self._root, self._interval = root, interval_s
        self.peak_by_pid: dict[int, tuple[str, int]] = {}  # pid -> (kind, peak bytes)
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds)
        self.cpu_by_jvm_thread: dict[tuple[int, str], tuple[str, float]] = {}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Peak RSS (MB) of the largest JVM and Python process and of the tree; CPU seconds."""
        self._stop.set()
        self._thread.join()
        peaks: dict[str, float] = defaultdict(float)
        for kind, peak in self.peak_by_pid.values():
            peaks[kind] = max(peaks[kind], peak / MB)
        cpu: dict[str, float] = defaultdict(float)
        for kind, seconds in self.cpu_by_pid.values():
            cpu[kind] += seconds
        threads: dict[str, float] = defaultdict(float)
        for kind, seconds in self.cpu_by_jvm_thread.values():
            threads[kind] += seconds
        return {
            **{f"jvm_{kind}_cpu_s": round(seconds, 1) for kind, seconds in threads.items()},
            "jvm_rss_mb": round(peaks["java"], 1),
            "python_rss_mb": round(peaks["python"], 1),
            "python_worker_rss_mb": round(peaks["python_worker"], 1),
            "tree_rss_mb": round(self.peak_total / MB, 1),
            "jvm_cpu_s": round(cpu["java"], 1),
            "python_cpu_s": round(cpu["python"] + cpu["python_worker"], 1),
            "python_worker_cpu_s": round(cpu["python_worker"], 1),
        }

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            total = 0
            for pid in process_tree(self._root):
                status = read_proc(f"/proc/{pid}/status")
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if "VmHWM" not in fields:
                    continue
                hwm = int(fields["VmHWM"].split()[0]) * 1024
                total += int(fields["VmRSS"].split()[0]) * 1024
                name = fields.get("Name", "").strip()
                kind = "java" if name == "java" else "python" if "python" in name else name
                if kind == "python" and "pyspark.daemon" in read_proc(f"/proc/{pid}/cmdline"):
                    kind = "python_worker"  # Spark's Python workers, which run the Arrow passes
                _, seen = self.peak_by_pid.get(pid, (kind, 0))
                self.peak_by_pid[pid] = (kind, max(seen, hwm))
                stat = read_proc(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
                if len(stat) > 12:
                    self.cpu_by_pid[pid] = (kind, _cpu_seconds(stat))
                if kind == "java":
                    self._poll_threads(pid)
            self.peak_total = max(self.peak_total, total)

    def _poll_threads(self, pid: int) -> None:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        for tid in tids:
            raw = read_proc(f"/proc/{pid}/task/{tid}/stat")
            if ")" in raw:
                name = raw[raw.index("(") + 1 : raw.rindex(")")]
                stat = raw.rsplit(")", 1)[-1].split()
                self.cpu_by_jvm_thread[(pid, tid)] = (_thread_kind(name), _cpu_seconds(stat))


def _cpu_seconds(stat: list[str]) -> float:
    """utime + stime (fields 14 and 15 of /proc/.../stat, after the command name) in seconds."""
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _thread_kind(name: str) -> str:
    """A JVM thread's kind from its (15-character) name."""
    if "CompilerThre" in name:
        return "jit"
    if name.startswith(("GC Thread", "G1 ")):
        return "gc"
    if name.startswith("Executor task"):
        return "task_threads"
    return "other"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _run_measured(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    max_rss_mb: float | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Runs cmd, measuring it; past max_rss_mb (whole tree) or timeout_s it is killed and the
    result says so in "stopped" instead of raising."""
    load_before = _load()
    started = time.monotonic()
    stopped = None
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        tree = ProcessTree(process.pid)
        while process.poll() is None:
            elapsed = time.monotonic() - started
            if max_rss_mb is not None and tree.peak_total / MB > max_rss_mb:
                stopped = f"process tree RSS over {max_rss_mb:.0f} MB after {elapsed:.0f} s"
            elif timeout_s is not None and elapsed > timeout_s:
                stopped = f"still running after {timeout_s:.0f} s"
            if stopped:
                process.kill()
                process.wait()
                break
            time.sleep(0.25)
        code = process.returncode
    wall = time.monotonic() - started
    result = {"wall_s": round(wall, 1), **tree.stop(), "load_before": load_before}
    result["load_after"] = _load()
    if stopped:
        result["stopped"] = stopped
    elif code != 0:
        raise RuntimeError(f"{cmd[0]} exited with {code}; see {log}")
    return result


# --------------------------------------------------------------------------------------------
# Spark event log: where the time goes.
# --------------------------------------------------------------------------------------------


def parse_event_log(path: Path) -> dict[str, Any]:
    """Per job description (phase / staged table): job wall time, task time, CPU, I/O; peaks.

    Wall time per description is the union of its jobs' intervals (jobs of one description
    run one after another, but a broadcast may overlap the job that uses it).
    """
    jobs: dict[int, dict[str, Any]] = {}
    stage_job: dict[int, int] = {}
    stage_tasks: dict[int, int] = defaultdict(int)
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    peaks: dict[str, float] = defaultdict(float)
    app: dict[str, int] = {}
    with path.open() as fh:
        for line in fh:
            event = json.loads(line)
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                description = event.get("Properties", {}).get("spark.job.description") or "(none)"
                jobs[event["Job ID"]] = {
                    "description": description,
                    "start": event["Submission Time"],
                }
                for stage in event["Stage IDs"]:
                    stage_job[stage] = event["Job ID"]
            elif kind == "SparkListenerJobEnd":
                jobs[event["Job ID"]]["end"] = event["Completion Time"]
            elif kind == "SparkListenerTaskEnd":
                metrics = event.get("Task Metrics") or {}
                stage_tasks[event["Stage ID"]] += 1
                job = jobs[stage_job[event["Stage ID"]]]
                t = totals[job["description"]]
                shuffle_read = metrics.get("Shuffle Read Metrics", {})
                t["tasks"] += 1
                t["task_s"] += metrics.get("Executor Run Time", 0) / 1e3
                t["cpu_s"] += metrics.get("Executor CPU Time", 0) / 1e9
                t["gc_s"] += metrics.get("JVM GC Time", 0) / 1e3
                t["input_mb"] += metrics.get("Input Metrics", {}).get("Bytes Read", 0) / MB
                t["output_mb"] += metrics.get("Output Metrics", {}).get("Bytes Written", 0) / MB
                t["shuffle_write_mb"] += (
                    metrics.get("Shuffle Write Metrics", {}).get("Shuffle Bytes Written", 0) / MB
                )
                t["shuffle_read_mb"] += (
                    shuffle_read.get("Remote Bytes Read", 0)
                    + shuffle_read.get("Local Bytes Read", 0)
                ) / MB
                t["spill_disk_mb"] += metrics.get("Disk Bytes Spilled", 0) / MB
            elif kind == "SparkListenerStageExecutorMetrics":
                for name in EXECUTOR_PEAKS:
                    value = event.get("Executor Metrics", {}).get(name, 0) / MB
                    peaks[name] = max(peaks[name], value)
            elif kind == "SparkListenerApplicationStart":
                app["start"] = event["Timestamp"]
            elif kind == "SparkListenerApplicationEnd":
                app["end"] = event["Timestamp"]
    intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for job in jobs.values():
        intervals[job["description"]].append((job["start"], job.get("end", job["start"])))
    rows = []
    for description, spans in intervals.items():
        t = totals[description]
        rows.append(
            {
                "description": description,
                "jobs": len(spans),
                "wall_s": round(_union_length(spans) / 1e3, 2),
                **{k: round(v, 2) for k, v in t.items()},
            }
        )
    rows.sort(key=lambda r: min(s for s, _ in intervals[r["description"]]))
    return {
        "app_wall_s": round((app.get("end", 0) - app.get("start", 0)) / 1e3, 1),
        "stages": len(stage_tasks),
        "max_tasks_per_stage": max(stage_tasks.values(), default=0),
        "by_description": rows,
        "executor_peaks_mb": {k: round(v, 1) for k, v in peaks.items()},
        "totals": {
            k: round(sum(r.get(k, 0) for r in rows), 1)
            for k in ("task_s", "cpu_s", "gc_s", "shuffle_write_mb", "spill_disk_mb")
        },
    }


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


# --------------------------------------------------------------------------------------------
# The runs.
# --------------------------------------------------------------------------------------------


def generate(rows: int, raw: Path) -> dict[str, Any]:
    """Tenrec-format CSVs of about `rows` raw rows (kept between runs of the same size)."""
    marker = raw / "generator_summary.json"
    if not marker.exists():
        from jobs.generate_tenrec import generate as generate_tenrec

        raw.mkdir(parents=True, exist_ok=True)
        summary = generate_tenrec(raw, num_users=max(1, round(rows / ROWS_PER_USER)), seed=0)
        marker.write_text(json.dumps(summary, indent=2))
    summary = json.loads(marker.read_text())
    return {
        "users": summary["users"],
        "raw_rows": summary["video"]["rows"] + summary["article"]["rows"],
        "raw_mb": round(sum(f.stat().st_size for f in raw.glob("*.csv")) / MB, 1),
    }


def run_spark(raw: Path, out: Path, events: Path, args: argparse.Namespace) -> dict[str, Any]:
    events.mkdir(parents=True, exist_ok=True)
    before = set(events.iterdir())
    conf = {
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": events.resolve().as_uri(),
        "spark.eventLog.compress": "false",
        "spark.eventLog.rolling.enabled": "false",
        "spark.eventLog.logStageExecutorMetrics": "true",
        "spark.executor.processTreeMetrics.enabled": "true",
        **dict(kv.split("=", 1) for kv in args.conf),
    }
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", args.master]
    cmd += ["--driver-memory", args.driver_memory]
    if args.java_options:
        cmd += ["--driver-java-options", args.java_options]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(REPO / "etl" / "build_samples.py"), "--config", str(CONFIG)]
    cmd += ["--input", str(raw), "--output", str(out), *(["--activity"] if args.activity else [])]
    from jobs.common import spark_env

    result = _run_measured(cmd, out.parent / f"{out.name}.log", spark_env())
    summary = json.loads((out / "etl_summary.json").read_text())
    result["job_wall_s"] = summary["wall_s"]
    result["java_options"] = args.java_options
    result["samples"] = sum(e["samples"] for e in summary["entities"].values())
    result["samples_table_mb"] = _size_mb(out / "samples")
    (log_file,) = set(events.iterdir()) - before
    result["event_log"] = str(log_file)
    result["profile"] = parse_event_log(log_file)
    return result


def run_duckdb(raw: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "duckdb_samples.py"), "--config", str(CONFIG)]
    cmd += ["--input", str(raw), "--output", str(out), "--threads", str(args.duckdb_threads)]
    cmd += ["--memory-limit", args.duckdb_memory, *(["--activity"] if args.activity else [])]
    result = _run_measured(
        cmd,
        out.parent / f"{out.name}.log",
        max_rss_mb=args.duckdb_max_rss_gb * 1e3,
        timeout_s=args.duckdb_timeout_s,
    )
    if "stopped" not in result:
        result["samples_table_mb"] = _size_mb(out / "samples")
    return result


def _size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB, 1)


def compare(spark_out: Path, duck_out: Path, memory_limit: str) -> dict[str, Any]:
    """Rows of both outputs joined on (entity, line_no): row counts and differing cells per column."""
    import duckdb
    from deltalake import DeltaTable

    def delta(table: str) -> str:
        files = ", ".join(f"'{f}'" for f in DeltaTable(str(spark_out / table)).file_uris())
        return f"read_parquet([{files}], hive_partitioning = true)"

    con = duckdb.connect()
    # Unlimited, DuckDB takes 80% of RAM: the join of 20M rows reached 11.9 GB on a shared box.
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{duck_out / '_compare_tmp'}'")
    con.execute(f"CREATE VIEW s AS SELECT * FROM {delta('samples')}")
    con.execute(
        f"CREATE VIEW d AS SELECT * FROM read_parquet('{duck_out}/samples/*/*/*.parquet', "
        "hive_partitioning = true)"
    )
    columns = [
        c for (c, *_) in con.execute("DESCRIBE s").fetchall() if c not in ("entity", "line_no")
    ]
    counts = con.execute(
        "SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM d), "
        "(SELECT count(*) FROM s JOIN d USING (entity, line_no))"
    ).fetchone()
    differing = con.execute(
        "SELECT "
        + ", ".join(f"count(*) FILTER (s.{c} IS DISTINCT FROM d.{c})" for c in columns)
        + " FROM s JOIN d USING (entity, line_no)"
    ).fetchone()
    vocab_columns = "feature, entity, raw_value, index, count"
    vocab_diff = con.execute(
        f"SELECT count(*) FROM (SELECT {vocab_columns} FROM {delta('vocab')} EXCEPT "
        f"SELECT {vocab_columns} FROM '{duck_out}/vocab.parquet')"
    ).fetchone()[0]
    return {
        "spark_rows": counts[0],
        "duckdb_rows": counts[1],
        "joined_rows": counts[2],
        "differing_cells": {c: n for c, n in zip(columns, differing, strict=True) if n},
        "vocab_rows_only_in_spark": vocab_diff,
    }


def bench_size(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir / f"rows-{rows}"
    raw = work / "raw"
    result: dict[str, Any] = {"rows_requested": rows, **generate(rows, raw)}
    print(f"== {result['raw_rows']:,} raw rows ({result['raw_mb']} MB CSV)", flush=True)
    for out in (work / "spark-out", work / "duckdb-out"):
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier run's output
    result["spark"] = run_spark(raw, work / "spark-out", args.work_dir / "events", args)
    result["spark"]["rows_per_s"] = round(result["raw_rows"] / result["spark"]["wall_s"])
    print(f"   spark  {result['spark']['wall_s']} s", flush=True)
    if not args.no_duckdb:
        result["duckdb"] = duck = run_duckdb(raw, work / "duckdb-out", args)
        if "stopped" in duck:
            print(f"   duckdb stopped: {duck['stopped']}", flush=True)
        else:
            duck["rows_per_s"] = round(result["raw_rows"] / duck["wall_s"])
            result["spark_over_duckdb"] = round(result["spark"]["wall_s"] / duck["wall_s"], 1)
            print(f"   duckdb {duck['wall_s']} s", flush=True)
            result["comparison"] = compare(
                work / "spark-out", work / "duckdb-out", args.duckdb_memory
            )
    if not args.keep:
        shutil.rmtree(work)
    return result


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"master {args.master}, driver memory {args.driver_memory}, "
        f"driver JVM options '{args.java_options}', "
        f"activity features {'on' if args.activity else 'off'}, "
        f"DuckDB threads {args.duckdb_threads}, {os.cpu_count()} cores",
        "",
        "| raw rows | Spark wall s | rows/s | CPU µs/row | executor CPU s | JVM CPU s "
        "(JIT / GC) | Python CPU s (driver + workers) | JVM peak RSS MB | JVM heap peak MB "
        "| Python driver / largest worker peak RSS MB | DuckDB wall s | DuckDB CPU s | DuckDB peak RSS MB "
        "| Spark/DuckDB | differing cells | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, d = r["spark"], r.get("duckdb", {})
        if "stopped" in d:
            d = {
                "wall_s": f"stopped ({d['stopped']})",
                **{k: v for k, v in d.items() if k != "wall_s"},
            }
        comparison = r.get("comparison", {})
        per_row = (s["jvm_cpu_s"] + s["python_cpu_s"]) / r["raw_rows"] * 1e6
        lines.append(
            f"| {r['raw_rows']:,} | {s['wall_s']} | {s['rows_per_s']:,} | {per_row:.1f} "
            f"| {s['profile']['totals']['cpu_s']} "
            f"| {s['jvm_cpu_s']} ({s.get('jvm_jit_cpu_s', '-')} / {s.get('jvm_gc_cpu_s', '-')}) "
            f"| {s['python_cpu_s']} "
            f"| {s['jvm_rss_mb']:.0f} "
            f"| {s['profile']['executor_peaks_mb'].get('JVMHeapMemory', 0):.0f} "
            f"| {s['python_rss_mb']:.0f} / {s.get('python_worker_rss_mb', 0):.0f} "
            f"| {d.get('wall_s', '-')} | {d.get('python_cpu_s', '-')} "
            f"| {d.get('tree_rss_mb', '-')} "
            f"| {r.get('spark_over_duckdb', '-')} "
            f"| {sum(comparison.get('differing_cells', {}).values()) if comparison else '-'} "
            f"| {s['load_before']}/{s['load_after']} |"
        )
    for r in results:
        lines += [
            "",
            f"Where Spark's time goes, {r['raw_rows']:,} rows (from the event log):",
            "",
            "| phase / staged table | jobs | wall s | task s | CPU s | GC s | shuffle write MB "
            "| spill MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in r["spark"]["profile"]["by_description"]:
            lines.append(
                f"| {p['description'][:80]} | {p['jobs']} | {p['wall_s']} | {p.get('task_s', 0)} "
                f"| {p.get('cpu_s', 0)} | {p.get('gc_s', 0)} | {p.get('shuffle_write_mb', 0)} "
                f"| {p.get('spill_disk_mb', 0)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/etl-bench"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--conf", action="append", default=[], help="extra KEY=VALUE for Spark")
    parser.add_argument(
        "--java-options",
        default=None,
        help="the driver JVM's options (default: etl.config.DRIVER_JAVA_OPTIONS, "
        "as docs/etl.md's command passes them; '' for the JVM's defaults)",
    )
    parser.add_argument("--duckdb-threads", type=int, default=2)
    parser.add_argument("--duckdb-memory", default="6GB")
    parser.add_argument(
        "--duckdb-max-rss-gb", type=float, default=14.0, help="stop DuckDB past this RSS"
    )
    parser.add_argument(
        "--duckdb-timeout-s", type=float, default=3600.0, help="stop DuckDB after this long"
    )
    parser.add_argument("--no-duckdb", action="store_true", help="Spark only")
    parser.add_argument(
        "--activity", action="store_true", help="both builds with the activity features"
    )
    parser.add_argument("--keep", action="store_true", help="keep raw data and outputs")
    args = parser.parse_args(argv)
    if args.java_options is None:
        from etl.config import DRIVER_JAVA_OPTIONS

        args.java_options = DRIVER_JAVA_OPTIONS
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_file = args.work_dir / "results.json"
    by_size = {}
    if results_file.exists():
        by_size = {r["rows_requested"]: r for r in json.loads(results_file.read_text())}
    for rows in args.rows:
        by_size[rows] = bench_size(rows, args)
        results = [by_size[n] for n in sorted(by_size)]
        results_file.write_text(json.dumps(results, indent=2))
    print(markdown(results, args))
    print(f"\nresults: {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
