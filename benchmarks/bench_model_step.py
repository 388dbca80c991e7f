"""Rows/s of one worker's training step with dense against sparse embedding tables, by vocabulary.

    python benchmarks/bench_model_step.py --schema SAMPLES_DIR [--model mem] [--users 24003 5000000]
                                    [--items 9579 2100000] [--batch-size 1024] [--steps 20]

The step is the training loop's (forward, loss plus the embedding L2, backward, optimiser
step; train/optim.py builds the optimiser, as in training) on in-memory batches, one torch
thread, no Ray and no data path: it isolates what the tables' size costs. The schema is a
samples directory's feature_schema.json with the vocabularies of `user_id` and of the item
feature set to each `--users` / `--items` pair; the batch's indices are drawn uniformly from
them (every row of a Tenrec-size table is as likely as any, the sparse path's worst case),
the other features from their own vocabularies, sequences half full. docs/training.md,
"Sparse embeddings", records the figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import resized
from mkt.contract import FIRST_INDEX
from mkt.features import Batch
from mkt.models import build_model
from mkt.schema import FeatureSchema
from train.config import load_run_config
from train.optim import build_optimizer, use_sparse_embeddings


def random_batch(schema: FeatureSchema, rows: int, generator: torch.Generator) -> Batch:
    """`rows` rows of every entity in turn, indices uniform over each vocabulary."""
    items = schema.feature(schema.item_feature).vocab_size
    batch: Batch = {}
    for f in schema.features:
        if f.group == "sequence":
            slots = torch.randint(FIRST_INDEX, items, (rows, schema.seq_len), generator=generator)
            length = torch.full((rows,), schema.seq_len // 2)
            slots[:, schema.seq_len // 2 :] = 0
            batch[f.name], batch[f.length_column] = slots, length
        else:
            values = torch.randint(FIRST_INDEX, f.vocab_size, (rows,), generator=generator)
            batch[f.name] = values
    entity = torch.arange(rows) % len(schema.entities)
    for e, index in ((e, schema.entity_index(e)) for e in schema.entities):
        for f in schema.specific_features(e):
            batch[f.name] = torch.where(entity == index, batch[f.name], 0)
    batch["entity_index"] = entity
    batch["label"] = (torch.rand(rows, generator=generator) < 0.03).float()
    return batch


def rows_per_second(
    schema: FeatureSchema,
    model_name: str,
    sparse: bool,
    batch_size: int,
    steps: int,
    sparse_min_rows: int,
) -> float:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(model_name, schema, {})
    batches = [random_batch(schema, batch_size, generator) for _ in range(steps + 2)]
    model.count_embedding_rows(batches)
    if sparse:
        use_sparse_embeddings(model, torch.device("cpu"), world=1, min_rows=sparse_min_rows)
    opts = {"lr": 1e-3, "embedding_lr": None, "weight_decay": 0.0}
    optimizer = build_optimizer(model, opts)
    times = []
    for batch in batches:
        started = time.perf_counter()
        loss = model.loss(batch, model(batch))["loss"] + model.embedding_l2(batch) / batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    # The first two steps allocate the optimiser's state.
    return batch_size * steps / sum(times[2:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", required=True, help="a samples directory (its schema file)")
    parser.add_argument("--model", default="mem")
    parser.add_argument("--users", type=int, nargs="+", default=[24003, 5_000_000])
    parser.add_argument("--items", type=int, nargs="+", default=[9579, 2_100_000])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--sparse-min-rows",
        type=int,
        default=load_run_config(None, [])["train"]["sparse_min_rows"],
        help="with sparse gradients, only tables of at least this many rows (train config's)",
    )
    args = parser.parse_args(argv)
    if len(args.users) != len(args.items):
        parser.error("--users and --items: one item count per user count")
    torch.set_num_threads(1)
    base = FeatureSchema.load(args.schema)
    print(f"{args.model}, batch {args.batch_size}, one thread, {args.steps} steps\n")
    print("| user_id rows | item rows | dense rows/s | sparse rows/s | sparse / dense |")
    print("|---|---|---|---|---|")
    for users, items in zip(args.users, args.items, strict=True):
        schema = resized(base, users, items)
        dense, sparse = (
            rows_per_second(
                schema, args.model, s, args.batch_size, args.steps, args.sparse_min_rows
            )
            for s in (False, True)
        )
        print(
            f"| {users:,} | {items:,} | {dense:,.0f} | {sparse:,.0f} | {sparse / dense:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
