"""Export a finished training run as a serving artifact (docs/serving.md).

    python train/export.py --run RUN_DIR --output ARTIFACT_DIR

Reads what train/run.py leaves in RUN_DIR: `config.yaml` (the pipeline, and the samples
directory under `invocation.samples`) and `metrics.json` (each stage's best checkpoint).
It rebuilds the pipeline's final model from those checkpoints (TEM on its MEM for `mkt`),
takes the vocabularies from the samples directory's `vocab` table, and writes the artifact
with a stamp of the run: run id, config hash, checkpoints and their weights' hashes, and the
git commit of this code (null outside a git checkout). The samples' feature_schema.json must
hold the reserved indices mkt.encoding uses (`check_reserved_indices`). Every checkpoint is
checked against its manifest before it is loaded (train.checkpoints). Prints the artifact's
file sizes and its number of weights (parameters, buffers and constants, as stored).
Exit status 0 on success, 2 with one line `error: ...` when RUN_DIR or ARTIFACT_DIR is wrong,
a checkpoint is damaged or the schema's reserved indices differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from deltalake import DeltaTable

from mkt.contract import SCHEMA_FILE, ConfigError
from mkt.encoding import EncodingContractError, check_reserved_indices
from mkt.pipelines import pipeline
from mkt.schema import FeatureSchema, SchemaError
from mkt.serving import ArtifactError, ProgramError, export_artifact
from train.checkpoints import MODEL_FILE, CheckpointError, ModelLink, build_chain, chain_on
from train.config import code_commit

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"


class RunError(ValueError):
    """RUN_DIR is not a finished run of train/run.py; the message names the file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, metrics) of a finished run."""
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
    if not config_path.is_file():
        raise RunError(f"{config_path}: not found (is {run_dir} a RUN_DIR of train/run.py?)")
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path}: not found (the run has not finished)")
    config = yaml.safe_load(config_path.read_text())
    metrics = json.loads(metrics_path.read_text())
    for key in ("model", "invocation"):
        if key not in config:
            raise RunError(f"{config_path}: no key {key!r}")
    if "stages" not in metrics:
        raise RunError(f"{metrics_path}: no key 'stages'")
    return config, metrics


def checkpoint_dir(recorded: str, run_dir: Path, stage: str) -> Path:
    """A stage's best checkpoint; if RUN_DIR was moved since, the same checkpoint under it."""
    path = Path(recorded)
    if not path.is_dir():
        path = run_dir / CHECKPOINTS_DIR / stage / path.name
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{METRICS_FILE}: stage {stage!r}: no {MODEL_FILE} in {recorded}")
    return path


def final_chain(config: dict[str, Any], metrics: dict[str, Any], run_dir: Path) -> list[ModelLink]:
    """The final stage's model and every model it is built on, oldest first."""
    stages = {s.name: s for s in pipeline(config["model"])}
    summaries = {s["name"]: s for s in metrics["stages"]}

    def chain_of(name: str) -> list[ModelLink]:
        if name not in summaries:
            raise RunError(f"{METRICS_FILE}: no stage {name!r} (stages: {sorted(summaries)})")
        s = summaries[name]
        weights = checkpoint_dir(s["best_checkpoint"], run_dir, name)
        link = ModelLink(s["model"], dict(s["params"]), str(weights))
        return chain_on([chain_of(n) for n in stages[name].built_on], link)

    return chain_of(list(stages)[-1])


def run_stamp(
    run_dir: Path, config: dict[str, Any], metrics: dict[str, Any], links: list[ModelLink]
) -> dict[str, Any]:
    """What identifies the trained model: the same run exports the same `run_id`."""
    config_sha = _sha256(run_dir / CONFIG_FILE)
    stages = [
        {
            "model": link.model,
            "params": dict(link.params),
            "checkpoint": str(link.weights),
            "weights_sha256": _sha256(Path(str(link.weights)) / MODEL_FILE),
        }
        for link in links
    ]
    identity = hashlib.sha256(
        "".join([config_sha, *(s["weights_sha256"] for s in stages)]).encode()
    ).hexdigest()
    test = metrics.get("test", {}).get("model", {})
    samples = config["invocation"]["samples"]
    return {
        "run_id": f"{run_dir.name}-{identity[:12]}",
        "run_dir": str(run_dir),
        "config_sha256": config_sha,
        "pipeline": config["model"],
        "seed": config.get("seed"),
        "samples": samples,
        "schema_sha256": _sha256(Path(samples) / SCHEMA_FILE),
        "export_code_commit": code_commit(),
        "stages": stages,
        "test": {k: test.get(k) for k in ("rows", "auc", "gauc", "logloss")},
    }


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the artifact of RUN_DIR's final model to `out_dir`; returns its manifest."""
    run_dir = Path(run_dir).resolve()
    config, metrics = read_run(run_dir)
    samples = Path(config["invocation"]["samples"])
    schema = FeatureSchema.load(samples)
    # The ETL's encoding constants must be serving's (mkt.encoding), else refuse to export.
    schema_path = samples / SCHEMA_FILE
    check_reserved_indices(json.loads(schema_path.read_text()), str(schema_path))
    vocab_path = samples / "vocab"
    if not (vocab_path / "_delta_log").is_dir():
        raise RunError(f"{vocab_path}: not a Delta table (the samples of this run are gone?)")
    links = final_chain(config, metrics, run_dir)
    model = build_chain(schema, links).eval()
    stamp = run_stamp(run_dir, config, metrics, links)
    vocab = DeltaTable(str(vocab_path)).to_pyarrow_table()
    return export_artifact(model, schema, vocab, stamp, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="RUN_DIR written by train/run.py")
    parser.add_argument("--output", required=True, help="new directory for the artifact")
    args = parser.parse_args(argv)
    try:
        manifest = export_run(args.run, args.output)
    except (
        RunError,
        ConfigError,
        SchemaError,
        EncodingContractError,
        ArtifactError,
        ProgramError,
        CheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    print(
        json.dumps(
            {
                "run": manifest["run"]["run_id"],
                "files": sizes,
                "total_bytes": manifest["total_bytes"],
                "tensor_elements": manifest["tensor_elements"],
                "tensor_bytes": manifest["tensor_bytes"],
            },
            indent=2,
        )
    )
    return 0


def cli() -> None:
    """The command line, also installed as `mkt-export` (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
