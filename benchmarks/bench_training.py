"""Training throughput: the full Ray path against one plain PyTorch process (the ceiling).

    python benchmarks/bench_training.py --samples OUT_DIR [--epochs 2] [--workers 1 2]
                                  [--output runs/bench_training.json] [key=value ...]

For MEM (both entities' train rows) and TEM (target train rows, on a frozen MEM), it runs one
stage exactly as train/run.py does (Delta -> Ray Data streams -> Ray Train workers, DDP, mixed
batches, checkpoints) with 1 and 2 workers, and takes the rows per second of the last epoch
(the first one also pays for starting the data streams). The ceiling is the same model and
optimizer stepping through the same rows held as tensors in this process, sliced into batches
of the same size (`--ceiling-threads`, default 1). Reported: rows/s of both
and their ratio, from one run. docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from deltalake import DeltaTable

from benchmarks.common import STAGES, bench_config
from mkt.features import to_tensors
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, build_chain
from train.cluster import ray_session


def in_memory_rows(samples_dir: Path, schema: FeatureSchema, entities: list[str]) -> dict:
    table = DeltaTable(str(samples_dir / "samples")).to_pandas(
        partitions=[("split", "=", "train"), ("entity", "in", entities)]
    )
    return to_tensors(schema, {c: table[c].to_numpy() for c in table.columns})


def ceiling_rows_per_s(
    schema: FeatureSchema,
    chain: list[ModelLink],
    data: dict[str, torch.Tensor],
    batch_size: int,
    lr: float,
    epochs: int,
    threads: int,
) -> float:
    """The stage's training step on tensors already in memory; rows/s of the last epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_chain(schema, chain)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = int(data["label"].shape[0])
    rate = 0.0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(rows)
        started = time.perf_counter()
        for i in range(0, rows, batch_size):
            batch = {k: v[order[i : i + batch_size]] for k, v in data.items()}
            loss = model.loss(batch, model(batch))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rate = rows / (time.perf_counter() - started)
    return rate


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, type=Path, help="OUT_DIR of the ETL")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    # One thread by default: on a busy 2-core machine a second intra-op thread mostly adds
    # spin-waits (a run with 2 threads under load took many times longer than with 1).
    parser.add_argument("--ceiling-threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("runs/bench_training.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = parser.parse_args(argv)
    samples_dir = args.samples.resolve()
    base = bench_config(args.epochs, args.overrides)
    schema = FeatureSchema.load(samples_dir)
    results = []
    with ray_session(base):
        # Imported only now: Ray's environment is set before Ray is first imported.
        from train.data import stage_entities
        from train.stage import run_stage

        for name, (stage, ancestors) in STAGES.items():
            chain = [*ancestors, ModelLink(stage.model, {})]
            for workers in args.workers:
                config = bench_config(
                    args.epochs, [*args.overrides, f"scaling.num_workers={workers}"]
                )
                with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
                    result = run_stage(stage, config, schema, samples_dir, Path(run_dir), chain)
                last = result.state.history[-1]
                results.append(
                    {
                        "model": name,
                        "workers": workers,
                        "rows": last["train_rows"],
                        "ray_rows_per_s": last["rows_per_s"],
                    }
                )
            data = in_memory_rows(samples_dir, schema, stage_entities(schema, stage.entities))
            ceiling = ceiling_rows_per_s(
                schema,
                chain,
                data,
                base["train"]["batch_size"],
                base["train"]["lr"],
                args.epochs,
                args.ceiling_threads,
            )
            for r in results:
                if r["model"] == name:
                    r.update(ceiling_rows_per_s=ceiling, ratio=r["ray_rows_per_s"] / ceiling)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results, base, args.ceiling_threads))
    return results


def table(results: list[dict[str, Any]], config: dict[str, Any], ceiling_threads: int) -> str:
    t = config["train"]
    lines = [
        f"batch {t['batch_size']}, {config['scaling']['cpus_per_worker']} CPU and "
        f"{config['scaling']['torch_threads']} torch thread(s) per worker; ceiling: one process "
        f"on in-memory tensors, {ceiling_threads} torch thread(s)",
        "",
        "| model | workers | rows/epoch | Ray rows/s | in-memory rows/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['workers']} | {int(r['rows'])} | {r['ray_rows_per_s']:,.0f} "
            f"| {r['ceiling_rows_per_s']:,.0f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
