"""The Ray side of train/tune.py: the trial, the shared stage-1 cache, the Tuner and its files.

A trial is `train.pipeline.run_pipeline` (train/run.py's code) in its own RUN_DIR,
SWEEP_DIR/trials/<trial id>. Inside a Tune trial, `train.stage.run_stage` fits its TorchTrainer
directly, and Train's `TuneReportCallback` hands every epoch's validation report to the trial:
the scheduler sees one report per epoch of every stage, then the trial's last report, the
pipeline's score (the last stage's best-checkpoint validation metric).

Stage 1 (MEM) depends on fewer settings than the pipeline: trials that agree on all of them
(e.g. that differ only in TEM parameters) share one, trained once in SWEEP_DIR/stage1/<key>
under a file lock and linked into each trial's RUN_DIR; so does every stage before the first
one built on another (MKT's TEM alone). Epochs a trial takes from there (or
from its own RUN_DIR, after an interruption) are reported again before training goes on, so a
trial's k-th report means the same whether its epochs were trained now or earlier.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from mkt.pipelines import Stage, pipeline
from mkt.schema import FeatureSchema
from train.checks import prepare_run_dir, resolved_config, run_config_text
from train.cluster import cluster_address
from train.loop import SCORE
from train.pipeline import open_tracker, run_pipeline
from train.report import METRICS_FILE
from train.stage import CHECKPOINTS_DIR, use_gpu
from train.stage1_cache import cached_first_stage, recorded_history, samples_fingerprint
from train.sweep_config import expected_trials, max_reports, trial_run_config
from train.sweep_report import TRIALS_DIR, TrialRow, write_sweep_outputs
from train.tracking import SWEEP_ARTIFACTS, Tracker, end_unfinished

EXPERIMENT = "tune"
STAGE1_DIR = "stage1"
# Trials at once, as the sweep first started (Tuner.restore keeps that number on a resume).
CONCURRENCY_FILE = "concurrency.json"
# Key of a trial's last report, present once its whole pipeline finished and was evaluated.
DONE = "pipeline_done"
INTERRUPT_MARKER = ".interrupt-drill"
# A trial only waits on its stages' trainers; a sliver of a CPU keeps it from taking a core
# from the workers or the data path (Tune refuses an empty resource request).
TRIAL_RESOURCES = {"CPU": 0.01}


# ---------------------------------------------------------------------------------------------
# Stage-1 cache


def _replay(history: Sequence[Mapping[str, Any]]) -> None:
    for metrics in history:
        tune.report(dict(metrics))


def shared_stage(
    stage: Stage,
    config: dict[str, Any],
    schema: FeatureSchema,
    samples_dir: Path,
    run_dir: Path,
    context: Mapping[str, Any],
) -> str:
    """A stage of the trial from the sweep's stage-1 cache, its epochs reported to Tune again;
    returns "trained" or "cached"."""
    return cached_first_stage(
        stage,
        config,
        schema,
        samples_dir,
        run_dir,
        Path(context["stage1_cache"]),
        context["fingerprint"],
        on_history=_replay,
    )


# ---------------------------------------------------------------------------------------------
# The trial


def _plain(value: Any) -> Any:
    """Tune samples numpy scalars; the run config (and YAML) wants Python ones."""
    return value.item() if hasattr(value, "item") else value


def pipeline_trial(sampled: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: train/run.py's pipeline with the trial's values, in its own RUN_DIR."""
    config = trial_run_config(
        context["base"], {k: _plain(v) for k, v in sampled.items()}, context["metric"]
    )
    run_dir = Path(context["output"]) / TRIALS_DIR / tune.get_context().get_trial_id()
    samples_dir = Path(context["samples"])
    config = resolved_config(config)
    prepare_run_dir(run_dir, run_config_text(config, context["invocation"]))
    # Opened before stage 1, so that a trial the scheduler stops there has its MLflow run too.
    open_tracker(config, run_dir, context["tracking_parent"])
    stages = pipeline(config["model"])
    stage1 = "none"
    if len(stages) > 1:
        schema = FeatureSchema.load(samples_dir)
        # The stages before the first one built on another train on nothing a trial's later
        # stages change: trials that agree on their settings share them (MKT: the MEM and
        # TEM alone). The column reports the first.
        shared = list(itertools.takewhile(lambda s: not s.built_on, stages[:-1]))
        got = [shared_stage(s, config, schema, samples_dir, run_dir, context) for s in shared]
        stage1 = got[0]
        stages = stages[len(shared) :]
    for stage in stages:
        _replay(recorded_history(run_dir / CHECKPOINTS_DIR / stage.name))
    metrics = run_pipeline(
        config, samples_dir, run_dir, context["oracle"], context["tracking_parent"]
    )
    best = metrics["stages"][-1]["best_valid"]
    value = best.get(f"valid_{context['metric']}")
    tune.report(
        {
            # As the loop ranks checkpoints: NaN (one class only) ranks last.
            SCORE: value if value is not None and math.isfinite(value) else -1.0,
            "valid_auc": best.get("valid_auc"),
            "valid_gauc": best.get("valid_gauc"),
            "stage1": stage1,
            DONE: True,
        }
    )


def _trial_dirname(trial: Trial) -> str:
    return trial.trial_id


# ---------------------------------------------------------------------------------------------
# Driver


def param_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """conf/tune search-space entries as Tune domains, keyed by the dotted run-config key."""
    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {key: makers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


def trial_concurrency(sweep: Mapping[str, Any]) -> int:
    """Trials at once: the configured number, else the free CPUs over a trial's cores (each
    worker keeps `torch_threads` cores busy), and no more than the free GPUs allow."""
    if sweep["max_concurrent_trials"] is not None:
        return sweep["max_concurrent_trials"]
    run = sweep["run"]
    scaling = run["scaling"]
    free = ray.available_resources()
    cpus = free.get("CPU", 0.0)
    if cluster_address(run) is None:
        # The embedded Ray declares ray.num_cpus logical CPUs, more than the cores on purpose
        # (fractional workers beside Ray Data's tasks); trials need real cores.
        cpus = min(cpus, len(os.sched_getaffinity(0)))
    trials = int(cpus // (scaling["num_workers"] * scaling["torch_threads"]))
    if use_gpu(run):
        trials = min(trials, int(free.get("GPU", 0.0) // scaling["num_workers"]))
    return max(1, trials)


def sweep_concurrency(sweep: Mapping[str, Any], output: Path, resuming: bool) -> int:
    """The trials at once this sweep runs: on a first start `trial_concurrency`, stored in
    SWEEP_DIR; on a resume the stored number, since Tuner.restore keeps the Tuner's first
    `max_concurrent_trials` whatever the cluster has free now."""
    path = output / CONCURRENCY_FILE
    if resuming and path.is_file():
        return int(json.loads(path.read_text())["max_concurrent_trials"])
    # Resuming without the file (a sweep started before it existed): today's number, a guess
    # of what was used, and not stored as if it were.
    concurrency = trial_concurrency(sweep)
    if not resuming:
        path.write_text(json.dumps({"max_concurrent_trials": concurrency}) + "\n")
    return concurrency


def make_scheduler(sweep: Mapping[str, Any]) -> TrialScheduler:
    opts = sweep["scheduler"]
    if opts["name"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_reports(sweep),
        grace_period=opts["grace_period"],
        reduction_factor=opts["reduction_factor"],
    )


class SweepProgress(tune.Callback):
    """A line on the driver's console for every report and every ended trial: trials ended,
    running, and the best score so far."""

    def __init__(self, total: int, keys: Sequence[str]) -> None:
        self.total = total
        self.keys = list(keys)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        done = bool(result.get(DONE))
        what = "finished" if done else f"report {result['training_iteration']}"
        event = f"{trial.trial_id} {what}: {SCORE} {result[SCORE]:.4f}"
        self._line(trials, event, trial if done else None, result)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        if not trial.last_result.get(DONE):  # a finished pipeline was announced with its result
            self._line(trials, f"{trial.trial_id} stopped by the scheduler", trial)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._line(trials, f"{trial.trial_id} failed", trial)

    def _line(
        self,
        trials: list[Trial],
        event: str,
        ending: Trial | None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        # Tune updates a trial's last result and status only after these callbacks.
        last = {t.trial_id: t.last_result or {} for t in trials}
        if result is not None and ending is not None:
            last[ending.trial_id] = result
        ended = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR) or t is ending]
        running = sum(t.status == Trial.RUNNING and t is not ending for t in trials)
        done = [t for t in ended if last[t.trial_id].get(DONE)]
        best = max(done, key=lambda t: last[t.trial_id][SCORE], default=None)
        leader = "none finished yet"
        if best is not None:
            values = ", ".join(f"{k}={best.config.get(k)}" for k in self.keys)
            leader = f"{last[best.trial_id][SCORE]:.4f} ({values})"
        print(
            f"[sweep] {len(ended)}/{self.total} ended ({len(done)} finished), {running} "
            f"running; best so far {leader} | {event}",
            flush=True,
        )


class InterruptAfterTrials(tune.Callback):
    """Fault drill (tests): once, when `count` trials have ended, interrupt the sweep as Ctrl-C
    does; Tune then saves its state and stops, and rerunning the command must resume."""

    def __init__(self, count: int, marker: Path) -> None:
        self.count = count
        self.marker = marker

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        ended = sum(t.status == Trial.TERMINATED for t in trials if t is not trial) + 1
        if ended >= self.count and not self.marker.exists():
            self.marker.write_text(f"interrupted after {ended} trial(s)\n")
            os.kill(os.getpid(), signal.SIGINT)


def run_sweep(
    sweep: dict[str, Any], samples_dir: Path, output: Path, oracle: str | None
) -> dict[str, Any]:
    """Run or resume the sweep in `output`, then write its files; returns the summary."""
    experiment = output / EXPERIMENT
    tracking = sweep["run"]["tracking"]
    tracker = Tracker.open(tracking, output, sweep, {"model": sweep["run"]["model"]})
    context = {
        "base": sweep["run"],
        "metric": sweep["metric"],
        "samples": str(samples_dir),
        "output": str(output),
        "oracle": oracle,
        "invocation": {"samples": str(samples_dir), "oracle": oracle},
        "fingerprint": samples_fingerprint(samples_dir),
        "stage1_cache": sweep["stage1_cache"] or str(output / STAGE1_DIR),
        "tracking_parent": tracker.run_id if tracker else None,
    }
    trainable = tune.with_resources(
        tune.with_parameters(pipeline_trial, context=context), TRIAL_RESOURCES
    )
    resuming = tune.Tuner.can_restore(str(experiment))
    concurrency = sweep_concurrency(sweep, output, resuming)
    keys = list(sweep["search_space"])
    if resuming:
        print(
            f"[sweep] resuming {experiment}: finished trials are kept; {concurrency} trial(s) "
            "at a time, as first started",
            flush=True,
        )
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        callbacks = [TBXLoggerCallback(), SweepProgress(expected_trials(sweep), keys)]
        drill = sweep["fault"]["interrupt_after_trials"]
        if drill is not None:
            callbacks.append(InterruptAfterTrials(drill, output / INTERRUPT_MARKER))
        print(
            f"[sweep] {expected_trials(sweep)} trial(s), {concurrency} at a time, "
            f"scheduler {sweep['scheduler']['name']}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep["search_space"]),
            tune_config=tune.TuneConfig(
                metric=SCORE,
                mode="max",
                scheduler=make_scheduler(sweep),
                num_samples=sweep["num_samples"],
                max_concurrent_trials=concurrency,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(output),
                callbacks=callbacks,
                # Train retries failed workers within a stage; a failed trial is reported.
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    tuner.fit()
    trials = collect_trials(experiment, output, keys)
    summary = write_sweep_outputs(sweep, output, samples_dir, trials, concurrency)
    if tracker is not None:
        ended = {"stopped": "KILLED", "failed": "FAILED"}
        for row in trials:
            if row.status in ended:
                last = {"last_score": row.last_score, "reports": row.reports}
                end_unfinished(tracking, row.run_dir, ended[row.status], last)
        best = summary["best"]
        numbers = {k: summary[k] for k in ("finished", "stopped", "failed", "unfinished")}
        if best is not None:
            numbers.update(best_valid_score=best["valid"].get(f"valid_{sweep['metric']}"))
        tracker.log(numbers, SWEEP_ARTIFACTS)
        # An interrupted sweep's run ends KILLED; resuming the sweep reopens it.
        tracker.end("KILLED" if summary["unfinished"] else "FINISHED")
    return summary


# ---------------------------------------------------------------------------------------------
# Outputs


def collect_trials(experiment: Path, output: Path, keys: Sequence[str]) -> list[TrialRow]:
    rows = []
    for trial in tune.ExperimentAnalysis(str(experiment)).trials:
        last = trial.last_result or {}
        done = bool(last.get(DONE))
        if trial.status == Trial.ERROR:
            status = "failed"
        elif trial.status == Trial.TERMINATED:
            status = "finished" if done else "stopped"
        else:
            status = "unfinished"
        run_dir = output / TRIALS_DIR / trial.trial_id
        metrics_file = run_dir / METRICS_FILE
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                values={k: _plain(trial.config.get(k)) for k in keys},
                status=status,
                reports=int(last.get("training_iteration", 0)),
                last_score=last.get(SCORE),
                run_dir=run_dir,
                stage1=str(last.get("stage1", "")) if done else "",
                metrics=json.loads(metrics_file.read_text()) if done else {},
            )
        )
    order = {"finished": 0, "stopped": 1, "unfinished": 2, "failed": 3}
    rows.sort(key=lambda r: (order[r.status], -(r.last_score or -math.inf), r.trial_id))
    return rows
