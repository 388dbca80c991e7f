"""CTNet (Liu et al., 2023) as the paper runs it (section 4.1.3): "since CTNet can not deal
with multiple entities, we can only transfer the embedding of user and entity-shared features".

Stage 1 (`din_source`) is DIN on the source entity's rows. Stage 2 (`ctnet`) is CTNet's
two-tower layout cut down to that: the target tower is a DIN on the target rows with its own
embeddings, attention and DNN, all trained from scratch; the source tower is a frozen copy of
stage 1's user and shared embedding tables, nothing else. As CTNet plugs source
representations into the target tower through GLU adapters, each transferred group
(user, shared) passes through its own GLU gate and is added to the target tower's embedding
of the same group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mkt.features import Batch
from mkt.layers.embedding import EmbeddingBank
from mkt.layers.gate import GLUGate
from mkt.models._baselines import copy_tables, embedding_bank_of, entity_fields
from mkt.models.base import CTRModel
from mkt.models.din import DIN
from mkt.registry import Stage, register, register_pipeline
from mkt.schema import FeatureSchema


@register("ctnet")
class CTNet(DIN):
    def __init__(
        self,
        schema: FeatureSchema,
        params: Mapping[str, Any] | None = None,
        pretrained: CTRModel | None = None,
    ) -> None:
        """Without `pretrained` the source tables start random (e.g. to load a checkpoint)."""
        super().__init__(schema, params)
        dim = self.params["embedding_dim"]
        self.groups = {"user": self.inputs.user_names, "shared": self.inputs.shared_names}
        transferred = [n for names in self.groups.values() for n in names]
        self.source_embeddings = EmbeddingBank(
            schema, dim, transferred, init_std=self.params["embedding_init_std"]
        )
        if pretrained is not None:
            source = embedding_bank_of(pretrained, "ctnet")
            copy_tables(source, self.source_embeddings, transferred, "ctnet")
        self.source_embeddings.requires_grad_(False)
        self.adapters = torch.nn.ModuleDict(
            {g: GLUGate(dim * len(names), dim * len(names)) for g, names in self.groups.items()}
        )

    def fields(self, batch: Batch) -> torch.Tensor:
        parts = self.inputs(batch)
        for group, names in self.groups.items():
            knowledge = self.source_embeddings(batch, names).flatten(1)
            parts[group] = parts[group] + self.adapters[group](knowledge)
        return entity_fields(parts, self.entity)


register_pipeline(
    "ctnet",
    (
        Stage("pretrain", "din_source", "source"),
        Stage("ctnet", "ctnet", "target", pretrained_from="pretrain"),
    ),
)
