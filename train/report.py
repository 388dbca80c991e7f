"""The files a run leaves in RUN_DIR besides checkpoints: metrics.json, summary.md, curves.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Figure without pyplot: no GUI backend or global state, just a file.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from train.stage import StageResult

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
CURVES_FILE = "curves.png"


def stage_summary(result: StageResult) -> dict[str, Any]:
    state = result.state
    return {
        "name": result.name,
        "model": result.link.model,
        "params": dict(result.link.params),
        "best_checkpoint": result.link.weights,
        "epochs_run": state.epochs_done,
        "best_epoch": state.best_epoch,
        "start": state.start,
        "stopped_early": state.stopped_early,
        "resumed_after": state.resumed_after,
        "best_valid": {k: v for k, v in result.best_metrics.items() if k.startswith("valid_")},
        "history": state.history,
    }


def write_outputs(
    run_dir: Path,
    header: dict[str, Any],
    stages: Sequence[StageResult],
    test: dict[str, Any],
) -> dict[str, Any]:
    metrics = {**header, "stages": [stage_summary(s) for s in stages], "test": test}
    (run_dir / METRICS_FILE).write_text(json.dumps(_finite(metrics), indent=1))
    (run_dir / SUMMARY_FILE).write_text(summary_markdown(metrics))
    plot_curves(stages, run_dir / CURVES_FILE)
    return metrics


def _finite(tree: Any) -> Any:
    """NaN / inf -> null: metrics.json stays strict JSON (a GAUC with no mixed-label user)."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def results_table(test: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Markdown rows of AUC / GAUC / log loss for each evaluated scorer in `names`."""
    lines = [
        "| scores | AUC | GAUC | GAUC coverage | log loss |",
        "|---|---|---|---|---|",
    ]
    for key, label in names.items():
        if key in test:
            m = test[key]
            lines.append(
                f"| {label} | {_f(m['auc'])} | {_f(m['gauc'])} | {_f(m['gauc_coverage'], 3)} "
                f"| {_f(m['logloss'])} |"
            )
    return lines


# The scorers of a run's test table, in order, with their labels.
SCORERS = {
    "like_rate": "like-rate floor (smoothed user and item rates)",
    "oracle": "oracle (true p_like)",
}


def console_summary(metrics: dict[str, Any], run_dir: Path, seconds: float) -> str:
    """What a run prints last: where its files are, and its test table (summary.md has more)."""
    model = metrics["test"]["model"]
    return "\n".join(
        [
            f"[run] {metrics['model']} done in {seconds / 60:.1f} min: {model['rows']} target "
            f"test rows (positive rate {_f(model['positive_rate'])}); {run_dir}/{SUMMARY_FILE} "
            f"has every table, {METRICS_FILE} the numbers, {CURVES_FILE} the curves",
            *results_table(metrics["test"], {"model": metrics["model"], **SCORERS}),
        ]
    )


def summary_markdown(metrics: dict[str, Any]) -> str:
    test = metrics["test"]
    lines = [
        f"# Run `{metrics['model']}`",
        "",
        f"- samples: `{metrics['samples']}` (test histories `{metrics['history_mode']}`, "
        f"sequences of {metrics['seq_len']})",
        f"- workers: {metrics['num_workers']} x {metrics['cpus_per_worker']} CPU"
        f"{' + 1 GPU' if metrics['use_gpu'] else ''}",
        f"- early stopping on validation {metrics['early_stopping_metric'].upper()}",
        "",
        "## Stages",
        "",
        "| stage | model | epochs run | best epoch | valid AUC | valid GAUC | rows/s (last epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in metrics["stages"]:
        last = s["history"][-1] if s["history"] else {}
        resumed = f" (resumed after {s['resumed_after']})" if s["resumed_after"] else ""
        lines.append(
            f"| {s['name']} | {s['model']} | {s['epochs_run']}{resumed} | {s['best_epoch']} "
            f"| {_f(s['best_valid'].get('valid_auc'))} | {_f(s['best_valid'].get('valid_gauc'))} "
            f"| {last.get('rows_per_s', 0):,.0f} |"
        )
    model = test["model"]
    lines += [
        "",
        f"## Target test rows ({model['rows']}, positive rate {_f(model['positive_rate'])})",
        "",
        *results_table(test, {"model": metrics["model"], **SCORERS}),
        "",
        "## By user activity (target train rows per user)",
        "",
        "| group | rows | AUC | GAUC | oracle AUC | oracle GAUC |",
        "|---|---|---|---|---|---|",
    ]
    oracle = test.get("oracle", {}).get("by_activity", {})
    for group, m in model.get("by_activity", {}).items():
        o = oracle.get(group, {})
        lines.append(
            f"| {group} | {m['rows']} | {_f(m['auc'])} | {_f(m['gauc'])} "
            f"| {_f(o.get('auc'))} | {_f(o.get('gauc'))} |"
        )
    lines += ["", f"Predictions: `predictions/` (Delta). Curves: `{CURVES_FILE}`.", ""]
    return "\n".join(lines)


def plot_curves(stages: Sequence[StageResult], path: Path) -> None:
    """Per stage: training loss, and validation AUC / GAUC, by epoch."""
    fig = Figure(figsize=(5 * len(stages), 6))
    axes = fig.subplots(2, len(stages), squeeze=False)
    for column, stage in enumerate(stages):
        history = stage.state.history
        epochs = [h["epoch"] for h in history]
        loss_ax, valid_ax = axes[0][column], axes[1][column]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o")
        loss_ax.set_title(f"{stage.name}: training loss")
        for name in ("valid_auc", "valid_gauc"):
            valid_ax.plot(epochs, [h[name] for h in history], marker="o", label=name[6:].upper())
        valid_ax.axvline(stage.state.best_epoch, color="grey", linestyle=":", label="best")
        valid_ax.set_title(f"{stage.name}: validation")
        valid_ax.set_xlabel("epoch")
        valid_ax.legend()
        for ax in (loss_ax, valid_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
