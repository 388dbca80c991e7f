"""The paper's Tables 2, 3 and 4 (section 4.2-4.3): every baseline, MKT and its ablations.

    python jobs/reproduce_tables.py --output runs/tables [--samples OUT_DIR | --users N]
                                    [--seeds 0 1 2] [--quick] [--config conf/run/X.yaml]
                                    [--oracle PATH] [--in-memory] [key=value ...]

Data: `--samples` is an OUT_DIR of etl/build_samples.py (generated or real Tenrec files);
without it the job generates Tenrec-format data (jobs/generate_tenrec.py, `--users`) and builds
the samples (spark-submit etl/build_samples.py) under OUTPUT/data, as jobs/quickstart.py does;
both steps are skipped when their output is already there.

Training: every (model, seed) is one train/run.py run - `train.pipeline.run_pipeline`, the same
code, in its own RUN_DIR, OUTPUT/runs/<model>/seed<k> - all inside one Ray session. The seeds
vary the run config's `seed` (weight init, file order, shuffle buffer); the data stay the same.
Two runs whose first stage would be trained identically (the source pre-training of
`finetune` and `ctnet`, with the same seed) share one training of it, in OUTPUT/stage1/<key>. Rerunning the command resumes: finished runs are skipped and
unfinished ones continue from their checkpoints.

`--in-memory` trains each (model, seed) in this process instead (jobs/in_memory.py: the samples
in memory, a full shuffle each epoch, the same early stopping), so a seed gives the same
numbers every time and the seeds' spread is training noise alone (two Ray runs of one config
differ by about 0.01 AUC from block order); each run still writes RUN_DIR/config.yaml,
metrics.json and the predictions table, evaluated by the runner's code (train/evaluate.py),
and a rerun skips finished runs. It suits data that fit in memory on a small machine.

Outputs in OUTPUT: tables.md (the three tables), table2.csv, table3.csv, table4.csv,
tables.png (Tables 2 and 4 as bars, error bars one standard deviation over the seeds) and
summary.json. Run config: conf/run/tables.yaml (conf/run/tables_quick.yaml with --quick, a
smoke run of a few minutes on tiny data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import build_samples_command, paired_gains, run_echoed, shown_path
from jobs.paper_tables import (
    ENTRIES,
    FINETUNE,
    MKT,
    SINGLE,
    TABLE2,
    TABLE4,
    Entry,
    best_single_domain,
    gains_markdown,
    gains_rows,
    plain,
    plot,
    table2,
    table2_markdown,
    table3,
    table3_markdown,
    table4,
    table4_markdown,
    write_csv,
)
from mkt.contract import SCHEMA_FILE, ConfigError
from mkt.metrics import activity_group_names
from mkt.pipelines import pipeline
from mkt.schema import FeatureSchema, SchemaError, load_samples_dir
from train.checks import (
    check_stage_params,
    prepare_run_dir,
    resolved_config,
    run_config_text,
)
from train.cluster import ray_session
from train.config import REPO_ROOT, load_run_config

RUN_CONFIG = REPO_ROOT / "conf" / "run" / "tables.yaml"
QUICK_RUN_CONFIG = REPO_ROOT / "conf" / "run" / "tables_quick.yaml"
# Sized so that the whole job (48 runs) fits about an hour on a 2-core machine: see
# docs/RESULTS.md ("Tables 2, 3 and 4").
DEFAULT_USERS = 8000
# The smoke run: tiny data whose like rates are raised (a documented generator knob, as in the
# end-to-end tests) so that a few hundred users still give test likes to rank.
QUICK_USERS = 400
QUICK_LIKE_RATES = ("--video-like-rate", "0.2", "--article-like-rate", "0.15")
MIN_SEEDS = 3  # mean and standard deviation need a few; fewer only with --quick
METRICS_FILE = "metrics.json"
STAGE1_DIR = "stage1"
LOG_PREFIX = "[tables]"
# Each (entry, seed) to run, with its checked run config.
Planned = Sequence[tuple[Entry, int, dict[str, Any]]]
# Trains one (entry, seed, config) into its RUN_DIR, which must end holding metrics.json.
TrainOne = Callable[[Entry, int, dict[str, Any], Path], None]


# ---------------------------------------------------------------------------------------------
# Runs


def select_entries(keys: Sequence[str] | None) -> tuple[Entry, ...]:
    """The entries named by --models, in the tables' order; all of them without --models."""
    if not keys:
        return ENTRIES
    known = [e.key for e in ENTRIES]
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; known: {' '.join(known)}")
    if MKT not in keys:
        raise ConfigError("--models: mkt must be among them (every table compares with it)")
    return tuple(e for e in ENTRIES if e.key in keys)


def run_configs(
    entries: Sequence[Entry],
    seeds: Sequence[int],
    config_path: Path,
    overrides: Sequence[str],
) -> list[tuple[Entry, int, dict[str, Any]]]:
    """Every (entry, seed) with its checked run config, seed-major: the first seed's whole
    table comes first, so an early look (or an interruption) already sees every model."""
    planned = []
    for seed in seeds:
        for entry in entries:
            config = load_run_config(config_path, [*entry.overrides, *overrides, f"seed={seed}"])
            check_stage_params(config)
            planned.append((entry, seed, resolved_config(config)))
    return planned


def run_dir_of(output: Path, entry: Entry, seed: int) -> Path:
    return output / "runs" / entry.key / f"seed{seed}"


def shared_first_stages(planned: Planned, fingerprint: str) -> dict[tuple[str, int], str]:
    """The cache key of each run's first stage when another run's first stage would be trained
    identically (`train.stage1_cache.stage1_material`: samples, stage, model parameters, training
    settings, seed, workers), keyed by (entry, seed)."""
    from train.stage import use_gpu
    from train.stage1_cache import stage1_key, stage1_material

    keys = {
        (entry.key, seed): stage1_key(
            stage1_material(config, pipeline(config["model"])[0], fingerprint, use_gpu(config))
        )
        for entry, seed, config in planned
    }
    counts: dict[str, int] = {}
    for key in keys.values():
        counts[key] = counts.get(key, 0) + 1
    return {run: key for run, key in keys.items() if counts[key] > 1}


def finished_runs(planned: Planned, output: Path) -> dict[str, list[dict[str, Any]]]:
    """The metrics.json of every planned run that has finished, by entry."""
    results: dict[str, list[dict[str, Any]]] = {}
    for entry, seed, _ in planned:
        path = run_dir_of(output, entry, seed) / METRICS_FILE
        if path.is_file():
            results.setdefault(entry.key, []).append(json.loads(path.read_text()))
    return results


def eta(durations: Mapping[str, list[float]], remaining: Sequence[str]) -> float:
    """Seconds left: each remaining run as long as the same model took before in this
    invocation, else as the mean run so far."""
    every = [d for ds in durations.values() for d in ds]
    if not every:
        return math.nan
    mean = float(np.mean(every))
    return sum(float(np.mean(durations[k])) if durations.get(k) else mean for k in remaining)


def _json_number(value: Any) -> Any:
    """numpy scalars in an in-memory run's history -> Python numbers."""
    return value.item()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_each(
    planned: Planned, output: Path, train_one: TrainOne, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Every planned run not finished yet, with progress and ETA; returns each entry's
    metrics.json per seed."""
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    durations: dict[str, list[float]] = {}
    for k, (entry, seed, config) in enumerate(planned, 1):
        run_dir = run_dir_of(output, entry, seed)
        metrics_path = run_dir / METRICS_FILE
        if metrics_path.is_file():
            log(f"run {k}/{len(planned)}: {entry.key} seed {seed} already finished")
        else:
            remaining = [
                e.key
                for e, s, _ in planned[k:]
                if not (run_dir_of(output, e, s) / METRICS_FILE).is_file()
            ]
            log(
                f"run {k}/{len(planned)}: {entry.key} seed {seed} "
                f"({' '.join(entry.overrides)}); elapsed {_clock(time.monotonic() - started)}, "
                f"ETA {_clock(eta(durations, [entry.key, *remaining]))}"
            )
            run_started = time.monotonic()
            train_one(entry, seed, config, run_dir)
            seconds = time.monotonic() - run_started
            durations.setdefault(entry.key, []).append(seconds)
            log(f"run {k}/{len(planned)}: {entry.key} seed {seed} done in {seconds:.0f} s")
        results.setdefault(entry.key, []).append(json.loads(metrics_path.read_text()))
    log(f"all {len(planned)} runs done; elapsed {_clock(time.monotonic() - started)}")
    return results


def run_all(
    planned: Planned,
    samples_dir: Path,
    output: Path,
    oracle: str | None,
    log: Callable[[str], None],
) -> dict[str, list[dict[str, Any]]]:
    """Every planned run by train/run.py's pipeline, inside one Ray session."""
    with ray_session(planned[0][2]):
        # Imported only now: Ray's environment is set before Ray is first imported.
        from train.pipeline import run_pipeline
        from train.stage1_cache import cached_first_stage, samples_fingerprint

        fingerprint = samples_fingerprint(samples_dir)
        shared = shared_first_stages(planned, fingerprint)
        invocation = {"samples": str(samples_dir), "oracle": oracle}

        def train_one(entry: Entry, seed: int, config: dict[str, Any], run_dir: Path) -> None:
            prepare_run_dir(run_dir, run_config_text(config, invocation))
            if (entry.key, seed) in shared:
                cached_first_stage(
                    pipeline(config["model"])[0],
                    config,
                    FeatureSchema.load(samples_dir),
                    samples_dir,
                    run_dir,
                    output / STAGE1_DIR,
                    fingerprint,
                )
            run_pipeline(config, samples_dir, run_dir, oracle)

        return run_each(planned, output, train_one, log)


def run_all_in_memory(
    planned: Planned,
    samples_dir: Path,
    output: Path,
    oracle: str | None,
    log: Callable[[str], None],
) -> dict[str, list[dict[str, Any]]]:
    """Every planned run trained by jobs/in_memory.py (one process, the samples in memory, the
    same seed giving the same numbers), scored into the same predictions table and evaluated by
    the same code as a runner's run; Ray serves only the evaluation's reads."""
    invocation = {"samples": str(samples_dir), "oracle": oracle, "trainer": "in_memory"}
    with ray_session(planned[0][2]):
        # Imported only now (they import Ray): Ray's environment is set before Ray is imported.
        import torch
        from deltalake import write_deltalake

        from jobs.in_memory import Samples, run_seed
        from train.evaluate import PREDICTIONS_DIR, evaluate_predictions, oracle_path
        from train.pipeline import started_at_commit

        torch.set_num_threads(1)
        schema = FeatureSchema.load(samples_dir)
        samples = Samples(samples_dir, schema)
        truth = oracle_path(schema, oracle)

        def train_one(entry: Entry, seed: int, config: dict[str, Any], run_dir: Path) -> None:
            prepare_run_dir(run_dir, run_config_text(config, invocation))
            history, trained = run_seed(
                samples, {**config, "schema_user_key": schema.columns["user_key"]}, seed, "both"
            )
            final = trained[pipeline(config["model"])[-1].name]
            predictions = run_dir / PREDICTIONS_DIR
            write_deltalake(str(predictions), samples.predictions(final), mode="overwrite")
            metrics = {
                "model": config["model"],
                "trainer": "in_memory",
                "code_commit": started_at_commit(run_dir),
                "seed": seed,
                "train": config["train"],
                "params": config["params"],
                "samples": str(samples_dir),
                "history_mode": schema.history_mode,
                "oracle": str(truth) if truth else None,
                "stages": history,
                "test": evaluate_predictions(samples_dir, schema, predictions, config, truth),
            }
            (run_dir / METRICS_FILE).write_text(
                json.dumps(plain(metrics), indent=1, default=_json_number)
            )

        return run_each(planned, output, train_one, log)


# ---------------------------------------------------------------------------------------------
# Data


def prepare_samples(data_dir: Path, users: int, data_seed: int, quick: bool) -> Path:
    """Generated raw data and its samples under data_dir, each made only if missing."""
    raw, samples = data_dir / "raw", data_dir / "samples"
    if not (raw / "oracle.parquet").is_file():
        run_echoed(
            [
                sys.executable,
                "jobs/generate_tenrec.py",
                "--output",
                str(raw),
                "--users",
                str(users),
                "--seed",
                str(data_seed),
                *(QUICK_LIKE_RATES if quick else ()),
            ]
        )
    if not (samples / SCHEMA_FILE).is_file():
        run_echoed(build_samples_command(raw, samples))
    return samples


def data_summary(samples_dir: Path) -> dict[str, Any]:
    """Rows, users and likes per entity and split, from the ETL's etl_summary.json."""
    path = samples_dir / "etl_summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    return {
        entity: {
            split: {
                "rows": s["rows"],
                "users": s["users"],
                "likes": round(s["rows"] * s["like_rate"]),
            }
            for split, s in e["splits"].items()
        }
        for entity, e in summary["entities"].items()
    }


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="directory of every output")
    parser.add_argument("--samples", type=Path, help="OUT_DIR of etl/build_samples.py")
    parser.add_argument(
        "--users",
        type=int,
        help=f"generated users ({DEFAULT_USERS}; quick: {QUICK_USERS}); only without --samples",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (0 1 2; quick: 0)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch")
    parser.add_argument("--config", type=Path, help="run config (conf/run/tables[_quick].yaml)")
    parser.add_argument("--oracle", help="oracle.parquet (default: beside the raw input)")
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="KEY",
        help="train only these entries (mkt among them), e.g. on data too large for all 15: "
        f"{' '.join(e.key for e in ENTRIES)}",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the tables of the runs finished so far (while a job runs, or after "
        "an interrupted one)",
    )
    parser.add_argument(
        "--in-memory",
        action="store_true",
        help="train each run in one process on samples held in memory (jobs/in_memory.py: "
        "deterministic per seed, no Ray training noise); the samples must fit in memory",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(range(MIN_SEEDS))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if not args.quick and len(args.seeds) < MIN_SEEDS:
        parser.error(f"--seeds: at least {MIN_SEEDS} (fewer only with --quick)")
    if args.samples and args.users:
        parser.error("--users generates data; it cannot go with --samples")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    output = args.output.resolve()
    config_path = args.config or (QUICK_RUN_CONFIG if args.quick else RUN_CONFIG)
    # Every run's config is checked before data are generated or Ray starts.
    entries = select_entries(args.models)
    planned = run_configs(entries, args.seeds, config_path, args.overrides)
    if args.samples:
        samples_dir = args.samples.resolve()
    else:
        users = args.users or (QUICK_USERS if args.quick else DEFAULT_USERS)
        samples_dir = prepare_samples(output / "data", users, args.data_seed, args.quick)
    load_samples_dir(samples_dir)
    oracle = str(Path(args.oracle).resolve()) if args.oracle else None

    def log(line: str) -> None:
        print(f"{LOG_PREFIX} {line}", flush=True)

    if args.report_only:
        results = finished_runs(planned, output)
        log(f"tables of the {sum(map(len, results.values()))} finished runs of {len(planned)}")
    else:
        trainer = run_all_in_memory if args.in_memory else run_all
        results = trainer(planned, samples_dir, output, oracle, log)
    t2 = table2(results, [e for e in entries if e in TABLE2])
    labels = {e.key: e.label for e in ENTRIES}
    # Table 3 compares the best single-domain model, Finetune and MKT: only when all were run.
    run_keys = {e.key for e in entries}
    has_single = any(e.group == SINGLE for e in entries)
    single = best_single_domain(t2, "gauc") if has_single and FINETUNE in run_keys else None
    groups = activity_group_names(planned[0][2]["eval"]["activity_boundaries"])
    t3 = table3(results, single, groups, labels) if single else []
    t4 = table4(results, [e for e in entries if e in TABLE4])
    for name, rows in (("table2", t2), ("table3", t3), ("table4", t4)):
        if rows:
            write_csv(output / f"{name}.csv", rows)
    plot(t2, t4, output / "tables.png")
    # MKT against every other model on the same test rows: whether a difference is more than
    # the test set's noise (the seeds' spread above is the training's).
    complete = {
        e.key: [run_dir_of(output, e, seed) for seed in args.seeds]
        for e in entries
        if len(results.get(e.key, ())) == len(args.seeds)
    }
    g = gains_rows(paired_gains(samples_dir, complete, MKT), labels) if MKT in complete else []
    if g:
        write_csv(output / "gains.csv", g)
    data = data_summary(samples_dir)
    wall = time.monotonic() - started
    text = "\n\n".join(
        [
            f"Target-entity test metrics; mean ± sample std over training seeds {args.seeds} "
            f"(data fixed). Samples: {shown_path(samples_dir)}",
            "## Table 2: every model",
            table2_markdown(t2),
            (
                f"## Table 3: by user activity (best single-domain model by mean test GAUC: "
                f"{labels[single]})\n\n{table3_markdown(t3, single)}"
                if single
                else "## Table 3: not built (it needs a single-domain model and Finetune)"
            ),
            "## Table 4: ablations (change against full MKT)",
            table4_markdown(t4),
            "## MKT minus each model: paired bootstrap over the test users (1000 resamples; "
            "each model's mean over its seeds; * the 95% interval excludes 0)",
            gains_markdown(g),
        ]
    )
    (output / "tables.md").write_text(text + "\n")
    summary = {
        "samples": str(samples_dir),
        "seeds": args.seeds,
        "quick": args.quick,
        "report_only": args.report_only,  # then wall_s is the tables' time, not the training's
        "trainer": "in_memory" if args.in_memory else "ray",
        "config": str(config_path),
        "overrides": args.overrides,
        "data": data,
        "wall_s": round(wall, 1),
        "best_single_domain": single,
        "table2": t2,
        "table3": t3,
        "table4": t4,
        "gains": g,
    }
    (output / "summary.json").write_text(json.dumps(plain(summary), indent=1))
    print("\n" + text)
    print(
        f"\nDone in {wall / 60:.1f} min. Tables: {output / 'tables.md'}, "
        f"{output / 'tables.png'}; runs: {output / 'runs'}"
    )
    return summary


def cli() -> None:
    """The command line, also installed as `mkt-tables` (pyproject.toml)."""
    try:
        main()
    except (ConfigError, SchemaError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
