"""The γ x d_HFA sweep of docs/RESULTS.md, from raw data to the plot.

    python jobs/sweep_gamma_dhfa.py --workdir runs/sweep_gamma_dhfa [--users 8000] [--seed 0]
                                    [--docs docs/results] [key=value ...]

Steps, each the project's own command, each skipped when its output is already there (so a
rerun resumes): jobs/generate_tenrec.py (WORKDIR/raw), etl/build_samples.py (WORKDIR/samples),
then train/tune.py with conf/tune/gamma_dhfa.yaml and the `key=value` overrides
(WORKDIR/sweep; an interrupted sweep resumes). With --docs, the sweep's plot is copied there
as sweep_gamma_dhfa.png (docs/RESULTS.md shows it; its table comes from WORKDIR/sweep/summary.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP_CONFIG = REPO / "conf" / "tune" / "gamma_dhfa.yaml"
DATA_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"


def step(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="raw data, samples and the sweep")
    parser.add_argument("--users", type=int, default=8000, help="generated users")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--docs", help="directory to copy the plot to")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train/tune.py overrides")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    raw, samples, sweep = work / "raw", work / "samples", work / "sweep"
    python = sys.executable
    if not (raw / "oracle.parquet").is_file():
        step(
            [
                python,
                "jobs/generate_tenrec.py",
                "--output",
                str(raw),
                "--users",
                str(args.users),
                "--seed",
                str(args.seed),
            ]
        )
    if not (samples / "feature_schema.json").is_file():
        step(
            [
                python,
                "etl/build_samples.py",
                "--config",
                str(DATA_CONFIG),
                "--input",
                str(raw),
                "--output",
                str(samples),
            ]
        )
    step(
        [
            python,
            "train/tune.py",
            "--samples",
            str(samples),
            "--output",
            str(sweep),
            "--config",
            str(SWEEP_CONFIG),
            *args.overrides,
        ]
    )
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sweep / "metric.png", docs / "sweep_gamma_dhfa.png")
        print(f"copied the plot to {docs / 'sweep_gamma_dhfa.png'}")


if __name__ == "__main__":
    main()
