"""train/sparse_sync.py: the tables' sparse gradients reduced between two real gloo workers
with dense collectives, DDP reducing only the dense layers."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mkt.models import build_model
from mkt.synthetic import toy_batch, toy_schema
from train.optim import sparse_tables, use_sparse_embeddings
from train.sparse_sync import SparseGradients, leave_out_of_ddp

# A table whose gradient every worker drops after backward (as a table no batch read, which
# DDP's find_unused_parameters would see): it must end with none.
UNREAD = "inputs.embeddings.tables.gender.weight"
BRAND = "inputs.embeddings.tables.brand.weight"


def _batches(schema) -> list:
    """Two workers' batches; the second reads only the padding row of `brand`."""
    first, second = toy_batch(schema, 64, seed=10), toy_batch(schema, 48, seed=11)
    second["brand"] = torch.zeros_like(second["brand"])
    return [first, second]


def _model(schema):
    torch.manual_seed(0)
    return build_model("mem", schema, {})


def _worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    schema = toy_schema()
    # Rank 1 starts from other tables: the broadcast must give it rank 0's.
    torch.manual_seed(0 if rank == 0 else 7)
    model = build_model("mem", schema, {})
    use_sparse_embeddings(model, torch.device("cpu"), world=2)
    tables = sparse_tables(model)
    leave_out_of_ddp(model, tables)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    sync = SparseGradients(tables, world=2)
    sync.broadcast()
    batch = _batches(schema)[rank]
    model.loss(batch, ddp(batch))["loss"].backward()
    named = dict(model.named_parameters())
    named[UNREAD].grad = None
    if rank == 1:
        # Its brand gradient holds only the padding row's zeros: none at all is the same mean.
        named[BRAND].grad = None
    sync.all_reduce()
    grads = {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    sparse = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"grads": grads, "sparse": sparse, "weights": weights}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_sparse_gradients_are_the_mean_over_workers(tmp_path):
    """Each worker ends with the mean of the two batches' gradients (as one process computing
    each batch's mean loss densely, then averaging), the tables' still sparse, a worker
    without a table's gradient counting as zero; a table no worker has a gradient for keeps
    none; both workers start from rank 0's tables."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    schema = toy_schema()
    model = _model(schema)
    expected: dict[str, torch.Tensor] = {}
    for batch in _batches(schema):
        model.zero_grad(set_to_none=True)
        model.loss(batch, model(batch))["loss"].backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, torch.zeros_like(p)) + p.grad / 2
    del expected[UNREAD]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    table_names = {n for n, _ in model.named_parameters() if ".tables." in n}
    assert got[0]["sparse"] and got[0]["sparse"] <= table_names
    assert BRAND in got[0]["sparse"] and UNREAD not in got[0]["grads"]
    for g in got:
        assert g["grads"].keys() == expected.keys()
        for name, grad in g["grads"].items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
        for name, weight in model.named_parameters():
            torch.testing.assert_close(g["weights"][name], weight.detach())
