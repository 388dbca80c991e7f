"""The paper's Tables 2, 3 and 4 (section 4.2-4.3): which models and ablations they hold, and
the tables, CSVs and plot built from their runs' metrics.json (pure functions; the runs are
jobs/reproduce_tables.py's)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import LR_RECIPE

METRICS = ("auc", "gauc")


@dataclass(frozen=True)
class Entry:
    key: str  # run directory name and row id
    label: str  # as the paper names it
    group: str  # the paper's family (Table 2) or "ablation" (Table 4)
    overrides: tuple[str, ...]  # run-config overrides


FLOOR, SINGLE, JOINT, PRETRAIN, OURS, ABLATION = (
    "floor",
    "single-domain",
    "joint training",
    "pre-training & fine-tuning",
    "MKT",
    "ablation",
)
TABLE2 = (
    Entry("lr", "LR (one-hot)", FLOOR, ("model=lr", *LR_RECIPE)),
    Entry("mlp", "MLP", SINGLE, ("model=mlp",)),
    Entry("din", "DIN", SINGLE, ("model=din",)),
    # FiBiNet still rose at epoch 10 of 10 at the shared step (0.001); on validation at 48,000
    # users 0.01 > 0.003 > 0.001 (docs/training.md, "FiBiNet's step", stop 35).
    Entry("fibinet", "FiBiNet", SINGLE, ("model=fibinet", "train.lr=0.01")),
    Entry("mmoe", "MMoE", JOINT, ("model=mmoe",)),
    Entry("ple", "PLE", JOINT, ("model=ple",)),
    Entry("star", "STAR", JOINT, ("model=star",)),
    Entry("conet", "CoNet", JOINT, ("model=conet",)),
    Entry("minet", "MiNet", JOINT, ("model=minet",)),
    Entry("finetune", "Finetune", PRETRAIN, ("model=finetune",)),
    Entry("ctnet", "CTNet", PRETRAIN, ("model=ctnet",)),
    Entry("mkt", "MKT", OURS, ("model=mkt",)),
)
TABLE4 = (
    Entry("wo_mem", "w/o MEM", ABLATION, ("model=tem_only",)),
    Entry("wo_tem", "w/o TEM", ABLATION, ("model=mem_only",)),
    Entry("wo_pdl", "w/o PDL", ABLATION, ("model=mkt", "params.mem.gamma=0")),
    Entry("wo_hfa", "w/o HFA", ABLATION, ("model=mkt", "params.mem.hfa=false")),
)
ENTRIES = TABLE2 + TABLE4
MKT, FINETUNE = "mkt", "finetune"
# Scores every run reports beside its model's, on the same test rows: table rows of their own.
REFERENCES = {"oracle": "oracle (generator's p_like)", "like_rate": "like-rate floor (smoothed)"}

# Results: entry key -> the metrics.json of each seed's run.
Results = Mapping[str, Sequence[Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------------
# Tables (pure functions of the runs' metrics.json)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed
    n: int  # seeds with a finite value


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample standard deviation of the finite values (a GAUC is null in
    metrics.json when no user of a group has both labels)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Stat(math.nan, math.nan, 0)
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return Stat(float(np.mean(finite)), std, len(finite))


def pct(value: float, base: float) -> float:
    """Relative change in percent, as the paper's "Improv." columns: (value - base) / base."""
    return (value - base) / base * 100.0


def test_stat(runs: Sequence[Mapping[str, Any]], metric: str, group: str | None = None) -> Stat:
    """A test metric of the model over the seeds, overall or in one user-activity group."""
    values = []
    for run in runs:
        m = run["test"]["model"]
        values.append((m["by_activity"][group] if group else m)[metric])
    return stat(values)


def table2(results: Results, entries: Sequence[Entry] = TABLE2) -> list[dict[str, Any]]:
    """One row per model (mean and std of AUC and GAUC), then the generator's oracle and the
    like-rate floor when the runs scored them (each is the same for every run: the data are
    fixed)."""
    rows = []
    for e in entries:
        runs = results.get(e.key, ())
        row: dict[str, Any] = {"group": e.group, "model": e.label, "key": e.key, "seeds": len(runs)}
        for metric in METRICS:
            s = test_stat(runs, metric)
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.mean, s.std
        rows.append(row)
    for key, label in REFERENCES.items():
        scores = next(
            (
                run["test"][key]
                for e in entries
                for run in results.get(e.key, ())
                if key in run["test"]
            ),
            None,
        )
        if scores is not None:
            rows.append(
                {
                    "group": key,
                    "model": label,
                    "key": key,
                    "seeds": 0,
                    **{f"{m}_mean": scores[m] for m in METRICS},
                    **{f"{m}_std": math.nan for m in METRICS},
                }
            )
    return rows


def best_single_domain(rows: Sequence[Mapping[str, Any]], metric: str = "gauc") -> str:
    """The key of the single-domain model with the highest mean test `metric` (ties: the
    other metric), as the paper picks FiBiNet for Table 3."""
    other = "auc" if metric == "gauc" else "gauc"
    single = [r for r in rows if r["group"] == SINGLE and math.isfinite(r[f"{metric}_mean"])]
    if not single:
        raise ValueError(f"no single-domain model has a finite mean test {metric}")
    return max(single, key=lambda r: (r[f"{metric}_mean"], r[f"{other}_mean"]))["key"]


def table3(
    results: Results, single_key: str, groups: Sequence[str], labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Per user-activity group: the best single-domain model, Finetune and MKT (means over the
    seeds), each compared in percent with the models above it (the paper compares Finetune and
    MKT with FiBiNet; MKT with Finetune is added)."""
    keys = (single_key, FINETUNE, MKT)
    rows = []
    for group in groups:
        means = {k: {m: test_stat(results.get(k, ()), m, group) for m in METRICS} for k in keys}
        for key in keys:
            row: dict[str, Any] = {"activity": group, "model": labels[key], "key": key}
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = means[key][m].mean, means[key][m].std
                row[f"{m}_vs_single_pct"] = pct(means[key][m].mean, means[single_key][m].mean)
                row[f"{m}_vs_finetune_pct"] = pct(means[key][m].mean, means[FINETUNE][m].mean)
            rows.append(row)
    return rows


def table4(results: Results, entries: Sequence[Entry] = TABLE4) -> list[dict[str, Any]]:
    """Each ablation and full MKT (mean, std), the ablations' change in percent against MKT."""
    full = {m: test_stat(results.get(MKT, ()), m) for m in METRICS}
    rows = []
    for key, label in [*((e.key, e.label) for e in entries), (MKT, "Full MKT")]:
        row: dict[str, Any] = {"ablation": label, "key": key, "seeds": len(results.get(key, ()))}
        for m in METRICS:
            s = test_stat(results.get(key, ()), m)
            row[f"{m}_mean"], row[f"{m}_std"] = s.mean, s.std
            row[f"{m}_change_pct"] = math.nan if key == MKT else pct(s.mean, full[m].mean)
        rows.append(row)
    return rows


def _mean_std(row: Mapping[str, Any], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4f}" if not math.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def _percent(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.2f}%"


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def table2_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown(
        ("family", "model", "test AUC", "test GAUC", "seeds"),
        [
            (r["group"], r["model"], _mean_std(r, "auc"), _mean_std(r, "gauc"), str(r["seeds"]))
            for r in rows
        ],
    )


def table3_markdown(rows: Sequence[Mapping[str, Any]], single_key: str) -> str:
    def vs(r: Mapping[str, Any], metric: str, base: str, base_key: str) -> str:
        return "–" if r["key"] == base_key else _percent(r[f"{metric}_vs_{base}_pct"])

    lines = []
    for r in rows:
        line = [r["activity"], r["model"]]
        for m in METRICS:
            line += [
                _mean_std(r, m),
                vs(r, m, "single", single_key),
                vs(r, m, "finetune", FINETUNE) if r["key"] == MKT else "–",
            ]
        lines.append(line)
    return markdown(
        (
            "user activity",
            "model",
            "AUC",
            "AUC vs single",
            "AUC vs Finetune",
            "GAUC",
            "GAUC vs single",
            "GAUC vs Finetune",
        ),
        lines,
    )


def table4_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown(
        ("ablation", "test AUC", "change", "test GAUC", "change", "seeds"),
        [
            (
                r["ablation"],
                _mean_std(r, "auc"),
                _percent(r["auc_change_pct"]),
                _mean_std(r, "gauc"),
                _percent(r["gauc_change_pct"]),
                str(r["seeds"]),
            )
            for r in rows
        ],
    )


def plain(value: Any) -> Any:
    """NaN (no value: a std of one seed, MKT's change against itself) -> None, for JSON and CSV."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(plain(list(rows)))


FAMILY_COLOURS = {
    FLOOR: "tab:brown",
    SINGLE: "tab:grey",
    JOINT: "tab:blue",
    PRETRAIN: "tab:orange",
    OURS: "tab:red",
    ABLATION: "tab:purple",
}


def plot(
    table2_rows: Sequence[Mapping[str, Any]],
    table4_rows: Sequence[Mapping[str, Any]],
    path: Path,
) -> None:
    """Test AUC and GAUC of Table 2's models and Table 4's ablations: bars at the mean over
    the seeds, error bars one standard deviation. The oracle is written in the title, not drawn:
    it lies far above the models and would flatten their differences; the like-rate floor is
    a dashed line."""
    from matplotlib.figure import Figure

    models = [r for r in table2_rows if r["key"] not in REFERENCES]
    oracle = next((r for r in table2_rows if r["key"] == "oracle"), None)
    floor = next((r for r in table2_rows if r["key"] == "like_rate"), None)
    ablations = [{**r, "model": r["ablation"], "group": ABLATION} for r in table4_rows]
    ablations[-1]["group"] = OURS
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    fig.suptitle("Target-entity test metrics: mean over seeds, error bar one standard deviation")
    axes = fig.subplots(2, 2, width_ratios=[len(models), len(ablations)])
    for col, (rows, title) in enumerate(((models, "Table 2"), (ablations, "Table 4"))):
        for line, metric in enumerate(METRICS):
            ax = axes[line][col]
            means = np.array([r[f"{metric}_mean"] for r in rows])
            stds = np.nan_to_num(np.array([r[f"{metric}_std"] for r in rows]))
            colours = [FAMILY_COLOURS[r["group"]] for r in rows]
            ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=colours)
            finite = np.isfinite(means)
            if finite.any():
                low = float(np.min(means[finite] - stds[finite]))
                high = float(np.max(means[finite] + stds[finite]))
                pad = max(0.01, (high - low) * 0.15)
                ax.set_ylim(low - pad, high + pad)
            if floor is not None:
                ax.axhline(floor[f"{metric}_mean"], color="black", linestyle="--", linewidth=1)
            label = f"{title}: test {metric.upper()}"
            if oracle is not None and col == 0:
                label += f" (oracle {oracle[f'{metric}_mean']:.4f})"
            ax.set_title(label)
            ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right")
            ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


def gains_rows(
    gains: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    """MKT minus each model (jobs.common.paired_gains over the seeds' mean metrics), one row a
    model, in `gains`' order."""
    rows = []
    for key, gain in gains.items():
        row: dict[str, Any] = {"model": labels[key], "key": key}
        for m in METRICS:
            g = gain[m]
            row[f"{m}_difference"] = g["difference"]
            row[f"{m}_standard_error"] = g["standard_error"]
            row[f"{m}_low"], row[f"{m}_high"] = g["interval_95"]
            row[f"{m}_mkt_better_share"] = g["a_better_share"]
        rows.append(row)
    return rows


def gains_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(r: Mapping[str, Any], m: str) -> str:
        low, high = r[f"{m}_low"], r[f"{m}_high"]
        beyond = " *" if low > 0 or high < 0 else ""
        return f"{r[f'{m}_difference']:+.4f} [{low:+.4f}, {high:+.4f}]{beyond}"

    return markdown(
        ("MKT minus", "AUC [95%]", "GAUC [95%]", "MKT better (AUC, GAUC)"),
        [
            (
                r["model"],
                cell(r, "auc"),
                cell(r, "gauc"),
                f"{100 * r['auc_mkt_better_share']:.0f}%, {100 * r['gauc_mkt_better_share']:.0f}%",
            )
            for r in rows
        ],
    )
