"""What a sweep leaves for people: trials.csv, summary.md (every trial, and the best one's test
metrics), best_config.yaml and metric.png, from the trials' rows and their RUN_DIRs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from train.checks import CONFIG_FILE
from train.config import dump, load_yaml
from train.report import SUMMARY_FILE, results_table
from train.sweep_config import expected_trials

TRIALS_DIR = "trials"  # one train/run.py RUN_DIR per trial
TABLE_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"
PLOT_FILE = "metric.png"


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]  # the trial's search-space values
    status: str  # finished | stopped (by the scheduler) | failed | unfinished
    reports: int
    last_score: float | None
    run_dir: Path
    stage1: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # the trial's metrics.json

    @property
    def valid(self) -> dict[str, Any]:
        """The last stage's best-checkpoint validation metrics."""
        return self.metrics["stages"][-1]["best_valid"] if self.metrics else {}


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"


def _epochs(row: TrialRow) -> str:
    return ", ".join(f"{s['name']} {s['epochs_run']}" for s in row.metrics.get("stages", []))


def write_table_csv(rows: Sequence[TrialRow], keys: Sequence[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "trial",
                *keys,
                "status",
                "reports",
                "stage1",
                "epochs",
                "valid_auc",
                "valid_gauc",
                "last_score",
                "run_dir",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.trial_id,
                    *(r.values[k] for k in keys),
                    r.status,
                    r.reports,
                    r.stage1,
                    _epochs(r),
                    r.valid.get("valid_auc", ""),
                    r.valid.get("valid_gauc", ""),
                    r.last_score if r.last_score is not None else "",
                    str(r.run_dir),
                ]
            )


def trials_markdown(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> list[str]:
    chosen = {"auc": "AUC", "gauc": "GAUC"}[metric]
    header = ["trial", *keys, "status", "reports", "stage 1", "epochs run"]
    header += [f"valid {m}{' (selects)' if m == chosen else ''}" for m in ("GAUC", "AUC")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = r.status
        if r.status != "finished" and r.last_score is not None:
            status += f" (last report {_f(r.last_score)})"
        cells = [r.trial_id, *(str(r.values[k]) for k in keys), status, str(r.reports)]
        cells += [r.stage1, _epochs(r), _f(r.valid.get("valid_gauc")), _f(r.valid.get("valid_auc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _point(value: Any) -> Any:
    """A search-space value as a plot coordinate (lists, e.g. layer sizes, as their text)."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, str(value))


def plot_sweep(rows: Sequence[TrialRow], keys: Sequence[str], metric: str, path: Path) -> None:
    """The pipeline's validation metric over the first search key (one point per value, evenly
    spaced, so a log-scale grid with 0 reads naturally), one line per value of the second key;
    the best trial of each point when other keys vary too."""
    finished_rows = [r for r in rows if r.status == "finished"]
    x_key = keys[0]
    line_key = keys[1] if len(keys) > 1 else None

    def coords(row: TrialRow) -> tuple[Any, Any]:
        return _point(row.values[x_key]), _point(row.values[line_key]) if line_key else None

    xs = sorted({coords(r)[0] for r in finished_rows}, key=_sort_key)
    lines = sorted({coords(r)[1] for r in finished_rows}, key=_sort_key)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for line in lines:
        points = []
        for i, x in enumerate(xs):
            scores = [r.last_score for r in finished_rows if coords(r) == (x, line)]
            if scores:
                points.append((i, max(scores)))
        label = f"{line_key} = {line}" if line_key else None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    best = max(finished_rows, key=lambda r: r.last_score)
    ax.plot(
        xs.index(coords(best)[0]),
        best.last_score,
        marker="*",
        markersize=16,
        color="black",
        linestyle="none",
        label="best",
    )
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"target validation {metric.upper()}")
    ax.set_title(f"{len(finished_rows)} finished trial(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_sweep_outputs(
    sweep: Mapping[str, Any],
    output: Path,
    samples_dir: Path,
    rows: Sequence[TrialRow],
    concurrency: int,
) -> dict[str, Any]:
    keys = list(sweep["search_space"])
    metric = sweep["metric"]
    run = sweep["run"]
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "failed")}
    unfinished = expected_trials(sweep) - sum(counts.values())
    finished_rows = [r for r in rows if r.status == "finished"]
    best = max(finished_rows, key=lambda r: r.last_score, default=None)
    write_table_csv(rows, keys, output / TABLE_FILE)
    lines = [
        f"# Sweep of `{run['model']}` over {' × '.join(f'`{k}`' for k in keys)}",
        "",
        f"- samples: `{samples_dir}`",
        f"- trials: {counts['finished']} finished, {counts['stopped']} stopped early by the "
        f"scheduler ({sweep['scheduler']['name']}), {counts['failed']} failed"
        + (f", {unfinished} not run yet (interrupted)" if unfinished else ""),
        f"- {concurrency} trial(s) at a time; each: {run['scaling']['num_workers']} worker(s) x "
        f"{run['scaling']['cpus_per_worker']} CPU, at most {run['train']['epochs']} epochs per "
        f"stage, early stopping on validation {metric.upper()}",
        f"- stage 1 trained {sum(r.stage1 == 'trained' for r in finished_rows)} time(s), taken "
        f"from the cache {sum(r.stage1 == 'cached' for r in finished_rows)} time(s) (finished "
        "trials)",
        "",
    ]
    summary: dict[str, Any] = {**counts, "unfinished": unfinished, "best": None}
    if best is None:
        lines += ["No trial finished its pipeline yet: no best config.", ""]
    else:
        config = load_yaml(best.run_dir / CONFIG_FILE)
        config.pop("invocation")
        commit = config.pop("code_commit", None)
        values = ", ".join(f"`{k}={best.values[k]}`" for k in keys)
        test = best.metrics["test"]
        (output / BEST_CONFIG_FILE).write_text(
            f"# Best trial {best.trial_id} of the sweep in {output}, chosen on target validation "
            f"{metric.upper()} {best.last_score:.4f}, trained at code commit {commit}.\n"
            f"# python train/run.py --samples {samples_dir} --output RUN_DIR "
            f"--config {output / BEST_CONFIG_FILE}\n" + dump(config)
        )
        lines += [
            f"## Best trial, chosen on target validation {metric.upper()}",
            "",
            f"{values} (trial `{best.trial_id}`): validation GAUC "
            f"{_f(best.valid.get('valid_gauc'))}, AUC {_f(best.valid.get('valid_auc'))}.",
            "",
            f"Its run config: `{BEST_CONFIG_FILE}` (`python train/run.py --samples "
            f"{samples_dir} --output RUN_DIR --config {output / BEST_CONFIG_FILE}`).",
            "",
            f"### Its target test rows ({test['model']['rows']}; not used to choose it)",
            "",
            *results_table(test, {"model": "best trial", "oracle": "oracle (true p_like)"}),
            "",
        ]
        plot_sweep(rows, keys, metric, output / PLOT_FILE)
        summary["best"] = {
            "trial_id": best.trial_id,
            "values": best.values,
            "valid": best.valid,
            "test": test,
            "config": str(output / BEST_CONFIG_FILE),
        }
    lines += [
        f"## All trials, best validation {metric.upper()} first",
        "",
        *trials_markdown(rows, keys, metric),
        "",
        f"Table as CSV: `{TABLE_FILE}`."
        + (f" Plot: `{PLOT_FILE}`." if best is not None else "")
        + f" Each trial's run (train/run.py files): `{TRIALS_DIR}/<trial>/`.",
        "",
    ]
    text = "\n".join(lines)
    (output / SUMMARY_FILE).write_text(text)
    print(text, flush=True)
    return summary
