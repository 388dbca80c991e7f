"""Training throughput: the full Ray path against one plain PyTorch process (the ceiling).

    python benchmarks/bench_training.py --samples OUT_DIR [--epochs 2] [--workers 1 2]
                                  [--output runs/bench_training.json] [--against COMMIT]
                                  [--tables USERS ITEMS] [key=value ...]

For MEM (both entities' train rows) and TEM (target train rows, on a frozen MEM), it runs one
stage exactly as train/run.py does (Delta -> Ray Data streams -> Ray Train workers, DDP, mixed
batches, checkpoints) with 1 and 2 workers, and takes the rows per second of the last epoch
(the first one also pays for starting the data streams). The ceiling is the same model and
optimizer stepping through the same rows held as tensors in this process, sliced into batches
of the same size (`--ceiling-threads`, default 1). Reported: rows/s of both
and their ratio, from one run. With `--against COMMIT` the same benchmark first runs on that
commit's code (a git worktree, in a subprocess, same samples and settings), then on this one, and
a last table gives this code's rows/s over that commit's. `--tables USERS ITEMS` builds the
models with `user_id` and item tables of that many rows (e.g. Tenrec's 5000000 2100000) over the
same samples: what the tables' size costs a step, the data path unchanged (add
`train.sparse_embeddings=true`). docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from deltalake import DeltaTable

from benchmarks.common import STAGES, bench_config, resized
from mkt.features import to_tensors
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, build_chain
from train.cluster import ray_session
from train.optim import build_optimizer, use_sparse_embeddings


def in_memory_rows(samples_dir: Path, schema: FeatureSchema, entities: list[str]) -> dict:
    table = DeltaTable(str(samples_dir / "samples")).to_pandas(
        partitions=[("split", "=", "train"), ("entity", "in", entities)]
    )
    return to_tensors(schema, {c: table[c].to_numpy() for c in table.columns})


def ceiling_rows_per_s(
    schema: FeatureSchema,
    chain: list[ModelLink],
    data: dict[str, torch.Tensor],
    train: dict[str, Any],
    epochs: int,
    threads: int,
) -> float:
    """The stage's training step (the loop's optimizer and embedding L2) on tensors already
    in memory; rows/s of the last epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_chain(schema, chain)
    # The same tables on sparse gradients as the Ray run's (else a dense step over Tenrec-size
    # tables, 0.69 s, would be the ceiling's whole cost).
    if train["sparse_embeddings"]:
        use_sparse_embeddings(
            model, torch.device("cpu"), world=1, min_rows=train["sparse_min_rows"]
        )
    optimizer = build_optimizer(model, train)
    rows, batch_size = int(data["label"].shape[0]), train["batch_size"]
    l2 = train["embedding_l2"] if model.embedding_tables() else 0.0

    def batches() -> Any:
        order = torch.randperm(rows)
        for i in range(0, rows, batch_size):
            yield {k: v[order[i : i + batch_size]] for k, v in data.items()}

    if l2 > 0:
        model.count_embedding_rows(batches())
    rate = 0.0
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for batch in batches():
            loss = model.loss(batch, model(batch))["loss"]
            if l2 > 0:
                loss = loss + l2 * model.embedding_l2(batch) / batch["label"].shape[0]
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
    parser.add_argument(
        "--against", metavar="COMMIT", help="also run the benchmark on this commit's code, first"
    )
    parser.add_argument("--tables", type=int, nargs=2, metavar=("USERS", "ITEMS"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = parser.parse_args(argv)
    samples_dir = args.samples.resolve()
    base = bench_config(args.epochs, args.overrides)
    before = None
    if args.against:
        before = run_at_commit(
            args.against, samples_dir, args, args.output.with_suffix(".before.json")
        )
    schema = FeatureSchema.load(samples_dir)
    if args.tables:
        schema = resized(schema, *args.tables)
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
                schema, chain, data, base["train"], args.epochs, args.ceiling_threads
            )
            for r in results:
                if r["model"] == name:
                    r.update(ceiling_rows_per_s=ceiling, ratio=r["ray_rows_per_s"] / ceiling)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results, base, args.ceiling_threads))
    if before is not None:
        print(f"\nthis code against {args.against}, same run:\n\n{speedup_table(before, results)}")
    return results


def run_at_commit(commit: str, samples_dir: Path, args: argparse.Namespace, output: Path) -> list:
    """This benchmark with the same arguments on another commit's code: a temporary git
    worktree, run in a subprocess that imports only that code (its own embedded Ray)."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-against-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), commit],
            check=True,
            capture_output=True,
        )
        try:
            command = [
                sys.executable,
                "benchmarks/bench_training.py",
                "--samples",
                str(samples_dir),
                "--epochs",
                str(args.epochs),
                "--workers",
                *map(str, args.workers),
                "--ceiling-threads",
                str(args.ceiling_threads),
                "--output",
                str(output.resolve()),
                *(["--tables", *map(str, args.tables)] if args.tables else []),
                *args.overrides,
            ]
            print(f"[bench] {commit}: {' '.join(command[1:])}", flush=True)
            env = dict(os.environ, PYTHONPATH=str(tree))
            subprocess.run(command, cwd=tree, env=env, check=True)
        finally:
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False
            )
    return json.loads(output.read_text())


def speedup_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    old = {(r["model"], r["workers"]): r for r in before}
    lines = [
        "| model | workers | Ray rows/s before | Ray rows/s now | now / before |",
        "|---|---|---|---|---|",
    ]
    for r in after:
        b = old.get((r["model"], r["workers"]))
        if b is None:
            continue
        lines.append(
            f"| {r['model']} | {r['workers']} | {b['ray_rows_per_s']:,.0f} "
            f"| {r['ray_rows_per_s']:,.0f} | {r['ray_rows_per_s'] / b['ray_rows_per_s']:.2f} |"
        )
    return "\n".join(lines)


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
