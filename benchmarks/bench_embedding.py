"""Seconds per training step of one embedding table, by its number of rows: dense against sparse.

    python benchmarks/bench_embedding.py --rows 33588 7100000 [--device cpu|cuda] [--threads 1]
                                   [--batch-size 1024] [--modes dense sparse]

The models hold one `nn.Embedding` per feature with a dense gradient and Adam (mkt/layers,
train/loop.py): every step then writes a gradient for, and updates the Adam moments of, every
row of the table, whatever the batch looked up, and with more than one worker DDP all-reduces
that whole gradient. `dense` times that; `sparse` is the alternative, `sparse=True` with
`torch.optim.SparseAdam`, which touches only the rows the batch looked up. A step here is one
batch's lookups of the model's largest table: user and item id plus two item sequences of 20
slots, 42 lookups a row. Only torch is needed, so it also runs on a machine without this
project's other dependencies. docs/SCALING.md uses the figures.
"""

from __future__ import annotations

import argparse
import time

import torch


def step_seconds(
    rows: int, batch_size: int, mode: str, device: str, steps: int = 5, dim: int = 8
) -> float:
    """Median seconds of one forward, backward and optimizer step (the first step, which also
    allocates the optimizer's state, is not counted)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(rows, dim, sparse=mode == "sparse", device=device)
    optimizer: torch.optim.Optimizer = (
        torch.optim.SparseAdam(table.parameters(), lr=1e-3)
        if mode == "sparse"
        else torch.optim.Adam(table.parameters(), lr=1e-3)
    )
    times = []
    for _ in range(steps + 1):
        index = torch.randint(0, rows, (batch_size, 42), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = table(index).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    del table, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return sorted(times[1:])[steps // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument(
        "--modes", nargs="+", choices=("dense", "sparse"), default=["dense", "sparse"]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    )
    print(f"{where}, batch {args.batch_size}, dimension 8\n")
    print("| table rows | fp32 weights MB | mode | seconds per step | batch rows/s bound |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        for mode in args.modes:
            seconds = step_seconds(rows, args.batch_size, mode, args.device)
            print(
                f"| {rows:,} | {rows * 8 * 4 / 1e6:,.0f} | {mode} | {seconds:.4f} "
                f"| {args.batch_size / seconds:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
