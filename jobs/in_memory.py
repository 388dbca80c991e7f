"""Settings chosen on validation without Ray: MKT or TEM alone trained in one process on
samples held in memory, every epoch a full shuffle, the same numbers for the same seed.

    python jobs/in_memory.py --samples DATA_DIR/samples --output OUT_DIR [key=value ...]
        [--model mkt] [--config conf/run/quickstart.yaml] [--mem-rows both] [--seeds 0 1 2]
        [--drop-features NAME ...]
    python jobs/in_memory.py --compare OUT_DIR_A OUT_DIR_B [OUT_DIR_C ...]

Two Ray runs of the same config differ by their block order and worker interleaving, as much
as the settings a sweep compares (docs/training.md); here a setting's effect is separated from
that noise by seeds alone. The overrides are train/run.py's keys (`params.mem.gamma=0.1`,
`train.tem_holdout=0`, `train.embedding_l2=100`), so what is chosen here is set there by the
same key. Each stage trains at most `train.epochs` epochs, stops early as train/run.py does
(`train.early_stopping`: metric and patience) and keeps its best epoch. `--mem-rows target`
trains the MEM on the target rows alone (what the source adds); `--drop-features` trains
without the named features (what they add, on the same samples). The samples must fit in
memory (the 100,000-user quick start: about 3 GB).

Writes OUT_DIR/seed<k>.json (per stage: every epoch's validation and test AUC and GAUC, the
best epoch) and OUT_DIR/seed<k>.npz (the final model's test labels, users and scores).
`--compare` prints a markdown table: each run's test AUC and GAUC (mean and standard deviation
over its seeds) and the paired bootstrap (over test users) of A's seed-mean scores minus
each other run's; `--plot PATH` draws it as a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from deltalake import DeltaTable

from mkt.features import Batch
from mkt.item_attributes import attribute_features, item_attribute_maps
from mkt.metrics import auc, gauc, paired_bootstrap
from mkt.models import build_model
from mkt.models.base import CTRModel, choose_start, start_note
from mkt.pipelines import pipeline
from mkt.schema import FeatureSchema, load_samples_dir, samples_table
from train.checks import resolved_config
from train.config import load_run_config
from train.data import (
    ModelBatches,
    entity_batch_sizes,
    holdout_bucket,
    model_columns,
    stage_entities,
)
from train.optim import BestEpoch, build_optimizer, embedding_l2_weight

REPO = Path(__file__).resolve().parents[1]
HOLDOUT_BUCKETS = 10000


class Samples:
    """The samples table in memory, as model batches per (entity, split[, target part])."""

    def __init__(self, samples_dir: Path, schema: FeatureSchema) -> None:
        c = schema.columns
        self.schema = schema
        columns = [*model_columns(schema), c["line_no"], c["split"], c["user_key"]]
        # In line order: the files' order changes with every rebuild of the same samples, and
        # an epoch's shuffle permutes row positions, so without it a seed's numbers would too.
        self.table = (
            DeltaTable(str(samples_table(samples_dir)))
            .to_pyarrow_table(columns=list(dict.fromkeys(columns)))
            .sort_by([(c["entity"], "ascending"), (c["line_no"], "ascending")])
        )
        self.collate = ModelBatches(schema, keep=[c["user_key"]])
        self._item_attributes: dict[str, torch.Tensor] | None = None

    def item_attributes(self) -> dict[str, torch.Tensor]:
        """The item -> attribute maps of the train rows (train.data.train_item_attributes)."""
        if self._item_attributes is None:
            c = self.schema.columns
            train = self.table.filter(pc.equal(self.table[c["split"]], "train"))
            names = [self.schema.item_feature, *attribute_features(self.schema)]
            self._item_attributes = item_attribute_maps(
                [{n: train[n].to_numpy() for n in names}], self.schema
            )
        return self._item_attributes

    def partition(self, entity: str, split: str) -> pa.Table:
        c = self.schema.columns
        return self.table.filter(
            pc.and_(
                pc.equal(self.table[c["entity"]], entity), pc.equal(self.table[c["split"]], split)
            )
        )

    def predictions(self, model: CTRModel) -> pa.Table:
        """The model's scores of the target test rows as the runner's predictions table
        (train/evaluate.py: entity, line_no, user_key, label, score), in `rows`' order."""
        c, target = self.schema.columns, self.schema.target_entity
        lines = self.partition(target, "test")
        return pa.table(
            {
                "entity": pa.array([target] * lines.num_rows),
                "line_no": lines[c["line_no"]],
                "user_key": lines[c["user_key"]],
                "label": pc.cast(lines[c["label"]], pa.int8()),
                "score": scores(model, self.rows(target, "test")),
            }
        )

    def rows(self, entity: str, split: str, part: str = "all", holdout: float = 0.0) -> Batch:
        """`part`: all, or the MKT stages' `pretrain` / `holdout` shares of the train rows
        (train.data.target_rows_filter's buckets)."""
        c = self.schema.columns
        table = self.partition(entity, split)
        if part != "all" and holdout > 0:
            held_out = holdout_bucket(table[c["line_no"]].to_numpy()) < round(
                holdout * HOLDOUT_BUCKETS
            )
            table = table.filter(pa.array(held_out if part == "holdout" else ~held_out))
        return self.collate(table.drop_columns([c["line_no"], c["split"]]))


def without_features(schema: FeatureSchema, names: list[str]) -> FeatureSchema:
    """The schema without the named user / shared / specific features: an ablation of what
    they give (e.g. the activity features, docs/etl.md) on the same samples, no ETL rerun."""
    known = {f.name for f in schema.features if f.group != "sequence"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(
            f"--drop-features: {unknown} not among the schema's features {sorted(known)}"
        )
    return dataclasses.replace(
        schema, features=tuple(f for f in schema.features if f.name not in names)
    )


def rows_of(batch: Batch) -> int:
    return int(batch["label"].shape[0])


def take(batch: Batch, index: Any) -> Batch:
    return {name: values[index] for name, values in batch.items()}


def mixed_batches(
    parts: dict[str, Batch], batch_size: int, generator: torch.Generator
) -> Iterator[Batch]:
    """An epoch: each entity's rows in a fresh random order, every batch holding each entity
    in proportion to its rows (as the Ray trainer's mixed streams)."""
    sizes = entity_batch_sizes({e: rows_of(b) for e, b in parts.items()}, batch_size)
    order = {e: torch.randperm(rows_of(b), generator=generator) for e, b in parts.items()}
    steps = max(-(-rows_of(b) // sizes[e]) for e, b in parts.items())
    for step in range(steps):
        chunks = [
            take(b, order[e][step * sizes[e] : (step + 1) * sizes[e]]) for e, b in parts.items()
        ]
        chunks = [chunk for chunk in chunks if rows_of(chunk)]
        yield {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}


@torch.no_grad()
def scores(model: CTRModel, batch: Batch, chunk: int = 8192) -> np.ndarray:
    model.eval()
    return (
        torch.cat(
            [
                torch.sigmoid(model(take(batch, slice(s, s + chunk)))["logit"])
                for s in range(0, rows_of(batch), chunk)
            ]
        )
        .double()
        .numpy()
    )


def metrics(model: CTRModel, batch: Batch, user_key: str) -> dict[str, float]:
    probs, labels = scores(model, batch), batch["label"].numpy().astype(np.int64)
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, batch[user_key].numpy())[0]}


def train_stage(
    model: CTRModel,
    parts: dict[str, Batch],
    eval_sets: dict[str, Batch],
    config: dict,
    seed: int,
    name: str,
    score_start: bool = False,
) -> dict[str, Any]:
    """Train at most `train.epochs` epochs, stop after `train.early_stopping.patience` without
    a better validation score, going back to the best after each of them at a decayed step
    (`plateau_lr_factor`), as train/run.py; keep the best; returns the history. With
    `score_start` (a stage built on trained ones) the untrained model is a candidate too, as
    "epoch 0", outside the history, from the best of its starts (train/loop.py)."""
    opts = config["train"]
    optimizer = build_optimizer(model, opts)
    l2 = opts["embedding_l2"] if model.embedding_tables() else 0.0
    if l2 > 0:
        model.count_embedding_rows(
            mixed_batches(parts, opts["batch_size"], torch.Generator().manual_seed(seed))
        )
    generator = torch.Generator().manual_seed(seed)
    user_key, metric = config["schema_user_key"], opts["early_stopping"]["metric"]
    patience = opts["early_stopping"]["patience"]
    lr_factor = opts["early_stopping"]["plateau_lr_factor"]
    history: list[dict[str, Any]] = []
    best, start, kept = None, None, BestEpoch()
    if score_start:
        start, starts = choose_start(
            model,
            lambda: {"epoch": 0, **{k: metrics(model, b, user_key) for k, b in eval_sets.items()}},
            lambda scored: scored["valid"][metric],
        )
        best = starts[start]
        kept.keep(model, optimizer)
        note = start_note(start, {k: v["valid"]["auc"] for k, v in starts.items()})
        print(f"[{name}] before epoch 1: valid {best['valid']}{note}", flush=True)
    step = 0
    for epoch in range(1, opts["epochs"] + 1):
        started = time.perf_counter()
        model.train()
        for batch in mixed_batches(parts, opts["batch_size"], generator):
            step += 1
            loss = model.loss(batch, model(batch))["loss"]
            if l2 > 0:
                weight = embedding_l2_weight(opts, step)
                loss = loss + weight * model.embedding_l2(batch) / rows_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        record = {"epoch": epoch, **{k: metrics(model, b, user_key) for k, b in eval_sets.items()}}
        record["seconds"] = round(time.perf_counter() - started, 1)
        history.append(record)
        print(f"[{name}] epoch {epoch}: valid {record['valid']}, {record['seconds']} s", flush=True)
        if best is None or record["valid"][metric] > best["valid"][metric]:
            best = record
            kept.keep(model, optimizer)
            continue
        if lr_factor < 1:
            kept.restore(model, optimizer, lr_factor)
            record["restored_epoch"] = best["epoch"]
        if epoch - best["epoch"] >= patience:
            break
    kept.restore(model, optimizer, 1.0)
    return {"best_epoch": best["epoch"], "best": best, "history": history, "start": start}


def run_seed(
    samples: Samples, config: dict, seed: int, mem_rows: str
) -> tuple[dict, dict[str, CTRModel]]:
    """Every stage of the pipeline in order; returns the history and the trained stages."""
    schema = samples.schema
    target, source = schema.target_entity, schema.source_entity
    holdout = config["train"]["tem_holdout"]
    result: dict[str, Any] = {"seed": seed}
    trained: dict[str, CTRModel] = {}
    for stage in pipeline(config["model"]):
        torch.manual_seed(seed + len(trained))
        params = config["params"].get(stage.name, {})
        pretrained = tuple(trained[name] for name in stage.built_on)
        model = build_model(stage.model, schema, params, pretrained=pretrained)
        if config["train"]["item_attributes"]:
            model.use_item_attributes(samples.item_attributes())
        entities = stage_entities(schema, stage.entities)
        if stage.entities == "both" and mem_rows == "target":
            entities = [target]
        parts = {
            e: samples.rows(e, "train", stage.target_rows if e == target else "all", holdout)
            for e in entities
        }
        # A stage on the source alone (a Finetune pre-training) is chosen on the source's
        # validation rows, as train/stage.py does.
        scored = source if stage.entities == "source" else target
        eval_sets = {"valid": samples.rows(scored, "valid"), "test": samples.rows(scored, "test")}
        result[stage.name] = train_stage(
            model, parts, eval_sets, config, seed, stage.name, score_start=bool(pretrained)
        )
        result[stage.name]["train_rows"] = {e: rows_of(b) for e, b in parts.items()}
        result[stage.name]["scored_entity"] = scored
        trained[stage.name] = model
    return result, trained


def load_scores(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, users, scores [seeds, rows]) of the test rows a run directory scored."""
    runs = [np.load(p) for p in sorted(directory.glob("seed*.npz"))]
    if not runs:
        raise SystemExit(f"--compare: no seed*.npz in {directory}")
    return runs[0]["labels"], runs[0]["users"], np.stack([r["scores"] for r in runs])


def chosen_valid_auc(directory: Path) -> float | None:
    """The seed mean of the last stage's validation AUC at its chosen epoch."""
    values = []
    for path in sorted(directory.glob("seed*.json")):
        result = json.loads(path.read_text())
        last = [k for k, v in result.items() if isinstance(v, dict) and "best" in v][-1]
        values.append(result[last]["best"]["valid"]["auc"])
    return float(np.mean(values)) if values else None


def plot(rows: list[dict[str, Any]], base: str, path: Path) -> None:
    """Test AUC and GAUC per run as bars (error bars: standard deviation over seeds), each
    labelled with the base's paired difference to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("auc", "gauc"), strict=True):
        means = [r[metric][0] for r in rows]
        ax.barh(names, means, xerr=[r[metric][1] for r in rows], color="tab:blue")
        ax.set_xlim(min(means) - 0.02, max(means) + 0.05)
        ax.set_title(f"target test {metric.upper()} (seed mean)\n{base} minus each [95%]")
        for y, r in enumerate(rows):
            gain = r.get(f"{metric}_gain")
            label = f"{r[metric][0]:.4f}" + (
                f"\n{gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}]" if gain else ""
            )
            ax.text(r[metric][0] + r[metric][1] + 0.001, y, label, va="center", fontsize=7)
    axes[0].invert_yaxis()  # the axes share y: the base on top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    base: Path, others: list[Path], resamples: int = 1000, plot_path: Path | None = None
) -> list[dict[str, Any]]:
    """Each run's seed-mean test metrics, and the paired bootstrap (over test users) of
    `base`'s seed-mean scores minus each other run's; printed as a markdown table."""
    labels, users, base_scores = load_scores(base)
    rows = []
    for directory in [base, *others]:
        labels_b, _, scores_b = load_scores(directory)
        if not np.array_equal(labels, labels_b):
            raise SystemExit(f"--compare: {base} and {directory} scored different test rows")
        row: dict[str, Any] = {
            "run": directory.name,
            "seeds": len(scores_b),
            "valid_auc": chosen_valid_auc(directory),
        }
        for metric, fn in (("auc", auc), ("gauc", lambda y, p: gauc(y, p, users)[0])):
            per_seed = [fn(labels, s) for s in scores_b]
            row[metric] = (
                float(np.mean(per_seed)),
                float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            )
        if directory != base:
            gains = paired_bootstrap(labels, base_scores, scores_b, users, resamples=resamples)
            row["groups"] = gains["groups"]
            for metric in ("auc", "gauc"):
                row[f"{metric}_gain"] = (gains[metric]["difference"], *gains[metric]["interval_95"])
        rows.append(row)
    print(
        f"| run | seeds | valid AUC | test AUC | test GAUC | {base.name} - run, AUC [95%] "
        "| GAUC [95%] |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        gain = [
            "{:+.4f} [{:+.4f}, {:+.4f}]".format(*row[f"{m}_gain"]) if f"{m}_gain" in row else ""
            for m in ("auc", "gauc")
        ]
        stats = ["{:.4f} ± {:.4f}".format(*row[m]) for m in ("auc", "gauc")]
        valid = "" if row["valid_auc"] is None else f"{row['valid_auc']:.4f}"
        print(
            f"| {row['run']} | {row['seeds']} | {valid} | {stats[0]} | {stats[1]} | {gain[0]} "
            f"| {gain[1]} |"
        )
    if plot_path is not None:
        plot(rows, base.name, plot_path)
    if len(rows) > 1:
        print(
            f"\n(paired bootstrap over the {rows[1]['groups']} test users, {resamples} resamples, "
            "each run's metric the mean of its seeds'; ± is the standard deviation over seeds)"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--model", default="mkt", help="mkt, tem_only or another pipeline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "run" / "quickstart.yaml")
    parser.add_argument("--mem-rows", choices=["both", "target"], default="both")
    parser.add_argument(
        "--drop-features",
        nargs="+",
        default=[],
        metavar="NAME",
        help="train without these features of the schema (an ablation)",
    )
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--plot", type=Path, help="with --compare: the table as a PNG")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare needs a base run and at least one other")
        compare(args.compare[0], args.compare[1:], plot_path=args.plot)
        return 0
    if args.samples is None or args.output is None:
        parser.error("--samples and --output are required (or --compare A B ...)")
    torch.set_num_threads(1)
    config = resolved_config(load_run_config(args.config, [f"model={args.model}", *args.overrides]))
    schema = without_features(load_samples_dir(args.samples), args.drop_features)
    samples = Samples(args.samples, schema)
    config["schema_user_key"] = schema.columns["user_key"]
    args.output.mkdir(parents=True, exist_ok=True)
    test = samples.rows(schema.target_entity, "test")
    for seed in args.seeds:
        result, trained = run_seed(samples, config, seed, args.mem_rows)
        result["config"] = {k: config[k] for k in ("model", "params", "train")}
        result["mem_rows"] = args.mem_rows
        result["dropped_features"] = args.drop_features
        (args.output / f"seed{seed}.json").write_text(json.dumps(result, indent=1, default=str))
        stages = list(trained)
        for name, model in trained.items():
            if result[name]["scored_entity"] != schema.target_entity:
                continue
            # The last stage's scores are the run's; an earlier stage's that score the target
            # (MKT's MEM: the "w/o TEM" ablation) go to stages/<name>/, comparable the same way.
            directory = args.output if name == stages[-1] else args.output / "stages" / name
            directory.mkdir(parents=True, exist_ok=True)
            np.savez(
                directory / f"seed{seed}.npz",
                labels=test["label"].numpy(),
                users=test[schema.columns["user_key"]].numpy(),
                scores=scores(model, test),
            )
        last = result[stages[-1]]
        print(f"seed {seed}: best epoch {last['best_epoch']}, {last['best']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
