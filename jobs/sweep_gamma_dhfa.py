"""The γ x d_HFA sweep of docs/RESULTS.md, from raw data to the plot.

    python jobs/sweep_gamma_dhfa.py --workdir runs/sweep_gamma_dhfa [--users 8000] [--seed 0]
                                    [--docs docs/results] [key=value ...]

Steps, each the project's own command, each skipped when its output is already there (so a
rerun resumes): jobs/generate_tenrec.py (WORKDIR/raw), spark-submit etl/build_samples.py
(WORKDIR/samples, as jobs/quickstart.py runs it), then train/tune.py with
conf/tune/gamma_dhfa.yaml and the `key=value` overrides (WORKDIR/sweep; an interrupted sweep
resumes, a finished one only rewrites its outputs). With --docs, the sweep's plot, summary.md
and trials.csv are copied there as sweep_gamma_dhfa.png, sweep_gamma_dhfa_summary.md and
sweep_gamma_dhfa_trials.csv (paths under the repository made relative to it): docs/RESULTS.md
shows the plot, and its table is the data of those two files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from jobs.common import build_samples_command, run_echoed
from mkt.contract import SCHEMA_FILE

REPO = Path(__file__).resolve().parents[1]
SWEEP_CONFIG = REPO / "conf" / "tune" / "gamma_dhfa.yaml"
# SWEEP_DIR file -> its copy under --docs.
DOCS_COPIES = {
    "metric.png": "sweep_gamma_dhfa.png",
    "summary.md": "sweep_gamma_dhfa_summary.md",
    "trials.csv": "sweep_gamma_dhfa_trials.csv",
}


def copy_to_docs(sweep: Path, docs: Path) -> None:
    """The sweep's plot, summary and table under `docs`; the text files' absolute paths inside
    this checkout made relative to it, so they read the same from any checkout."""
    docs.mkdir(parents=True, exist_ok=True)
    for name, copy in DOCS_COPIES.items():
        if name.endswith(".png"):
            shutil.copyfile(sweep / name, docs / copy)
        else:
            text = (sweep / name).read_text()
            (docs / copy).write_text(text.replace(f"{REPO}/", ""))
        print(f"copied {sweep / name} to {docs / copy}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="raw data, samples and the sweep")
    parser.add_argument("--users", type=int, default=8000, help="generated users")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--docs", help="directory to copy the plot, summary and table to")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train/tune.py overrides")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    raw, samples, sweep = work / "raw", work / "samples", work / "sweep"
    python = sys.executable
    if not (raw / "oracle.parquet").is_file():
        run_echoed(
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
    if not (samples / SCHEMA_FILE).is_file():
        run_echoed(build_samples_command(raw, samples))
    run_echoed(
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
        copy_to_docs(sweep, Path(args.docs))


def cli() -> None:
    """The command line, also installed as `mkt-sweep-gamma-dhfa` (pyproject.toml)."""
    main()


if __name__ == "__main__":
    cli()
