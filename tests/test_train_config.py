"""Run config layering, override parsing and the checks of train/run.py before Ray starts."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

# train.data imports Ray: keep any Ray this test process starts on the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

from mkt.contract import ConfigError
from mkt.synthetic import toy_batch, toy_columns, toy_schema
from train.checks import check_stage_params, prepare_run_dir
from train.config import load_run_config, parse_overrides
from train.data import entity_batch_sizes, mixed_batches


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    run_config = tmp_path / "run.yaml"
    run_config.write_text("model: tem_only\ntrain:\n  lr: 0.01\n  epochs: 3\n")
    config = load_run_config(run_config, ["train.epochs=5", "params.mem.gamma=0"])
    assert config["model"] == "tem_only"
    assert config["train"]["lr"] == 0.01  # from the file
    assert config["train"]["epochs"] == 5  # the override wins over the file
    assert config["params"]["mem"] == {"gamma": 0}
    assert config["train"]["batch_size"] == 1024  # untouched default


def test_override_values_are_yaml() -> None:
    assert parse_overrides(["a.b=0.5", "c=[10, 30]", "d=null", "e=true", "f=text"]) == {
        "a": {"b": 0.5},
        "c": [10, 30],
        "d": None,
        "e": True,
        "f": "text",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr"], "expected dotted.key=value"),
        (["train.learning_rate=0.1"], "unknown key 'train.learning_rate'"),
        (["train.epochs=two"], "'train.epochs' expects int"),
        (["train.find_unused_parameters=1"], "expects bool"),
        (["train.early_stopping.metric=logloss"], "train.early_stopping.metric"),
        (["scaling.num_workers=4", "ray.num_cpus=1"], "ray.num_cpus"),
        (["scaling.use_gpu=maybe"], "scaling.use_gpu"),
        (["fault.kill_worker_at.epoch=0", "fault.kill_worker_at.batch=1"], "kill_worker_at.epoch"),
        (["train=3"], "'train' must be a mapping"),
        (["eval.driver_scoring_rows=-1"], "eval.driver_scoring_rows"),
        (["train.embedding_l2_warmup_steps=-1"], "train.embedding_l2_warmup_steps"),
        (["train.wide_lr=0"], r"train\.wide_lr: null or a number > 0"),
        (["train.embedding_lr=-1"], r"train\.embedding_lr: null or a number > 0"),
        (["train.early_stopping.plateau_lr_factor=0"], r"plateau_lr_factor: must be in \(0, 1\]"),
    ],
)
def test_bad_overrides_name_the_key(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_joined_cluster_is_not_sized_by_ray_num_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.num_cpus sizes only the embedded Ray: joining a cluster (ray.address, or the
    RAY_ADDRESS that `ray job submit` sets) places 4 workers on its CPUs, not on this number."""
    many = ["scaling.num_workers=4", "ray.num_cpus=1"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert (
        load_run_config(None, [*many, "ray.address=ray://head:10001"])["scaling"]["num_workers"]
        == 4
    )
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert load_run_config(None, many)["ray"]["num_cpus"] == 1


def test_mlflow_uri_needs_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow is an optional extra: configuring a tracking URI without it fails, naming it.
    The test setup installs the extra, so mlflow is made unimportable here the way Python
    marks a missing module (None in sys.modules)."""
    uri = ["tracking.mlflow_uri=http://127.0.0.1:5000"]
    assert load_run_config(None, uri)["tracking"]["mlflow_uri"] == "http://127.0.0.1:5000"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert importlib.util.find_spec("mlflow") is None
    with pytest.raises(ConfigError, match="mlflow is not installed"):
        load_run_config(None, uri)


def test_int_where_float_expected_and_gpu_choices() -> None:
    config = load_run_config(None, ["train.lr=1", "scaling.use_gpu=false"])
    assert config["train"]["lr"] == 1
    assert config["scaling"]["use_gpu"] is False


def test_missing_or_bad_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_run_config(bad)


def test_a_key_written_twice_names_its_file_and_line(tmp_path: Path) -> None:
    """Run and sweep configs go through the data config's reader: a repeated key fails."""
    from train.sweep_config import load_sweep_config

    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.01\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml.*duplicate key 'lr'.*line 4"):
        load_run_config(twice)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("metric: auc\nrun:\n  seed: 1\nmetric: gauc\n")
    with pytest.raises(ConfigError, match=r"(?s)sweep\.yaml.*duplicate key 'metric'.*line 4"):
        load_sweep_config(sweep)


def test_fault_drills_are_off_and_absent_from_the_users_config() -> None:
    """Drills stay possible by override, but conf/run/default.yaml does not list them."""
    from train.config import DEFAULT_CONFIG

    assert not re.search(r"^fault:", DEFAULT_CONFIG.read_text(), re.M)
    config = load_run_config(None, ["fault.nonfinite_loss_at_step=3"])
    assert config["fault"]["nonfinite_loss_at_step"] == 3
    assert load_run_config()["fault"]["kill_worker_at"] == {"epoch": None, "batch": None}
    with pytest.raises(ConfigError, match=r"unknown key 'fault\.kill_at'"):
        load_run_config(None, ["fault.kill_at=3"])


def test_stage_params_are_checked_against_the_models() -> None:
    check_stage_params(load_run_config(None, ["params.mem.gamma=0.5"]))
    with pytest.raises(ConfigError, match=r"params.mem: .*unknown parameter"):
        check_stage_params(load_run_config(None, ["params.mem.gama=0.5"]))
    with pytest.raises(ConfigError, match=r"params\.memm: not a stage or model name"):
        check_stage_params(load_run_config(None, ["params.memm.gamma=0"]))
    with pytest.raises(ConfigError, match="neither a pipeline"):
        check_stage_params(load_run_config(None, ["model=nope"]))


def test_run_dir_resumes_only_with_the_same_config(tmp_path: Path) -> None:
    prepare_run_dir(tmp_path / "run", "a: 1\n")
    prepare_run_dir(tmp_path / "run", "a: 1\n")  # the same config: a resume
    with pytest.raises(ConfigError, match="another config"):
        prepare_run_dir(tmp_path / "run", "a: 2\n")


def test_batches_mix_entities_in_proportion() -> None:
    sizes = entity_batch_sizes({"video": 3000, "article": 1000, "empty": 0}, 100)
    assert sizes == {"video": 75, "article": 25}
    schema = toy_schema()
    batches = [toy_batch(schema, n, seed=seed) for seed, n in enumerate([75, 75, 30])]
    other = [toy_batch(schema, n, seed=10 + seed) for seed, n in enumerate([25, 25, 25, 5])]
    mixed = list(mixed_batches([iter(batches), iter(other)]))
    assert [len(b["label"]) for b in mixed] == [100, 100, 55, 5]
    assert torch.equal(mixed[0]["label"], torch.cat([batches[0]["label"], other[0]["label"]]))


def test_arrow_collate_equals_the_numpy_encoding() -> None:
    """Workers collate Ray's Arrow batches; the model batch must be what `to_tensors` makes of
    the same rows as numpy columns (serving and evaluation go that way), every column."""
    import numpy as np
    import pyarrow as pa

    from mkt.features import to_tensors
    from train.data import ModelBatches

    schema = toy_schema()
    columns = toy_columns(schema, 300, seed=3)
    columns["user_key"] = np.arange(300) * 7
    arrays = {
        name: pa.array(list(values)) if values.ndim == 2 else pa.array(values)
        for name, values in columns.items()
    }
    # A batch as Ray hands it over: a table of two chunks.
    table = pa.Table.from_pydict(arrays)
    table = pa.concat_tables([table.slice(0, 120), table.slice(120)])
    got = ModelBatches(schema, keep=["user_key"])(table)
    expected = to_tensors(schema, columns)
    assert set(got) == {*expected, "user_key"}
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(got["user_key"], torch.as_tensor(columns["user_key"]))
    got["seq_post"][0, 0] = -1  # the batch owns its memory (Arrow's is read-only)
    unknown = table.set_column(
        table.schema.get_field_index("entity"), "entity", pa.array(["video"] * 300)
    )
    with pytest.raises(ValueError, match="unknown entity 'video'"):
        ModelBatches(schema)(unknown)


def test_holdout_buckets_hold_at_tenrec_line_numbers() -> None:
    """The TEM holdout's hash, evaluated by Ray Data on line numbers past 2^53 / the
    multiplier (3.4M), where the plain product failed a 22M-row run: the same buckets as
    exact integer arithmetic, and about the configured share held out."""
    import numpy as np
    import pyarrow as pa
    import ray
    from ray.data.expressions import col

    from train.data import _HOLDOUT_BUCKETS, _HOLDOUT_HASH, holdout_bucket

    lines = np.concatenate([np.arange(20), np.arange(188_000_000, 188_020_000, 7)])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        table = ray.data.from_arrow(pa.table({"line_no": lines}))
        got = table.with_column("bucket", holdout_bucket(col("line_no"))).to_pandas()
    finally:
        if started:
            ray.shutdown()
    expected = [(int(line) * _HOLDOUT_HASH) % _HOLDOUT_BUCKETS for line in lines]
    assert got["bucket"].astype(np.int64).tolist() == expected
    assert holdout_bucket(123_456_789_012) == (123_456_789_012 * _HOLDOUT_HASH) % _HOLDOUT_BUCKETS
    held = (got["bucket"] < 0.3 * _HOLDOUT_BUCKETS).mean()
    assert 0.25 < held < 0.35


def test_read_block_size_applies_to_the_reads_made_inside_only() -> None:
    import ray.data

    from train.stage import read_block_size

    context = ray.data.DataContext.get_current()
    default = context.target_max_block_size
    with read_block_size(32 << 20):
        assert context.target_max_block_size == 32 << 20
    assert context.target_max_block_size == default
    with read_block_size(None):
        assert context.target_max_block_size == default
    with pytest.raises(ConfigError, match=r"train\.read_block_bytes"):
        load_run_config(None, ["train.read_block_bytes=1000"])
    assert (
        load_run_config(None, ["train.read_block_bytes=33554432"])["train"]["read_block_bytes"]
        == 32 << 20
    )
