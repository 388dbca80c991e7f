"""The serving artifact: one directory holding everything needed to score raw requests.

    ARTIFACT/
      manifest.json          format, run stamp, graph interface, sha256 and size of every file
      feature_schema.json    the training run's schema (groups, vocabulary sizes, boundaries)
      model/graph.json       torch.export graph of the online part (mkt.serving.graph)
      model/weights.safetensors
      vocab/<feature>.parquet  feature, entity, raw_value, index: the train vocabularies of
                             the features the graph reads (item ids of every entity: the
                             sequences index them)

Nothing in it is pickled; `Artifact.load` reads every file once, checks its sha256 against
the manifest (and refuses files the manifest does not list), checks that the running torch has
the major.minor version the graph was exported with and that the schema's reserved indices are
`mkt.encoding`'s, then parses the bytes it checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import safetensors.torch
import torch

from mkt.contract import SCHEMA_FILE
from mkt.encoding import EncodingContractError, FeatureEncoder
from mkt.schema import FeatureSchema, SchemaError
from mkt.serving.graph import (
    Interface,
    ProgramError,
    ServingGraph,
    export_program,
    load_program,
    runnable,
)
from mkt.serving.requests import PackedRows, RequestEncoder, check_sample_rows

FORMAT = "mkt-serving-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILE = "model/graph.json"
WEIGHTS_FILE = "model/weights.safetensors"
VOCAB_DIR = "vocab"
VOCAB_COLUMNS = ("feature", "entity", "raw_value", "index")
_SAFE_NAME = re.compile(r"[a-z][a-z0-9_]*")


class ArtifactError(ValueError):
    """An artifact that is incomplete, altered or of another format; names the file."""


@dataclass
class ScoreResult:
    """Like probabilities of n rows; `errors` maps the position of every rejected row to
    its reason, and those rows score NaN."""

    scores: np.ndarray  # float64 [n]
    errors: dict[int, str]

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.scores)


def torch_major_minor(version: str) -> str | None:
    """Major.minor of a torch version ("2.13.0+cpu" -> "2.13"); None if it is not one."""
    found = re.match(r"(\d+)\.(\d+)", str(version))
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def serving_vocab(schema: FeatureSchema, vocab: pa.Table) -> dict[str, pa.Table]:
    """The rows of the ETL's `vocab` table the artifact needs, one table per categorical
    feature the graph reads."""
    missing = [c for c in VOCAB_COLUMNS if c not in vocab.column_names]
    if missing:
        raise ArtifactError(f"vocab table lacks columns {missing}")
    interface = Interface.for_schema(schema)
    names = [
        n
        for n in interface.scalars
        if n in {f.name for f in schema.features} and schema.feature(n).kind == "categorical"
    ]
    features = vocab.column("feature")
    out = {}
    for name in names:
        if not _SAFE_NAME.fullmatch(name):
            raise ArtifactError(f"feature name {name!r} cannot be a file name")
        rows = vocab.filter(pc.equal(features, name)).select(list(VOCAB_COLUMNS))
        out[name] = rows.cast(
            pa.schema(
                [
                    ("feature", pa.string()),
                    ("entity", pa.string()),
                    ("raw_value", pa.string()),
                    ("index", pa.int64()),
                ]
            )
        )
    return out


def export_artifact(
    model: torch.nn.Module,
    schema: FeatureSchema,
    vocab: pa.Table,
    run_info: Mapping[str, Any],
    out_dir: str | Path,
) -> dict[str, Any]:
    """Write the artifact of a trained model (a TEM: its `serving_module()`) to `out_dir`
    (created; it must not exist yet or be empty) and return the manifest.

    `vocab` is the ETL's `vocab` table (`OUT_DIR/vocab`), `run_info` the training run's stamp
    (JSON values: run id, config hash, checkpoints, ...), stored in the manifest as `run`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"{out}: exists and is not empty; choose a new directory")
    graph = ServingGraph(model, schema)
    graph_json, weights = export_program(graph)
    tensors = list(safetensors.torch.load(weights).values())
    files: dict[str, bytes] = {
        SCHEMA_FILE: (json.dumps(schema.to_dict(), indent=2) + "\n").encode(),
        GRAPH_FILE: graph_json,
        WEIGHTS_FILE: weights,
    }
    for name, table in serving_vocab(schema, vocab).items():
        files[f"{VOCAB_DIR}/{name}.parquet"] = _parquet_bytes(table)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": json.loads(json.dumps(dict(run_info))),
        "model": type(model).__name__,
        "output": f"like probability of a {schema.target_entity} row",
        "interface": graph.interface.to_dict(),
        "torch_version": torch.__version__,
        # Every tensor in the weights file: elements and their bytes (the file adds a header).
        "tensor_elements": sum(t.numel() for t in tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "files": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()
        },
        "total_bytes": sum(len(data) for data in files.values()),
    }
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # The manifest last: a directory with a manifest is complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_artifact_files(path: str | Path) -> dict[str, bytes]:
    """Every file of an artifact directory, by relative path (what `Artifact.from_files`
    takes; Ray ships this dict to workers that cannot see the directory)."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not a serving artifact, or incomplete)")
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Artifact:
    """A loaded serving artifact: `score(requests)` for raw requests, `score_samples(rows)`
    for rows of the ETL's samples table."""

    def __init__(
        self,
        manifest: dict[str, Any],
        schema: FeatureSchema,
        encoder: FeatureEncoder,
        program: torch.export.ExportedProgram,
    ) -> None:
        self.manifest = manifest
        self.schema = schema
        self.interface = Interface.for_schema(schema)
        self.requests = RequestEncoder(encoder, self.interface)
        self.program = program
        self._graph = runnable(program)
        # A sequence indexes the item feature's vocabulary.
        item_size = schema.feature(schema.item_feature).vocab_size
        self.vocab_sizes = {
            f.name: item_size if f.group == "sequence" else f.vocab_size for f in schema.features
        }

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        return cls.from_files(read_artifact_files(path), origin=str(path))

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], origin: str = "artifact") -> Artifact:
        manifest = _verified_manifest(files, origin)
        _check_torch_version(manifest, origin)
        try:
            schema_json = json.loads(files[SCHEMA_FILE])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{origin}/{SCHEMA_FILE}: not valid JSON ({e})") from e
        vocab = [
            pq.read_table(pa.BufferReader(data))
            for name, data in sorted(files.items())
            if name.startswith(f"{VOCAB_DIR}/")
        ]
        rows = pa.concat_tables(vocab) if vocab else pa.table({c: [] for c in VOCAB_COLUMNS})
        try:
            # Checks the schema's reserved indices against mkt.encoding's, then parses it.
            encoder = FeatureEncoder.from_schema_file(
                schema_json,
                {c: rows.column(c).to_pylist() for c in VOCAB_COLUMNS},
                origin=f"{origin}/{SCHEMA_FILE}",
            )
        except (EncodingContractError, SchemaError) as e:
            raise ArtifactError(str(e)) from e
        except ValueError as e:
            raise ArtifactError(f"{origin}/{VOCAB_DIR}: {e}") from e
        schema = encoder.schema
        interface = Interface.for_schema(schema)
        if manifest.get("interface") != interface.to_dict():
            raise ArtifactError(
                f"{origin}/{MANIFEST}: interface does not match {SCHEMA_FILE} "
                f"(expected {interface.to_dict()})"
            )
        try:
            program = load_program(files[GRAPH_FILE], files[WEIGHTS_FILE])
        except ProgramError as e:
            raise ArtifactError(f"{origin}/{GRAPH_FILE}: {e}") from e
        return cls(manifest, schema, encoder, program)

    # -- scoring ----------------------------------------------------------------------------
    def encode(self, requests: Any) -> PackedRows:
        """Raw requests -> the graph's inputs (see `mkt.serving.requests.RequestEncoder`)."""
        return self.requests.encode(requests)

    def score(self, requests: Any) -> ScoreResult:
        """Like probabilities of raw requests; a row that fails its checks gets NaN and a
        reason in `errors`, and the other rows are scored."""
        return self.score_packed(self.encode(requests))

    def score_samples(self, rows: pa.Table | Mapping[str, Any]) -> ScoreResult:
        """Like probabilities of rows of the ETL's samples table (indices)."""
        return self.score_packed(check_sample_rows(rows, self.interface, self.vocab_sizes))

    def score_packed(self, packed: PackedRows) -> ScoreResult:
        scores = np.full(len(packed.scalars), np.nan)
        ok = packed.ok
        if ok.any():
            probability = self.run_graph(
                torch.from_numpy(packed.scalars[ok]), torch.from_numpy(packed.sequences[ok])
            )
            scores[ok] = probability.double().numpy()
        return ScoreResult(scores, packed.errors)

    def run_graph(self, scalars: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """The graph on packed, checked indices (`mkt.serving.graph`): probabilities [B]."""
        with torch.inference_mode():
            return self._graph(scalars, sequences)


def _check_torch_version(manifest: Mapping[str, Any], origin: str) -> None:
    """The graph is torch.export's serialisation, which only the torch release line that wrote
    it is sure to read: refuse another major.minor with both versions named."""
    recorded = manifest.get("torch_version")
    written, running = torch_major_minor(recorded), torch_major_minor(torch.__version__)
    if written is None:
        raise ArtifactError(
            f"{origin}/{MANIFEST}: torch_version {recorded!r} is not a torch version; this "
            f"process runs torch {torch.__version__}"
        )
    if written != running:
        raise ArtifactError(
            f"{origin}/{MANIFEST}: exported with torch {recorded} (major.minor {written}), but "
            f"this process runs torch {torch.__version__} ({running}); the {GRAPH_FILE} format "
            f"is only read by the same torch major.minor: load it with torch {written}.x or "
            "export the run again"
        )


def _verified_manifest(files: Mapping[str, bytes], origin: str) -> dict[str, Any]:
    if MANIFEST not in files:
        raise ArtifactError(f"{origin}: no {MANIFEST}")
    try:
        manifest = json.loads(files[MANIFEST])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{origin}/{MANIFEST}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{origin}/{MANIFEST}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}; this library reads {FORMAT!r} {FORMAT_VERSION}"
        )
    listed = manifest.get("files", {})
    for name in (SCHEMA_FILE, GRAPH_FILE, WEIGHTS_FILE):
        if name not in listed:
            raise ArtifactError(f"{origin}/{MANIFEST}: does not list {name}")
    for name in sorted(set(files) - {MANIFEST}):
        if name not in listed:
            raise ArtifactError(f"{origin}/{name}: not listed in {MANIFEST}")
    for name, entry in sorted(listed.items()):
        if name not in files:
            raise ArtifactError(f"{origin}/{name}: listed in {MANIFEST} but missing")
        if _sha256(files[name]) != entry.get("sha256"):
            raise ArtifactError(f"{origin}/{name}: sha256 differs from {MANIFEST} (altered?)")
    return manifest
