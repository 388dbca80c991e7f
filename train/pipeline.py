"""A whole run: every stage of the configured pipeline, then evaluation and the run's files.

Stage by stage (mkt.pipelines): a stage that continues others (`pretrained_from`, e.g. TEM
from MEM and TEM alone) trains its model on top of their best checkpoints. A stage this RUN_DIR
already finished is not trained again, so rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import yaml

from mkt.pipelines import pipeline
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, chain_on
from train.config import code_commit
from train.evaluate import evaluate_run, oracle_path
from train.report import console_summary, write_outputs
from train.stage import StageResult, finished, run_stage, use_gpu
from train.tracking import RUN_ARTIFACTS, Tracker, flat_test_metrics


def started_at_commit(run_dir: Path) -> str | None:
    """The commit RUN_DIR/config.yaml recorded when the run started (a commit made while it
    trained is not the code that trained it); the current one if there is no such file."""
    recorded = run_dir / "config.yaml"
    if recorded.exists():
        return (yaml.safe_load(recorded.read_text()) or {}).get("code_commit")
    return code_commit()


def open_tracker(
    config: dict[str, Any], run_dir: Path, parent: str | None = None
) -> Tracker | None:
    """RUN_DIR's MLflow run (train.tracking), nested under `parent`; None when tracking is off."""
    tags = {"model": config["model"], "code_commit": started_at_commit(run_dir) or "unknown"}
    return Tracker.open(config["tracking"], run_dir, config, tags, parent)


def run_pipeline(
    config: dict[str, Any],
    samples_dir: Path,
    run_dir: Path,
    oracle: str | None = None,
    tracking_parent: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and write RUN_DIR's files; returns what metrics.json holds. With
    tracking on, the run goes to MLflow too (a sweep's trial nested under `tracking_parent`)."""
    tracker = open_tracker(config, run_dir, tracking_parent)
    if tracker is None:
        return _run(config, samples_dir, run_dir, oracle, None)
    try:
        metrics = _run(config, samples_dir, run_dir, oracle, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.log(flat_test_metrics(metrics["test"]), RUN_ARTIFACTS)
    tracker.end("FINISHED")
    return metrics


def _run(
    config: dict[str, Any],
    samples_dir: Path,
    run_dir: Path,
    oracle: str | None,
    tracker: Tracker | None,
) -> dict[str, Any]:
    started = time.monotonic()
    schema = FeatureSchema.load(samples_dir)
    truth = oracle_path(schema, oracle)
    stages = pipeline(config["model"])
    print(
        f"[run] {config['model']}: {' then '.join(s.name for s in stages)}, on {samples_dir}, "
        f"into {run_dir}",
        flush=True,
    )
    results: list[StageResult] = []
    chains: dict[str, list[ModelLink]] = {}
    for stage in stages:
        bases = [chains[name] for name in stage.built_on]
        result = finished(stage, config, run_dir)
        if result is None:
            link = ModelLink(stage.model, config["params"].get(stage.name, {}))
            result = run_stage(stage, config, schema, samples_dir, run_dir, chain_on(bases, link))
        else:
            print(f"[{stage.name}] already trained in {run_dir}; using its best checkpoint")
        chains[stage.name] = chain_on(bases, result.link)
        results.append(result)
        if tracker is not None:
            tracker.log_stage(stage.name, stage.model, result.link.params, result.state.history)
    print(
        f"[eval] scoring the {schema.target_entity} test rows with {stages[-1].name}'s best "
        "checkpoint",
        flush=True,
    )
    test = evaluate_run(samples_dir, schema, chains[stages[-1].name], run_dir, config, truth)
    header = {
        "model": config["model"],
        "code_commit": started_at_commit(run_dir),
        "seed": config["seed"],
        "train": config["train"],
        "samples": str(samples_dir),
        # Which likes the test rows' sequences may hold (docs/etl.md): results must say it.
        "history_mode": schema.history_mode,
        "seq_len": schema.seq_len,
        "oracle": str(truth) if truth else None,
        "num_workers": config["scaling"]["num_workers"],
        "cpus_per_worker": config["scaling"]["cpus_per_worker"],
        "use_gpu": use_gpu(config),
        "early_stopping_metric": config["train"]["early_stopping"]["metric"],
        "ray_nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}),
    }
    metrics = write_outputs(run_dir, header, results, test)
    print(console_summary(metrics, run_dir, time.monotonic() - started), flush=True)
    return metrics
