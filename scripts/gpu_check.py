"""The GPU paths CI cannot run (no accelerator there), for a machine with one CUDA device:

    PYTHONPATH=. python3 scripts/gpu_check.py

Steps of MEM and of TEM on the frozen MEM: wrapped in DDP over NCCL with dense embedding
gradients (one process: a single GPU cannot hold two NCCL ranks), and on one unwrapped GPU
worker with sparse ones (SparseAdam; NCCL cannot all-reduce sparse gradients, see
train/optim.py), each compared with the same steps on the CPU; torch.compile of MEM's forward on the GPU against
eager. Prints one line per check and exits non-zero if one fails. The CUDA-parametrised model
tests run beside it: `python3 -m pytest tests/test_mkt_models.py ...` (docs/training.md)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mkt.models import build_model
from mkt.synthetic import toy_batch, toy_schema
from train.optim import build_optimizer, use_sparse_embeddings


def train_steps(device: str, sparse: bool, ddp: bool, steps: int = 5) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    schema = toy_schema()
    batch = {k: v.to(device) for k, v in toy_batch(schema, 512, seed=1).items()}
    losses: list[float] = []
    mem = build_model("mem", schema, {}).to(device)
    # TEM is built on the trained MEM, which it freezes (section 3.3).
    for model in (mem, None):
        model = model or build_model("tem", schema, {}, pretrained=mem).to(device)
        model.count_embedding_rows([batch])
        if sparse:
            use_sparse_embeddings(model, torch.device(device), world=1)
        opts = {"lr": 1e-3, "embedding_lr": None, "weight_decay": 0.0, "sparse_embeddings": sparse}
        optimizer = build_optimizer(model, opts)
        wrapped = DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
        for _ in range(steps):
            loss = model.loss(batch, wrapped(batch))["loss"] + model.embedding_l2(batch) / 512
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    tem = model
    return losses, {k: v.detach().cpu() for k, v in tem.state_dict().items()}


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    failed = 0
    for sparse in (False, True):
        # As Ray's prepare_model: DDP (NCCL) for the dense run; a single GPU worker is left
        # unwrapped, and NCCL cannot all-reduce sparse gradients, so the sparse run has no DDP.
        gpu, gpu_state = train_steps("cuda", sparse, ddp=not sparse)
        cpu, cpu_state = train_steps("cpu", sparse, ddp=False)
        worst = max(abs(a - b) for a, b in zip(gpu, cpu, strict=True))
        weights = max(float((gpu_state[k] - cpu_state[k]).abs().max()) for k in cpu_state)
        ok = worst < 1e-3 and weights < 1e-3 and all(x == x for x in gpu)
        failed += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {'one GPU, sparse' if sparse else 'NCCL DDP, dense'} tables: "
            f"losses {gpu[0]:.4f} -> {gpu[-1]:.4f}, max |gpu - cpu| loss {worst:.2e}, "
            f"weights {weights:.2e}",
            flush=True,
        )
    dist.destroy_process_group()
    schema = toy_schema()
    torch.manual_seed(0)
    mem = build_model("mem", schema, {}).cuda().eval()
    batch = {k: v.cuda() for k, v in toy_batch(schema, 512, seed=2).items()}
    with torch.no_grad():
        eager = mem(batch)["logit"]
        compiled = torch.compile(mem)(batch)["logit"]
    diff = float((eager - compiled).abs().max())
    ok = diff < 1e-3
    failed += not ok
    print(
        f"{'ok  ' if ok else 'FAIL'} torch.compile MEM forward on GPU: max |compiled - eager| {diff:.2e}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
