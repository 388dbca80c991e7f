"""A Tenrec-size run on one machine: the generator at Tenrec's vocabularies, the Spark ETL, and
one MEM epoch and one TEM epoch streamed from the Delta table, each phase timed and its
processes' memory sampled.

    python benchmarks/bench_tenrec_size.py --work-dir DIR [--users 5000000] [--from generate]
                                           [--output runs/bench_tenrec_size.json] [key=value ...]

Tenrec (the paper's Table 1): 5M users, 1.9M video items, 0.2M article items, 142M + 46M rows.
The generator is run with Tenrec's users and items per user and fewer rows per user (about 4,
for some 20M rows), so the tables have Tenrec's sizes and the rows fit this machine
(docs/generator.md), and the ETL keeps every id (`min_count` 1). The training run is `train/run.py model=mkt` with sparse embedding
gradients and one epoch a stage; `key=value` arguments are laid over it. Reported per phase:
wall time, each process's peak PSS (the kernel's proportional set size, so shared pages are
not counted twice) and the tree's; then rows, rows/s per stage and the tables' size on disk.
docs/BENCHMARKS.md ("A Tenrec-size run") records the figures, docs/SCALING.md extrapolates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_streaming import _name, sample_memory
from jobs.common import DATA_CONFIG, build_samples_command, spark_env, train_command
from jobs.min_count_sweep import data_config

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
PHASES = ("generate", "etl", "train")
# Tenrec's items per user (1.9M / 5M video, 0.2M / 5M article) and rows per user scaled down
# from the generator's default 23 video + 8 article to about 3 + 1.3.
GENERATOR_SIZE = {
    "--video-items-per-user": "0.38",
    "--article-items-per-user": "0.04",
    "--video-rows-median": "1.0",
    "--article-rows-median": "1.5",
}
TRAIN_OVERRIDES = ["model=mkt", "train.epochs=1", "train.sparse_embeddings=true"]


def run_phase(name: str, command: list[str], log_path: Path, interval_s: float) -> dict[str, Any]:
    """Run `command`, sampling its process tree's memory until it ends."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.time()
    env = {**spark_env(), "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
        )

        def echo() -> None:
            for line in process.stdout:  # type: ignore[union-attr]
                log.write(line)
                if "rows/s" in line or "start:" in line or "done" in line or "error" in line:
                    print(f"   {line.rstrip()[-150:]}", flush=True)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        seen: dict[int, str] = {}
        peaks: dict[int, tuple[str, int]] = {}
        tree_peak = {"pss": 0, "rss": 0}
        while process.poll() is None:
            sample = sample_memory(process.pid, seen)
            for pid, value in sample.pop("pss_by_process").items():
                if value > peaks.get(pid, ("", -1))[1]:
                    peaks[pid] = (_name(pid), value)
            for key in tree_peak:
                tree_peak[key] = max(tree_peak[key], sample[key])
            time.sleep(interval_s)
        reader.join(timeout=30)
    wall = time.time() - started
    print(f"   {name} done in {wall:.0f} s (exit {process.returncode})", flush=True)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed with exit {process.returncode}; see {log_path}")
    top = sorted(peaks.values(), key=lambda p: -p[1])[:6]
    return {
        "wall_s": round(wall, 1),
        "tree_peak_pss_gib": round(tree_peak["pss"] / GIB, 2),
        "tree_peak_rss_gib": round(tree_peak["rss"] / GIB, 2),
        "process_peaks_gib": [{"name": n, "peak_pss": round(v / GIB, 2)} for n, v in top],
    }


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summary(work: Path, phases: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": phases}
    raw, samples = work / "raw", work / "samples"
    if raw.is_dir():
        out["raw_gib"] = round(disk_bytes(raw) / GIB, 2)
    schema_path = samples / "feature_schema.json"
    if schema_path.exists():
        schema = json.loads(schema_path.read_text())
        out["rows"] = schema["counts"]
        out["vocab_sizes"] = {
            f["name"]: f["vocab_size"] for f in schema["features"] if "vocab_size" in f
        }
        out["samples_gib"] = round(disk_bytes(samples / "samples") / GIB, 2)
    metrics_path = work / "run" / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        keys = ("train_rows", "train_seconds", "rows_per_s", "valid_rows", "valid_auc")
        out["stages"] = {
            stage["name"]: {key: stage["history"][-1].get(key) for key in keys}
            for stage in metrics["stages"]
        }
        out["test"] = {k: metrics["test"]["model"].get(k) for k in ("rows", "auc", "gauc")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--users", type=int, default=5_000_000)
    parser.add_argument("--from", dest="start", choices=PHASES, default="generate")
    parser.add_argument("--driver-memory", default="8g", help="the Spark driver's (local[2])")
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=Path("runs/bench_tenrec_size.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    generate = [sys.executable, "jobs/generate_tenrec.py", "--output", str(work / "raw")]
    generate += ["--users", str(args.users), "--seed", "0"]
    generate += [x for pair in GENERATOR_SIZE.items() for x in pair]
    # Every id kept (min_count 1): at ~4 rows a user the default threshold (5) would fold most
    # users into OOV, where Tenrec's ~37 rows a user keep them; the tables must be Tenrec's.
    config_path = data_config(DATA_CONFIG, 1, work / "data.yaml")
    etl = build_samples_command(work / "raw", work / "samples", config_path)
    etl[1:1] = ["--driver-memory", args.driver_memory]
    config = REPO / "conf" / "run" / "default.yaml"
    train = train_command(work / "samples", work / "run", config, TRAIN_OVERRIDES + args.overrides)
    commands = {"generate": generate, "etl": etl, "train": train}
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    phases = dict(previous.get("phases", {}))
    for name in PHASES[PHASES.index(args.start) :]:
        phases[name] = run_phase(name, commands[name], work / f"{name}.log", args.interval_s)
        phases[name]["command"] = " ".join(commands[name])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary(work, phases), indent=1))
    print(json.dumps(summary(work, phases), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
