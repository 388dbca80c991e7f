"""Evaluation on the target test rows: predictions table, metrics, oracle.

Scoring streams the test rows through a pool of Ray Data actors holding the final model (or,
for a test set of at most `eval.driver_scoring_rows`, through the same `Scorer` in the driver)
and writes `RUN_DIR/predictions` (Delta: entity, line_no, user_key, label, score), so every
score traces back to its raw line. The metrics then read only those five columns (plus one count per
user for the activity groups) into the driver: scores, never features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from deltalake import DeltaTable, write_deltalake
from ray.data import ActorPoolStrategy, SaveMode

from mkt.features import to_tensors
from mkt.like_rate import Counts, fit_strength, like_rate_scores
from mkt.metrics import evaluate
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, build_chain
from train.data import entity_rows, model_columns, read_samples

PREDICTIONS_DIR = "predictions"
ORACLE_FILE = "oracle.parquet"


class Scorer:
    """Ray Data actor: rebuilds the pipeline's final model once, then scores batches."""

    def __init__(
        self, schema: dict[str, Any], chain: list[dict[str, Any]], torch_threads: int
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.schema = FeatureSchema.from_dict(schema)
        self.model = build_chain(self.schema, [ModelLink.from_dict(c) for c in chain]).eval()
        cols = self.schema.columns
        self.passthrough = [cols["entity"], cols["line_no"], cols["user_key"]]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logit = self.model(to_tensors(self.schema, batch))["logit"]
        out = {name: np.asarray(batch[name]) for name in self.passthrough}
        out["label"] = np.asarray(batch[self.schema.columns["label"]]).astype(np.int8)
        out["score"] = torch.sigmoid(logit).double().numpy()
        return out


def write_predictions(
    samples_dir: Path,
    schema: FeatureSchema,
    chain: Sequence[ModelLink],
    run_dir: Path,
    config: dict[str, Any],
) -> Path:
    cols = schema.columns
    extra = [cols["line_no"], cols["user_key"]]
    target = schema.target_entity
    test_rows = entity_rows(samples_dir, schema, target, "test")
    if test_rows == 0:
        raise ValueError(f"{samples_dir}: no test rows of the target entity {target!r}")
    rows = read_samples(samples_dir, schema, [target], "test", [*model_columns(schema), *extra])
    scaling, batch_size = config["scaling"], config["train"]["eval_batch_size"]
    scorer = {
        "schema": schema.to_dict(),
        "chain": [link.to_dict() for link in chain],
        "torch_threads": scaling["torch_threads"],
    }
    path = run_dir / PREDICTIONS_DIR
    if test_rows <= config["eval"]["driver_scoring_rows"]:
        score = Scorer(**scorer)
        batches = rows.iter_batches(batch_size=batch_size, batch_format="numpy")
        scored = pa.concat_tables(pa.table(score(batch)) for batch in batches)
        write_deltalake(str(path), scored, mode="overwrite", schema_mode="overwrite")
        return path
    rows.map_batches(
        Scorer,
        fn_constructor_kwargs=scorer,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=scaling["num_workers"]),
        num_cpus=scaling["cpus_per_worker"],
    ).write_delta(str(path), mode=SaveMode.OVERWRITE)
    return path


def read_predictions(path: Path) -> pd.DataFrame:
    return DeltaTable(str(path)).to_pyarrow_table().to_pandas()


def train_counts(samples_dir: Path, schema: FeatureSchema, key: str) -> Counts:
    """Target-entity train rows and likes per value of column `key`. Each read block is
    counted where it is read; the driver only adds up those partial counts (at most one row
    per key and block), so no train row reaches it."""
    label = schema.columns["label"]
    train = read_samples(samples_dir, schema, [schema.target_entity], "train", [key, label])
    partial = train.map_batches(
        lambda block: block.group_by(key).aggregate([(label, "count"), (label, "sum")]),
        batch_format="pyarrow",
        batch_size=None,
    ).to_pandas()
    total = partial.groupby(key)[[f"{label}_count", f"{label}_sum"]].sum()
    return Counts.of(
        total.index.to_numpy(),
        total[f"{label}_count"].to_numpy(),
        total[f"{label}_sum"].to_numpy(),
    )


def like_rate_floor(
    samples_dir: Path, schema: FeatureSchema, users: Counts, line_no: np.ndarray
) -> tuple[np.ndarray, float]:
    """The smoothed like-rate floor (mkt.like_rate) of the given target test lines, its prior
    strength chosen on the target validation rows; returns (scores, strength)."""
    key, item, label = schema.columns["user_key"], schema.item_feature, schema.columns["label"]
    line = schema.columns["line_no"]
    prior = schema.like_rate(schema.target_entity, "train")
    if prior is None:  # a schema file from before `likes` was recorded
        prior = float(users.likes.sum() / max(users.rows.sum(), 1.0))
    items = train_counts(samples_dir, schema, item)
    target = [schema.target_entity]
    valid = read_samples(samples_dir, schema, target, "valid", [key, item, label]).to_pandas()
    strength = fit_strength(
        users, items, prior, valid[key].to_numpy(), valid[item].to_numpy(), valid[label].to_numpy()
    )
    test = read_samples(samples_dir, schema, target, "test", [line, key, item]).to_pandas()
    test = test.set_index(line).reindex(line_no)
    scores = like_rate_scores(
        users, items, prior, test[key].to_numpy(), test[item].to_numpy(), strength
    )
    return scores, strength


def oracle_path(schema: FeatureSchema, given: str | None) -> Path | None:
    """`--oracle PATH`, else the generator's file beside the raw input, if there is one."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--oracle {path}: no such file")
        return path
    raw_dir = schema.raw_input.get("dir")
    if raw_dir and (Path(raw_dir) / ORACLE_FILE).is_file():
        return Path(raw_dir) / ORACLE_FILE
    return None


def oracle_scores(path: Path, schema: FeatureSchema, line_no: np.ndarray) -> np.ndarray:
    """The generator's true like probability of each given target line (joined on entity,
    line_no)."""
    table = pads.dataset(str(path)).to_table(
        columns=["line_no", "p_like"], filter=pc.field("entity") == schema.target_entity
    )
    truth = pd.Series(table.column("p_like").to_numpy(), index=table.column("line_no").to_numpy())
    if not truth.index.is_unique:
        raise ValueError(f"{path}: duplicate (entity, line_no) rows")
    p = truth.reindex(line_no)
    if p.isna().any():
        missing = line_no[p.isna().to_numpy()][:5]
        raise ValueError(
            f"{path}: no oracle row for {schema.target_entity} lines {list(missing)}; "
            "was the data generated together with this oracle file?"
        )
    return p.to_numpy()


def test_metrics(
    predictions: pd.DataFrame,
    activity: np.ndarray,
    boundaries: Sequence[float],
    references: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Metrics of the model's scores and of each reference scorer's (the floor, the oracle)
    on the same rows."""
    labels = predictions["label"].to_numpy().astype(np.int64)
    users = predictions["user_key"].to_numpy()
    scorers = {"model": predictions["score"].to_numpy(), **references}
    return {
        name: evaluate(labels, scores, users, activity, boundaries)
        for name, scores in scorers.items()
    }


def evaluate_run(
    samples_dir: Path,
    schema: FeatureSchema,
    chain: Sequence[ModelLink],
    run_dir: Path,
    config: dict[str, Any],
    oracle: Path | None,
) -> dict[str, Any]:
    path = write_predictions(samples_dir, schema, chain, run_dir, config)
    return evaluate_predictions(samples_dir, schema, path, config, oracle)


def evaluate_predictions(
    samples_dir: Path,
    schema: FeatureSchema,
    predictions_path: Path,
    config: dict[str, Any],
    oracle: Path | None,
) -> dict[str, Any]:
    """The test metrics of a predictions table (whoever scored it: the runner above, or
    jobs/reproduce_tables.py --in-memory), with the activity groups and the reference scorers
    on the same rows."""
    predictions = read_predictions(predictions_path)
    line_no = predictions["line_no"].to_numpy()
    per_user = train_counts(samples_dir, schema, schema.columns["user_key"])
    activity = per_user.lookup(predictions["user_key"].to_numpy())[0].astype(np.int64)
    floor, strength = like_rate_floor(samples_dir, schema, per_user, line_no)
    references = {"like_rate": floor}
    if oracle:
        references["oracle"] = oracle_scores(oracle, schema, line_no)
    test = test_metrics(predictions, activity, config["eval"]["activity_boundaries"], references)
    test["like_rate"]["prior_strength"] = strength
    return test
