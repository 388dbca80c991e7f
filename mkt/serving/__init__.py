"""Serving: a trained model's online part as a self-contained artifact (docs/serving.md).

    export_artifact(tem, schema, vocab_table, run_info, out_dir)   # train/export.py calls it
    artifact = Artifact.load(out_dir)                               # checks every sha256
    result = artifact.score([{"user_id": "17", ..., "recent_likes": {...}}, ...])
    result.scores, result.errors                                    # NaN + reason per bad row

Plain PyTorch, numpy and pyarrow: no Spark, no Ray.
"""

from mkt.serving.artifact import (
    Artifact,
    ArtifactError,
    ScoreResult,
    export_artifact,
    read_artifact_files,
)
from mkt.serving.graph import Interface, ProgramError, ServingGraph
from mkt.serving.requests import RECENT_LIKES, PackedRows, RequestEncoder, RequestError

__all__ = [
    "RECENT_LIKES",
    "Artifact",
    "ArtifactError",
    "Interface",
    "PackedRows",
    "ProgramError",
    "RequestEncoder",
    "RequestError",
    "ScoreResult",
    "ServingGraph",
    "export_artifact",
    "read_artifact_files",
]
