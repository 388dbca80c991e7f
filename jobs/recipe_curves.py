"""Validation curves of MKT with the training recipe and with its switchable pieces off.

    python jobs/recipe_curves.py --samples OUT_DIR --output DIR [--epochs 8] [key=value ...]

Trains MKT twice on the same samples with `train/run.py`, every stage for `--epochs` epochs
(early stopping's patience set to the epoch count, so each curve runs to its end), and plots
the target validation AUC and log loss of each epoch, MEM and TEM, both runs in one figure:

- `recipe`: conf/run/quickstart.yaml as it is (docs/training.md, "The training recipe");
- `recipe off`: the same with the pieces a config can switch off: `train.embedding_l2=0` (no
  embedding prior), `train.tem_holdout=0` (TEM on the rows its MEM fitted),
  `params.tem.embeddings=own` (TEM's own fresh tables) and
  `train.early_stopping.plateau_lr_factor=1` (each epoch goes on from the one before, at the
  same step). The output bias starting at the prior and the ETL's validation rules have no
  switch: both runs have them.

An epoch after which training went back to the best epoch (docs/training.md, "Plateaus") is
plotted with its own weights' score and marked with a cross; the next epoch starts from the
best.

DIR receives `recipe/` and `recipe_off/` (train/run.py RUN_DIRs), `recipe_curves.png` and
`recipe_curves.json` (the per-epoch numbers). A finished run is not retrained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from jobs.common import REPO, train_command

RUN_CONFIG = REPO / "conf" / "run" / "quickstart.yaml"
VARIANTS = {
    "recipe": (),
    "recipe_off": (
        "train.embedding_l2=0",
        "train.tem_holdout=0",
        "params.tem.embeddings=own",
        "train.early_stopping.plateau_lr_factor=1",
    ),
}
# Beside the metrics: the epochs after which training went back to the best one.
RESTORED = "restored_epochs"
METRICS = (("valid_auc", "validation AUC"), ("valid_logloss", "validation log loss"))


def train(samples: Path, run_dir: Path, epochs: int, overrides: list[str]) -> dict[str, Any]:
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        command = train_command(
            samples,
            run_dir,
            RUN_CONFIG,
            [
                "model=mkt",
                f"train.epochs={epochs}",
                f"train.early_stopping.patience={epochs}",
                *overrides,
            ],
        )
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(metrics.read_text())


def curves(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """variant -> stage -> metric -> one value per epoch, and RESTORED -> the epochs after
    which training went back to the best one."""
    return {
        variant: {
            stage["name"]: {
                **{key: [h[key] for h in stage["history"]] for key, _ in METRICS},
                RESTORED: [h["epoch"] for h in stage["history"] if "restored_epoch" in h],
            }
            for stage in metrics["stages"]
        }
        for variant, metrics in runs.items()
    }


def plot(data: dict[str, dict[str, dict[str, list[float]]]], path: Path) -> None:
    stages = list(next(iter(data.values())))
    fig = Figure(figsize=(5 * len(stages), 7))
    axes = fig.subplots(len(METRICS), len(stages), squeeze=False)
    for col, stage in enumerate(stages):
        for row, (key, label) in enumerate(METRICS):
            ax = axes[row][col]
            for variant, style in zip(data, ("-o", "--s"), strict=False):
                values = data[variant][stage][key]
                ax.plot(range(1, len(values) + 1), values, style, label=variant.replace("_", " "))
                back = data[variant][stage][RESTORED]
                if back:
                    ax.plot(
                        back,
                        [values[e - 1] for e in back],
                        "kx",
                        markersize=9,
                        label=f"{variant.replace('_', ' ')}: went back to the best",
                    )
            ax.set_title(f"{stage.upper()}: {label}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, required=True, help="OUT_DIR of the ETL")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for both runs")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    runs = {
        variant: train(
            args.samples.resolve(), output / variant, args.epochs, [*args.overrides, *extra]
        )
        for variant, extra in VARIANTS.items()
    }
    data = curves(runs)
    (output / "recipe_curves.json").write_text(json.dumps(data, indent=1))
    plot(data, output / "recipe_curves.png")
    for variant, stages in data.items():
        for stage, values in stages.items():
            aucs = ", ".join(f"{v:.4f}" for v in values["valid_auc"])
            print(f"{variant} {stage}: validation AUC by epoch {aucs}")
    print(f"figure: {output / 'recipe_curves.png'}")
    return data


def cli() -> None:
    """The command line."""
    main()


if __name__ == "__main__":
    cli()
