"""The all-reduce of the embedding tables' sparse gradients between workers, with dense
collectives, in place of DDP's sparse buckets.

DDP reduces a sparse-gradient parameter with the process group's sparse all-reduce (on gloo,
`AsyncSparseAllreduceWork` on the group's worker thread while backward goes on). On that path
a worker of the test suite's 2-worker run died of heap corruption three times in two suite
runs (`malloc(): unaligned tcache chunk detected`, each time on a thread the process group
started, never on the dense-gradient path; docs/training.md, "Sparse gradients between
workers"). So the tables are left out of DDP (`leave_out_of_ddp`, as TorchRec leaves its
sharded tables out) and, after backward, every worker gathers every worker's (row, value)
pairs with `all_gather` on dense tensors, padded to the largest worker's count: three
collectives a step for all tables together. Every worker then holds the same gradient, the
mean over workers as DDP's, with one entry per distinct row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def leave_out_of_ddp(model: nn.Module, tables: list[nn.Parameter]) -> None:
    """Before DDP wraps `model`: DDP neither broadcasts nor reduces these parameters."""
    ids = {id(t) for t in tables}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


class SparseGradients:
    """The tables DDP leaves alone: `broadcast` once (DDP's start), `all_reduce` after every
    backward (DDP's gradient reduction)."""

    def __init__(self, tables: list[nn.Parameter], world: int) -> None:
        self.tables = tables
        self.world = world

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Every worker starts from `src`'s tables, as DDP starts from rank 0's parameters."""
        for table in self.tables:
            dist.broadcast(table.data, src=src)

    def _gather(self, local: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Every worker's `local` (1-D), padded to `length` (at least 1: no empty messages)
        for the collective."""
        padded = local.new_zeros(max(length, 1))
        padded[: len(local)] = local
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return out

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Each table's gradient becomes the mean of every worker's (a worker that read none
        of its rows counts as zero); a table no worker read keeps no gradient."""
        if not self.tables:
            return
        rows, values = [], []
        for table in self.tables:
            if table.grad is None:
                rows.append(torch.zeros(0, dtype=torch.long, device=table.device))
                values.append(table.new_zeros(0))
                continue
            if not table.grad.is_sparse:
                raise RuntimeError("SparseGradients.all_reduce: a table's gradient is dense")
            grad = table.grad.coalesce()
            rows.append(grad.indices()[0])
            values.append(grad.values().reshape(-1))
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long, device=rows[0].device)
        all_counts = torch.stack(self._gather(counts, len(counts)))  # (world, tables)
        widths = torch.tensor([t.shape[1] for t in self.tables], device=all_counts.device)
        row_totals = all_counts.sum(1)
        value_totals = (all_counts * widths).sum(1)
        all_rows = self._gather(torch.cat(rows), int(row_totals.max()))
        all_values = self._gather(torch.cat(values), int(value_totals.max()))

        row_ends = all_counts.cumsum(1).tolist()
        value_ends = (all_counts * widths).cumsum(1).tolist()
        for t, table in enumerate(self.tables):
            parts_rows, parts_values = [], []
            for w in range(self.world):
                r0 = row_ends[w][t - 1] if t else 0
                v0 = value_ends[w][t - 1] if t else 0
                parts_rows.append(all_rows[w][r0 : row_ends[w][t]])
                parts_values.append(all_values[w][v0 : value_ends[w][t]])
            table_rows = torch.cat(parts_rows)
            if len(table_rows) == 0:
                table.grad = None
                continue
            table_values = torch.cat(parts_values).view(len(table_rows), table.shape[1])
            # Checked: a row out of the table's range would be a memory error in the step.
            table.grad = torch.sparse_coo_tensor(
                table_rows.unsqueeze(0),
                table_values / self.world,
                table.shape,
                check_invariants=True,
            ).coalesce()
