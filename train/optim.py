"""The optimiser of a stage: Adam for the dense layers, and for the embedding tables either
Adam (dense gradients) or, with `train.sparse_embeddings`, a row-wise Adam on sparse gradients.

Dense Adam steps every row of every table at every step, whatever the batch looked up: at
Tenrec's vocabularies (7.1M rows) that step alone takes 0.69 s per batch on one CPU core
(docs/BENCHMARKS.md, "Embedding tables"), and DDP all-reduces the whole table's gradient.
With sparse gradients a step touches only the rows the batch read, and the workers exchange
only those (`train.sparse_sync`; on gloo: no GPU run has checked it on NCCL, so a multi-GPU run
stays dense).
`RowAdam` is Adam restricted to the rows that have a gradient ("lazy" Adam): a row's moments
decay only when it is read, which dense Adam does at every step. docs/training.md compares
the two on the quick start. It is `torch.optim.SparseAdam`'s update, written with index
operations on dense state instead of sparse-tensor arithmetic: 2.7x faster a step on a 5M-row
table (docs/BENCHMARKS.md, "Training throughput"), the same values (tested).

Adam is the fused kernel (`fused=True`): the same update in one kernel over all parameters
instead of a loop over them, which was 14% of a MEM step on a CPU core (docs/BENCHMARKS.md,
"Training throughput").
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from mkt.contract import ConfigError
from mkt.layers import FirstOrder
from mkt.models import CTRModel


def embedding_l2_weight(opts: dict[str, Any], step: int) -> float:
    """The embedding prior's weight at optimiser step `step` (1-based, counted from the
    stage's first step): `embedding_l2`, ramped up linearly over `embedding_l2_warmup_steps`."""
    warmup = opts["embedding_l2_warmup_steps"]
    return opts["embedding_l2"] * (min(1.0, step / warmup) if warmup else 1.0)


class RowAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient names, each row's moments updated only when it is
    read: `torch.optim.SparseAdam`'s update (bias corrections from the optimiser's step count,
    eps added to the root of the second moment), with index operations."""

    def __init__(
        self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise RuntimeError("RowAdam steps sparse gradients (nn.Embedding(sparse=True))")
                grad = param.grad.coalesce()  # one value per row read
                rows, values = grad.indices()[0], grad.values()
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                first = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                second = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
                second.addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, first)
                state["exp_avg_sq"].index_copy_(0, rows, second)
                size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                update = first.div_(second.sqrt_().add_(group["eps"]))
                # Rows are distinct after coalesce: a copy back, 4x faster than index_add_.
                moved = param.index_select(0, rows).add_(update, alpha=-size)
                param.index_copy_(0, rows, moved)


class SplitOptimizer:
    """Adam on the dense layers and RowAdam on the embedding tables, stepped together;
    `state_dict` holds both, so a checkpoint resumes either."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = parts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.parts):
            raise ValueError(
                f"optimizer state holds {sorted(state)}, expected {sorted(self.parts)} "
                "(a checkpoint of a run with another train.sparse_embeddings)"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


# What a stage steps: one Adam, or the pair.
Optimizer = torch.optim.Optimizer | SplitOptimizer


def use_sparse_embeddings(
    model: CTRModel, device: torch.device, world: int, min_rows: int = 0
) -> None:
    """Switch the model's trainable tables of at least `min_rows` rows to sparse gradients.
    Before DDP wraps the model, which must leave them to `train.sparse_sync`."""
    model.use_sparse_gradients(True, min_rows)
    if device.type == "cuda" and world > 1 and sparse_tables(model):
        model.use_sparse_gradients(False)
        raise ConfigError(
            "train.sparse_embeddings: NCCL is not checked for sparse table gradients; on several GPU "
            "workers set it to false (or scaling.use_gpu: false to train on CPUs with gloo)"
        )


def sparse_tables(model: CTRModel) -> list[torch.nn.Parameter]:
    """The trainable tables switched to sparse gradients, each once."""
    found = {
        id(t.weight): t.weight
        for bank in model.embedding_banks()
        for t in bank.tables.values()
        if t.sparse and t.weight.requires_grad
    }
    return list(found.values())


def build_optimizer(model: CTRModel, opts: dict[str, Any]) -> Optimizer:
    """The embedding tables (step `embedding_lr`, no weight decay: their L2 is `embedding_l2`,
    on the rows a batch touches), the first-order weights (step `wide_lr`: a convex term that
    converges at the regression's step, not at the deep layers') and the dense layers (step
    `lr`, L2 `weight_decay`): one Adam with three parameter groups; the tables switched to
    sparse gradients (`use_sparse_embeddings`) go to a RowAdam of their own instead, with the
    same steps."""
    wide = {id(p) for m in model.modules() if isinstance(m, FirstOrder) for p in m.parameters()}
    tables = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters()
        if p.requires_grad
    }
    sparse = {id(p) for p in sparse_tables(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    table_lr = opts["embedding_lr"] or opts["lr"]
    steps = {"tables": table_lr, "wide": opts.get("wide_lr") or table_lr}

    def kind(p: torch.nn.Parameter) -> str:
        if id(p) not in tables:
            return "dense"
        return "wide" if id(p) in wide else "tables"

    def groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        by_kind: dict[str, list[torch.nn.Parameter]] = {"dense": [], "tables": [], "wide": []}
        for p in params:
            by_kind[kind(p)].append(p)
        out = [{"params": by_kind["dense"], "weight_decay": opts["weight_decay"]}]
        out += [{"params": by_kind[k], "lr": steps[k], "weight_decay": 0.0} for k in steps]
        return [g for g in out if g["params"]]

    dense_groups = groups([p for p in trainable if id(p) not in sparse])
    if not sparse:
        return torch.optim.Adam(dense_groups, lr=opts["lr"], fused=True)
    sparse_groups = [
        {k: v for k, v in g.items() if k != "weight_decay"}
        for g in groups([p for p in trainable if id(p) in sparse])
    ]
    parts: dict[str, torch.optim.Optimizer] = {"tables": RowAdam(sparse_groups, lr=table_lr)}
    if dense_groups:
        parts["dense"] = torch.optim.Adam(dense_groups, lr=opts["lr"], fused=True)
    return SplitOptimizer(parts)


def optimizer_parts(optimizer: Optimizer) -> list[torch.optim.Optimizer]:
    return list(optimizer.parts.values()) if isinstance(optimizer, SplitOptimizer) else [optimizer]


def _on_host(state: Any) -> Any:
    """A copy of a (nested) state dict with every tensor in host memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _on_host(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_on_host(v) for v in state)
    return copy.deepcopy(state)


class BestEpoch:
    """The model's and optimizer's state at the best epoch so far, for
    `train.early_stopping.plateau_lr_factor`: after an epoch without improvement, training goes
    back to it and goes on with every step size multiplied by the factor. A copy in host
    memory (the model's tables and Adam's two moments: three times the tables' size; a GPU
    holds only the live ones), not a reread of the checkpoint, which another node's worker
    cannot read."""

    def __init__(self) -> None:
        self.model: dict[str, torch.Tensor] | None = None
        self.optimizer: dict[str, Any] | None = None

    def keep(self, model: torch.nn.Module, optimizer: Optimizer) -> None:
        self.model = _on_host(model.state_dict())
        self.optimizer = _on_host(optimizer.state_dict())

    def restore(self, model: torch.nn.Module, optimizer: Optimizer, lr_factor: float) -> None:
        """Back to the kept state, every parameter group's step size `lr_factor` times the one
        it had (not the kept one's: a second plateau decays the first's step again)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("BestEpoch.restore before any keep")
        steps = [[g["lr"] for g in part.param_groups] for part in optimizer_parts(optimizer)]
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        for part, lrs in zip(optimizer_parts(optimizer), steps, strict=True):
            for group, lr in zip(part.param_groups, lrs, strict=True):
                group["lr"] = lr * lr_factor
