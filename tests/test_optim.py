"""train/optim.py: the stage optimiser, dense or with RowAdam on sparse table gradients."""

from __future__ import annotations

import io

import pytest
import torch

from mkt.contract import ConfigError
from mkt.models import build_model
from mkt.synthetic import toy_batch, toy_schema
from train.optim import (
    BestEpoch,
    RowAdam,
    SplitOptimizer,
    build_optimizer,
    embedding_l2_weight,
    optimizer_parts,
    use_sparse_embeddings,
)

OPTS = {"lr": 0.01, "embedding_lr": None, "weight_decay": 0.0}


def test_sparse_optimizer_steps_only_the_rows_a_batch_read_and_resumes() -> None:
    schema = toy_schema()
    torch.manual_seed(0)
    model = build_model("mem", schema, {})
    use_sparse_embeddings(model, torch.device("cpu"), world=2)
    optimizer = build_optimizer(model, {**OPTS, "sparse_embeddings": True})
    assert isinstance(optimizer, SplitOptimizer)
    tables = {id(p) for p in model.embedding_tables()}
    owned = [
        id(p) for part in optimizer.parts.values() for g in part.param_groups for p in g["params"]
    ]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each once
    assert {id(p) for p in optimizer.parts["tables"].param_groups[0]["params"]} == tables

    batch = toy_batch(schema, 64, seed=1)
    table = model.inputs.embeddings.tables["brand"].weight
    before = table.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model.loss(batch, model(batch))["loss"].backward()
        assert table.grad.is_sparse
        optimizer.step()
    read = sorted(set(batch["brand"].tolist()) - {0})
    unread = [r for r in range(1, table.shape[0]) if r not in read]
    assert unread and torch.equal(table.detach()[unread], before[unread])
    assert not torch.equal(table.detach()[read], before[read])

    # A checkpoint's state (torch.save, read back weights-only) resumes both parts.
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    again = build_optimizer(model, {**OPTS, "sparse_embeddings": True})
    again.load_state_dict(torch.load(saved, weights_only=True))
    restored, original = (o.parts["tables"].state_dict()["state"] for o in (again, optimizer))
    assert restored.keys() == original.keys() and restored
    for key in original:
        assert torch.equal(restored[key]["exp_avg"], original[key]["exp_avg"])
    with pytest.raises(ValueError, match="sparse_embeddings"):
        again.load_state_dict({"dense": optimizer.parts["dense"].state_dict()})


def test_only_tables_of_sparse_min_rows_take_sparse_gradients() -> None:
    """Small tables stay dense, in the dense Adam's table group; the large ones go to RowAdam.
    With no table large enough, the optimiser is the dense one."""
    schema = toy_schema()
    torch.manual_seed(0)
    model = build_model("mem", schema, {})
    sizes = {n: t.num_embeddings for n, t in model.inputs.embeddings.tables.items()}
    cut = sorted(set(sizes.values()))[-1]  # the largest tables only
    use_sparse_embeddings(model, torch.device("cpu"), world=1, min_rows=cut)
    optimizer = build_optimizer(model, OPTS)
    assert isinstance(optimizer, SplitOptimizer)
    big = {id(t.weight) for t in model.inputs.embeddings.tables.values() if t.num_embeddings >= cut}
    assert {id(p) for p in optimizer.parts["tables"].param_groups[0]["params"]} == big
    dense_tables = optimizer.parts["dense"].param_groups[1]["params"]
    assert dense_tables and not any(p.grad is not None and p.grad.is_sparse for p in dense_tables)
    assert {id(p) for p in dense_tables}.isdisjoint(big)
    batch = toy_batch(schema, 64, seed=1)
    model.loss(batch, model(batch))["loss"].backward()
    for name, table in model.inputs.embeddings.tables.items():
        assert table.weight.grad.is_sparse == (sizes[name] >= cut), name
    optimizer.step()
    model.use_sparse_gradients(False)
    use_sparse_embeddings(model, torch.device("cpu"), world=1, min_rows=cut + 1)
    assert isinstance(build_optimizer(model, OPTS), torch.optim.Adam)


def test_row_adam_is_sparse_adams_update() -> None:
    """RowAdam is torch.optim.SparseAdam's update with index operations: the same tables
    after steps that read overlapping, repeated and disjoint rows."""
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(50, 4, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    ours = RowAdam(tables[0].parameters(), lr=0.05)
    torch_own = torch.optim.SparseAdam(tables[1].parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        rows = torch.randint(0, 50 if step % 2 else 10, (32, 3), generator=generator)
        for table, optimizer in zip(tables, (ours, torch_own), strict=True):
            optimizer.zero_grad()
            ((table(rows) - 1.0) ** 2).sum().backward()
            optimizer.step()
        assert torch.allclose(tables[0].weight, tables[1].weight, atol=1e-6), step
    dense = torch.nn.Embedding(5, 2)
    dense(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        RowAdam(dense.parameters()).step()


def test_dense_optimizer_is_one_adam_with_two_groups() -> None:
    torch.manual_seed(0)
    model = build_model("mem", toy_schema(), {})
    optimizer = build_optimizer(model, {**OPTS, "embedding_lr": 0.1, "sparse_embeddings": False})
    assert isinstance(optimizer, torch.optim.Adam)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == [0.01, 0.1]


@pytest.mark.parametrize("sparse", [False, True])
def test_first_order_weights_take_wide_lr(sparse: bool) -> None:
    torch.manual_seed(0)
    model = build_model("tem", toy_schema(), {"wide": True})
    wide = {id(p) for p in model.wide.parameters()}
    assert wide
    if sparse:
        use_sparse_embeddings(model, torch.device("cpu"), world=1)
    opts = {**OPTS, "embedding_lr": 0.1, "wide_lr": 0.05, "sparse_embeddings": sparse}
    optimizer = build_optimizer(model, opts)
    parts = optimizer.parts.values() if sparse else [optimizer]
    step_of = {id(p): g["lr"] for part in parts for g in part.param_groups for p in g["params"]}
    assert sorted(step_of) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    tables = {id(p) for p in model.embedding_tables()}
    for key, lr in step_of.items():
        assert lr == (0.05 if key in wide else 0.1 if key in tables else 0.01)
    # null: the tables' step
    optimizer = build_optimizer(model, {**opts, "wide_lr": None})
    parts = optimizer.parts.values() if sparse else [optimizer]
    assert {g["lr"] for part in parts for g in part.param_groups} == {0.01, 0.1}


def test_sparse_embeddings_refused_on_several_gpu_workers() -> None:
    model = build_model("mem", toy_schema(), {})
    with pytest.raises(ConfigError, match=r"train.sparse_embeddings: NCCL"):
        use_sparse_embeddings(model, torch.device("cuda", 0), world=2)
    use_sparse_embeddings(model, torch.device("cuda", 0), world=1)  # one GPU: nothing to reduce
    assert all(bank.sparse_gradients for bank in model.embedding_banks())


def test_embedding_prior_ramps_up_over_its_warmup_steps() -> None:
    opts = {"embedding_l2": 30.0, "embedding_l2_warmup_steps": 500}
    weights = [embedding_l2_weight(opts, step) for step in (1, 250, 500, 501, 10_000)]
    assert weights == pytest.approx([30.0 / 500, 15.0, 30.0, 30.0, 30.0])
    assert embedding_l2_weight({**opts, "embedding_l2_warmup_steps": 0}, 1) == 30.0


@pytest.mark.parametrize("sparse", [False, True])
def test_a_plateau_goes_back_to_the_best_epoch_at_a_decayed_step(sparse: bool) -> None:
    schema = toy_schema()
    torch.manual_seed(0)
    model = build_model("mem", schema, {})
    if sparse:
        use_sparse_embeddings(model, torch.device("cpu"), world=1)
    optimizer = build_optimizer(model, {**OPTS, "embedding_lr": 0.1, "sparse_embeddings": sparse})

    def train(steps: int) -> None:
        for step in range(steps):
            batch = toy_batch(schema, 64, seed=step)
            optimizer.zero_grad()
            model.loss(batch, model(batch))["loss"].backward()
            optimizer.step()

    def moments() -> list[torch.Tensor]:
        return [
            s["exp_avg"].clone() for part in optimizer_parts(optimizer) for s in part.state.values()
        ]

    def steps() -> list[float]:
        return [g["lr"] for part in optimizer_parts(optimizer) for g in part.param_groups]

    train(3)
    kept, best = BestEpoch(), {k: v.clone() for k, v in model.state_dict().items()}
    kept.keep(model, optimizer)
    best_moments = moments()
    train(3)  # an epoch that did not improve
    assert not all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    kept.restore(model, optimizer, 0.1)
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(moments(), best_moments, strict=True))
    assert sorted(steps()) == pytest.approx([0.001, 0.01])
    # A second plateau decays the decayed step again; the kept state is not consumed.
    train(2)
    kept.restore(model, optimizer, 0.1)
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert sorted(steps()) == pytest.approx([0.0001, 0.001])
