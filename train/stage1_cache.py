"""The stage-1 cache: a pipeline's first stage (and, in a sweep, every stage before the first
one built on another: MKT's TEM alone) trained once for every run that would train it
identically (the sweep's trials with the same MEM settings, the tables' rows that share one),
then linked into each run's RUN_DIR, where the pipeline finds it finished.

An entry is keyed by everything its checkpoints depend on (`stage1_material`); a lock per
entry makes concurrent runs wait for the one that trains it instead of training it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltalake import DeltaTable
from ray.train import Result

from mkt.contract import SCHEMA_FILE
from mkt.models import MODELS
from mkt.models.base import resolve_params
from mkt.registry import Stage
from mkt.schema import FeatureSchema, samples_table
from train.checkpoints import ModelLink, TrainState
from train.stage import CHECKPOINTS_DIR, finished, run_stage, use_gpu

KEY_FILE = "key.json"  # what an entry's key hashes, for people


def samples_fingerprint(samples_dir: Path) -> str:
    """What identifies a samples table's content: the schema file and the data files of the
    Delta snapshot (their names carry a fresh UUID on every write, so a rebuilt table differs
    even where its version number restarts)."""
    digest = hashlib.sha256((samples_dir / SCHEMA_FILE).read_bytes())
    uris = DeltaTable(str(samples_table(samples_dir))).file_uris()
    for name in sorted(uri.rsplit("/", 1)[-1] for uri in uris):
        digest.update(name.encode())
    return digest.hexdigest()[:16]


def stage1_material(
    config: Mapping[str, Any], stage: Stage, fingerprint: str, gpu: bool
) -> dict[str, Any]:
    """Everything the first stage's checkpoints depend on: the samples, the stage and its
    resolved model parameters (so a default written out equals the default left out), the
    training settings, the seed and the worker count (it shards the data)."""
    return {
        "samples": fingerprint,
        "stage": [stage.name, stage.model, stage.entities, stage.target_rows],
        "params": resolve_params(MODELS[stage.model], config["params"].get(stage.name, {})),
        "train": config["train"],
        "seed": config["seed"],
        "num_workers": config["scaling"]["num_workers"],
        "use_gpu": gpu,
    }


def stage1_key(material: Mapping[str, Any]) -> str:
    encoded = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, held by this process; the OS drops it if the process dies
    (a trial stopped by the scheduler leaves no stale lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recorded_history(storage: Path) -> list[dict[str, Any]]:
    """The per-epoch reports held by a stage's latest checkpoint (none if it has none)."""
    if not storage.is_dir():
        return []
    try:
        latest = Result.from_path(str(storage)).checkpoint
    except RuntimeError:  # the stage never reached its first checkpoint
        return []
    return TrainState.load(Path(latest.path)).history if latest else []


def cached_first_stage(
    stage: Stage,
    config: dict[str, Any],
    schema: FeatureSchema,
    samples_dir: Path,
    run_dir: Path,
    cache: Path,
    fingerprint: str,
    on_history: Callable[[Sequence[Mapping[str, Any]]], None] | None = None,
) -> str:
    """Make sure `cache` holds `stage` trained for `config` (training or finishing it here if
    not) and link it into `run_dir`; returns "trained" or "cached". `on_history` gets the
    epochs an earlier process already trained (a sweep reports them to Tune again)."""
    material = stage1_material(config, stage, fingerprint, use_gpu(config))
    key = stage1_key(material)
    entry = cache / key
    with _locked(cache / f"{key}.lock"):
        if on_history is not None:
            on_history(recorded_history(entry / CHECKPOINTS_DIR / stage.name))
        how = "cached"
        if finished(stage, config, entry) is None:
            entry.mkdir(parents=True, exist_ok=True)
            (entry / KEY_FILE).write_text(json.dumps(material, indent=1, default=str))
            link = ModelLink(stage.model, config["params"].get(stage.name, {}))
            run_stage(stage, config, schema, samples_dir, entry, [link])
            how = "trained"
    target = run_dir / CHECKPOINTS_DIR / stage.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(entry / CHECKPOINTS_DIR / stage.name, target_is_directory=True)
    return how
