"""Checkpoint integrity and the security rules of training, without Ray: damaged checkpoints are
refused with an error naming the file, no code path unpickles data from disk, and a config
cannot name an arbitrary Python object. The runs with Ray (worker killed, non-finite loss,
corrupt checkpoint on resume) are in tests/test_train_ray.py."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from pathlib import Path

# train.run imports Ray: keep any Ray this test process starts on the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mkt.contract import ConfigError
from mkt.models import build_model
from mkt.synthetic import toy_batch, toy_schema
from train import export
from train.checkpoints import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    ModelLink,
    TrainState,
    build_chain,
    chain_on,
    load_optimizer,
    load_weights,
    save_checkpoint,
)
from train.checks import check_stage_params
from train.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("etl", "mkt", "train", "jobs")


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A TEM after one Adam step, so that the optimizer has state to save."""
    torch.manual_seed(seed)
    schema = toy_schema()
    model = build_model("tem", schema, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = toy_batch(schema, 64, seed=seed)
    model.loss(batch, model(batch))["loss"].backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model, optimizer = _trained()
    save_checkpoint(tmp_path, model, optimizer, TrainState(epochs_done=3, global_step=42))
    return tmp_path


def test_a_good_checkpoint_loads_back_exactly(checkpoint: Path) -> None:
    saved, saved_optimizer = _trained()
    model, optimizer = _trained(seed=1)
    load_weights(model, checkpoint)
    load_optimizer(optimizer, checkpoint)
    state = TrainState.load(checkpoint)
    assert state.epochs_done == 3 and state.global_step == 42
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert str(optimizer.state_dict()) == str(saved_optimizer.state_dict())
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (checkpoint / name).stat().st_size


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _load(name: str) -> Callable[[Path], object]:
    """The loader that reads `name`: what resuming, stage 2 and export call."""
    if name == MODEL_FILE:
        return lambda d: load_weights(_trained()[0], d)
    if name == OPTIMIZER_FILE:
        return lambda d: load_optimizer(_trained()[1], d)
    return TrainState.load


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_a_byte, "sha256 differs"),
        (_truncate, "bytes, the manifest says"),
        (Path.unlink, "missing"),
    ],
)
def test_a_damaged_file_is_refused_naming_it(
    checkpoint: Path, name: str, damage: Callable[[Path], None], message: str
) -> None:
    path = checkpoint / name
    damage(path)
    with pytest.raises(CheckpointError, match=message) as caught:
        _load(name)(checkpoint)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
def test_a_checkpoint_without_its_manifest_is_refused(checkpoint: Path, name: str) -> None:
    (checkpoint / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no manifest") as caught:
        _load(name)(checkpoint)
    assert str(checkpoint / MANIFEST_FILE) in str(caught.value)


def test_a_corrupt_manifest_is_refused(checkpoint: Path) -> None:
    (checkpoint / MANIFEST_FILE).write_text('{"files": {')
    with pytest.raises(CheckpointError, match=MANIFEST_FILE):
        TrainState.load(checkpoint)


def test_stage_two_refuses_a_corrupt_stage_one_model(checkpoint: Path) -> None:
    """TEM of `mkt` is built on the MEM of stage 1's best checkpoint (`build_chain`)."""
    mem_dir = checkpoint / "mem"
    mem_dir.mkdir()
    torch.manual_seed(0)
    mem = build_model("mem", toy_schema(), {})
    save_checkpoint(mem_dir, mem, torch.optim.Adam(mem.parameters()), TrainState())
    chain = [ModelLink("mem", {}, str(mem_dir)), ModelLink("tem", {})]
    build_chain(toy_schema(), chain)  # intact: loads
    _flip_a_byte(mem_dir / MODEL_FILE)
    with pytest.raises(CheckpointError, match=str(mem_dir / MODEL_FILE)):
        build_chain(toy_schema(), chain)


def test_a_chain_with_two_roots_builds_each_model_on_its_own(checkpoint: Path) -> None:
    """MKT's TEM is built on the MEM and on TEM alone, two chains of their own (`chain_on`):
    each model gets the ones it is built on, and the chain survives its dict form (the
    workers' config)."""
    schema = toy_schema()
    saved = {}
    for name, params in (("mem", {}), ("tem", {"dropout": 0.1})):
        torch.manual_seed(len(saved))
        model = build_model(name, schema, params)
        saved[name] = checkpoint / name
        saved[name].mkdir()
        save_checkpoint(saved[name], model, torch.optim.Adam(model.parameters()), TrainState())
    mem = [ModelLink("mem", {}, str(saved["mem"]))]
    alone = [ModelLink("tem", {"dropout": 0.1}, str(saved["tem"]))]
    chain = chain_on([mem, alone], ModelLink("tem", {}))
    assert [link.built_on for link in chain] == [(), (), (0, 1)]
    assert chain_on([mem], ModelLink("tem", {})) == [*mem, ModelLink("tem", {})]  # in a line
    assert [ModelLink.from_dict(link.to_dict()) for link in chain] == chain
    tem = build_chain(schema, chain)
    stored = {name: load_file(str(path / MODEL_FILE)) for name, path in saved.items()}
    user_table = "inputs.embeddings.tables.user_id.weight"
    assert torch.equal(tem.knowledge.state_dict()[user_table], stored["mem"][user_table])
    assert tem.tem_alone.params["dropout"] == 0.1 and tem.tem_alone.knowledge is None
    assert all(torch.equal(stored["tem"][k], v) for k, v in tem.tem_alone.state_dict().items())


def test_export_refuses_a_corrupt_checkpoint(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """train/export.py exits with status 2 and one line naming the damaged file."""
    root = tmp_path_factory.mktemp("export")
    samples, run_dir = root / "samples", root / "run"
    (samples / "vocab" / "_delta_log").mkdir(parents=True)
    (samples / "feature_schema.json").write_text(json.dumps(toy_schema().to_dict()))
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"model": "tem_only", "invocation": {"samples": str(samples)}})
    )
    stage = {"name": "tem", "model": "tem", "params": {}, "best_checkpoint": str(checkpoint)}
    (run_dir / "metrics.json").write_text(json.dumps({"stages": [stage]}))
    _truncate(checkpoint / MODEL_FILE)
    assert export.main(["--run", str(run_dir), "--output", str(root / "artifact")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(checkpoint / MODEL_FILE) in err
    assert not (root / "artifact").exists()


# Security --------------------------------------------------------------------------------------


def _call_name(node: ast.Call) -> str:
    """`a.b.c(...)` -> "a.b.c"; "" for calls of computed objects."""
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


# Modules whose loading functions unpickle (their import alone is refused: nothing needs them).
_PICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
# Calls that evaluate, import by a name held in data, or construct any Python object from YAML
# (`Tuner.restore` and `read_pickle` are matched by their ending).
_UNSAFE_CALLS = {
    "eval",
    "exec",
    "__import__",
    "importlib.import_module",
    "torch.export.load",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
}
# The one place that unpickles, on purpose, and why (docs/RELIABILITY.md, "Security").
ALLOWED = {
    ("train/sweep.py", "tune.Tuner.restore"): "Ray Tune's resume of the sweep's own output dir",
}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, rel: str) -> list[str]:
    """`file:line: what` for every call of `source` that could run code from the data it
    reads, and every import of an unpickling module."""
    tree = ast.parse(source, filename=rel)
    safe_yaml = _safe_yaml_loaders(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [
                f"{rel}:{node.lineno}: import {n}" for n in names if n.split(".")[0] in _PICKLERS
            ]
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if not name or (rel, name) in ALLOWED:
            continue
        where = f"{rel}:{node.lineno}: {name}"
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where} without weights_only=True")
        elif name in {"np.load", "numpy.load"} and _keyword(node, "allow_pickle") is not None:
            allow = _keyword(node, "allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} with allow_pickle")
        elif name in {"yaml.load", "yaml.load_all"}:
            loader = _keyword(node, "Loader")
            if not (
                isinstance(loader, ast.Name | ast.Attribute) and ast.unparse(loader) in safe_yaml
            ):
                found.append(f"{where} without a SafeLoader")
        elif (
            name in _UNSAFE_CALLS
            or name.split(".")[0] in _PICKLERS
            or name.endswith(("read_pickle", "Tuner.restore"))
        ):
            found.append(where)
    return found


def _safe_yaml_loaders(tree: ast.Module) -> set[str]:
    """yaml's safe loaders, and classes of this module derived from them."""
    safe = {"yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and {ast.unparse(b) for b in node.bases} & safe:
            safe.add(node.name)
    return safe


def test_no_code_path_unpickles_data_from_disk() -> None:
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 30, "the scan found too few files: wrong root?"
    found = [
        hit
        for path in files
        for hit in unsafe_calls(path.read_text(), path.relative_to(REPO).as_posix())
    ]
    assert not found, "unsafe loads (docs/RELIABILITY.md, Security):\n" + "\n".join(found)
    # The allow-list stays true: each entry is still there (else delete it).
    for rel, name in ALLOWED:
        tree = ast.parse((REPO / rel).read_text())
        calls = {_call_name(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert name in calls, f"{rel}: no {name} any more; remove it from ALLOWED"


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')\n",
        "import torch\ntorch.load('x.pt')\n",
        "import torch\ntorch.load('x.pt', weights_only=False)\n",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
        "import yaml\nyaml.load(open('x'), Loader=yaml.Loader)\n",
        "import yaml\nyaml.unsafe_load('a: 1')\n",
        "import yaml\nclass L(yaml.Loader): ...\nyaml.load('a: 1', Loader=L)\n",
        "import pandas as pd\npd.read_pickle('x')\n",
        "import importlib\nimportlib.import_module('os')\n",
        "eval('1')\n",
        "from joblib import load\n",
        "from ray.tune import Tuner\nTuner.restore('dir', None)\n",
    ],
)
def test_the_scan_catches_each_unsafe_call(source: str) -> None:
    """The scan is not vacuous: each pattern it guards against is caught in a planted source."""
    assert unsafe_calls(source, "planted.py"), source


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=os.system"], "model: 'os.system' is neither a pipeline"),
        (["model=subprocess.Popen"], "model: 'subprocess.Popen'"),
        (["params.os.system=1"], "params.os: not a stage or model name"),
    ],
)
def test_a_config_cannot_name_a_python_object(overrides: list[str], key: str) -> None:
    """Models are looked up by name in mkt.models' registry; nothing is imported by name."""
    with pytest.raises(ConfigError, match=key):
        check_stage_params(load_run_config(None, overrides))


def test_a_config_file_cannot_construct_python_objects(tmp_path: Path) -> None:
    """YAML is read with safe_load: a `!!python/...` tag is an error naming the file, and the
    command in it never runs."""
    canary = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {canary}']\n")
    with pytest.raises(ConfigError, match=str(evil)):
        load_run_config(evil)
    assert not canary.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fault.kill_worker_at.epoch=1"], "fault.kill_worker_at.batch: must be set together"),
        (["fault.kill_worker_at.batch=3"], "fault.kill_worker_at.epoch: must be set together"),
        (["fault.kill_worker_at.epoch=0", "fault.kill_worker_at.batch=1"], "epoch: must be >= 1"),
        (
            ["fault.kill_worker_at.epoch=1", "fault.kill_worker_at.batch=x"],
            "batch' expects null or int",
        ),
        (
            ["train.epochs=2", "fault.kill_worker_at.epoch=3", "fault.kill_worker_at.batch=1"],
            r"fault.kill_worker_at.epoch: 3 is after the last epoch \(train.epochs=2\)",
        ),
        (["fault.kill_worker_at=3"], "'fault.kill_worker_at' must be a mapping"),
        (["fault.nonfinite_loss_at_step=0"], "fault.nonfinite_loss_at_step: null or a step"),
        (["fault.kill_worker_after_epoch=1"], "unknown key 'fault.kill_worker_after_epoch'"),
    ],
)
def test_fault_drill_keys_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)
