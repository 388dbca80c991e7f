"""The rare-id threshold (`min_count` of the data config) against validation AUC.

    python jobs/min_count_sweep.py --raw data/quickstart/raw --output DIR \
        [--min-counts 1 3 2 5] [--data-config conf/data/tenrec.yaml]

For each threshold m, the data config with `min_count: m` (DIR/m<m>/data.yaml; a value on
fewer than m train rows is OOV, docs/etl.md "Rare ids"), the Spark job on the raw files
(DIR/m<m>/samples), then MKT and TEM alone with the quick start's run config
(DIR/m<m>/mkt, DIR/m<m>/tem_only; train/run.py). The threshold is chosen on the target
validation slice (each run's last stage at its best epoch); the test rows are reported beside,
with each model's paired-bootstrap difference against m = 1 (the same test rows: thresholds
change the encoding, not the split), and not used to choose. DIR/min_count.md, .json and .png
hold the result. A finished step is not repeated.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from jobs.common import (
    DATA_CONFIG,
    REPO,
    build_samples_command,
    paired_gains,
    run_echoed,
    train_command,
)

RUN_CONFIG = REPO / "conf" / "run" / "quickstart.yaml"
MODELS = ("mkt", "tem_only")
VALID = (("valid_auc", "AUC"), ("valid_gauc", "GAUC"), ("valid_logloss", "log loss"))


def data_config(base: Path, min_count: int, out: Path) -> Path:
    """`base` with its top-level `min_count` set to `min_count` (the features' own, if any,
    still win)."""
    text = re.sub(r"(?m)^min_count:.*\n", "", base.read_text())
    out.write_text(f"{text.rstrip()}\nmin_count: {min_count}\n")
    return out


def run_threshold(raw: Path, base: Path, oracle: Path | None, directory: Path, m: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    samples = directory / "samples"
    if not (samples / "feature_schema.json").is_file():
        config = data_config(base, m, directory / "data.yaml")
        run_echoed(build_samples_command(raw, samples, config))
    for model in MODELS:
        run_dir = directory / model
        if not (run_dir / "metrics.json").is_file():
            extra = [f"model={model}"]
            command = train_command(samples, run_dir, RUN_CONFIG, extra)
            if oracle is not None:
                command += ["--oracle", str(oracle)]
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, check=True)


def results(output: Path, min_counts: list[int]) -> dict[str, Any]:
    """Per threshold: the rare ids folded, each model's validation and test metrics; per model,
    the paired test difference of each threshold against the first."""
    table: dict[str, Any] = {}
    for m in min_counts:
        directory = output / f"m{m}"
        summary = json.loads((directory / "samples" / "etl_summary.json").read_text())
        row: dict[str, Any] = {"rare_ids": summary.get("rare_ids", {})}
        for model in MODELS:
            metrics = json.loads((directory / model / "metrics.json").read_text())
            row[model] = {
                "valid": {k: metrics["stages"][-1]["best_valid"][k] for k, _ in VALID},
                "test": {k: metrics["test"]["model"][k] for k in ("auc", "gauc")},
            }
        table[str(m)] = row
    reference = min_counts[0]
    gains: dict[str, Any] = {}
    for model in MODELS:
        runs = {str(m): [output / f"m{m}" / model] for m in min_counts}
        compared = paired_gains(output / f"m{reference}" / "samples", runs, str(reference))
        # paired_gains gives reference minus other; reported here as other minus reference.
        gains[model] = {
            m: {
                metric: {
                    "difference": -v[metric]["difference"],
                    "interval_95": [-v[metric]["interval_95"][1], -v[metric]["interval_95"][0]],
                }
                for metric in ("auc", "gauc")
            }
            for m, v in compared.items()
        }
    return {"reference": reference, "thresholds": table, "test_gains": gains}


def markdown(result: dict[str, Any], command: str) -> str:
    reference = result["reference"]
    lines = [
        "# Rare-id threshold (`min_count`) on validation",
        "",
        f"`{command}`",
        "",
        "| min_count | user ids OOV (train rows) | item ids OOV (train rows) | model "
        "| valid AUC | valid GAUC | valid log loss | test AUC | test GAUC "
        f"| test AUC vs {reference} [95%] | test GAUC vs {reference} [95%] |",
        "|" + "---|" * 11,
    ]
    for m, row in result["thresholds"].items():
        rare = row["rare_ids"]

        def folded(feature: str, rare: dict[str, Any] = rare) -> str:
            r = rare.get(feature)
            return "0" if r is None else f"{r['oov_values']} ({r['oov_train_rows']})"

        for model in MODELS:
            valid, test = row[model]["valid"], row[model]["test"]
            gain = result["test_gains"][model].get(m)
            versus = (
                ["", ""]
                if gain is None
                else [
                    f"{gain[k]['difference']:+.4f} [{gain[k]['interval_95'][0]:+.4f}, "
                    f"{gain[k]['interval_95'][1]:+.4f}]"
                    for k in ("auc", "gauc")
                ]
            )
            lines.append(
                f"| {m} | {folded('user_id')} | {folded('item_id')} | {model} "
                f"| {valid['valid_auc']:.4f} | {valid['valid_gauc']:.4f} "
                f"| {valid['valid_logloss']:.5f} | {test['auc']:.4f} | {test['gauc']:.4f} "
                f"| {versus[0]} | {versus[1]} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    thresholds = [int(m) for m in result["thresholds"]]
    order = sorted(range(len(thresholds)), key=lambda i: thresholds[i])
    figure = Figure(figsize=(9, 3.6))
    for k, (metric, label) in enumerate(VALID[:2]):
        axes = figure.add_subplot(1, 2, k + 1)
        for model in MODELS:
            values = [
                result["thresholds"][str(thresholds[i])][model]["valid"][metric] for i in order
            ]
            axes.plot([thresholds[i] for i in order], values, marker="o", label=model)
        axes.set_xlabel("min_count")
        axes.set_title(f"target validation {label}")
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="raw Tenrec-format files")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--min-counts", type=int, nargs="+", default=[1, 3, 2, 5])
    parser.add_argument("--data-config", type=Path, default=DATA_CONFIG)
    args = parser.parse_args(argv)
    if args.min_counts[0] != 1:
        parser.error("--min-counts: the first is the reference and must be 1 (every id kept)")
    oracle = args.raw / "oracle.parquet"
    for i, m in enumerate(args.min_counts, start=1):
        print(f"[min_count] {i}/{len(args.min_counts)}: min_count {m}", flush=True)
        run_threshold(
            args.raw.resolve(),
            args.data_config.resolve(),
            oracle.resolve() if oracle.is_file() else None,
            args.output.resolve() / f"m{m}",
            m,
        )
    result = results(args.output.resolve(), args.min_counts)
    command = "python jobs/min_count_sweep.py --raw " + f"{args.raw} --output {args.output} "
    command += "--min-counts " + " ".join(map(str, args.min_counts))
    text = markdown(result, command)
    (args.output / "min_count.md").write_text(text)
    (args.output / "min_count.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.output / "min_count.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
