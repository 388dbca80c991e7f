"""What several benchmarks share: reading a process tree's /proc files (CPU and memory of a job
and every process it started) and the training benchmarks' stages and run config."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

from mkt.registry import Stage
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink
from train.config import load_run_config

STAGES = {
    "mem": (Stage("mem", "mem", "both"), []),
    "tem": (Stage("tem", "tem", "target", pretrained_from="mem"), [ModelLink("mem", {})]),
}


def read_proc(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:  # the process ended between listing and reading
        return ""


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc (psutil is only importable through Ray here)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_proc(f"/proc/{entry}/stat")
            if stat:
                # The command name (field 2) may hold spaces; ppid follows the last ')'.
                children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def bench_config(epochs: int, overrides: list[str]) -> dict[str, Any]:
    """The run config, with every epoch run (no early stop) so each measures the same work."""
    return load_run_config(
        None, [f"train.epochs={epochs}", "train.early_stopping.patience=1000", *overrides]
    )


def resized(schema: FeatureSchema, users: int, items: int) -> FeatureSchema:
    """The schema with `user_id` and the item feature holding `users` / `items` rows: the
    tables a model builds from it take that size whatever ids the samples hold."""
    sizes = {"user_id": users, schema.item_feature: items}
    features = tuple(
        dataclasses.replace(f, vocab_size=sizes[f.name]) if f.name in sizes else f
        for f in schema.features
    )
    return dataclasses.replace(schema, features=features)
