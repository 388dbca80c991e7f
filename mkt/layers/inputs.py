"""The parts of the paper's eq. 1 for a batch: v = [v_u || v_seq || v_shared || v_spec].

Groups come from the feature schema. Every entity's behaviour sequence is pooled by one
`TargetAttention` with the row's item embedding as query: the attention reads only the
entity-shared item feature, so its parameters are shared across entities (section 3.2.1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.features import Batch
from mkt.layers.attention import TargetAttention
from mkt.layers.embedding import EmbeddingBank
from mkt.schema import FeatureSchema


class EntityInputs(nn.Module):
    def __init__(
        self,
        schema: FeatureSchema,
        dim: int = 8,
        embeddings: EmbeddingBank | None = None,
        attention: TargetAttention | None = None,
        entities: list[str] | None = None,
    ) -> None:
        """`entities` limits `specific` to those entities (a target-only serving graph);
        by default every entity of the schema."""
        super().__init__()
        self.dim = dim
        self.item_feature = schema.item_feature
        self.user_names = [f.name for f in schema.user_features]
        self.shared_names = [f.name for f in schema.shared_features]
        self.seq_names = [f.name for f in schema.sequences]
        self.entities = list(schema.entities) if entities is None else list(entities)
        self.specific_names = {
            e: [f.name for f in schema.specific_features(e)] for e in self.entities
        }
        self.embeddings = embeddings if embeddings is not None else EmbeddingBank(schema, dim)
        if self.embeddings.dim != dim:
            raise ValueError(f"EntityInputs: embeddings of dim {self.embeddings.dim}, not {dim}")
        self.attention = attention if attention is not None else TargetAttention(dim)

    @property
    def common_dim(self) -> int:
        """Width of [v_u || v_seq || v_shared], the part every entity has."""
        return self.dim * (len(self.user_names) + len(self.seq_names) + len(self.shared_names))

    def specific_dim(self, entity: str) -> int:
        return self.dim * len(self.specific_names[entity])

    def user(self, batch: Batch) -> Tensor:
        return self.embeddings(batch, self.user_names).flatten(1)

    def shared(self, batch: Batch) -> Tensor:
        return self.embeddings(batch, self.shared_names).flatten(1)

    def seq(self, batch: Batch) -> Tensor:
        query = self.embeddings.lookup(self.item_feature, batch[self.item_feature])
        pooled = []
        for name in self.seq_names:
            keys, mask = self.embeddings.sequence(batch, name)
            pooled.append(self.attention(query, keys, mask))
        if not pooled:
            return query.new_zeros((query.shape[0], 0))
        return torch.cat(pooled, dim=1)

    def specific(self, batch: Batch, entity: str) -> Tensor:
        """`[B, n_spec(entity) * dim]`; rows of another entity hold index 0, i.e. zeros."""
        return self.embeddings(batch, self.specific_names[entity]).flatten(1)

    def interest_fields(self, user: Tensor, seq: Tensor, shared: Tensor) -> tuple[Tensor, Tensor]:
        """What `InterestTerm` reads, from the flat parts: the user's fields (profile features,
        pooled sequences) `[B, F, d]` and the candidate item's vector `[B, d]`."""
        fields = torch.cat([user, seq], dim=1).view(user.shape[0], -1, self.dim)
        item = shared.view(shared.shape[0], -1, self.dim)[
            :, self.shared_names.index(self.item_feature)
        ]
        return fields, item

    @property
    def num_interest_fields(self) -> int:
        return len(self.user_names) + len(self.seq_names)

    def forward(self, batch: Batch) -> dict:
        """All four parts; one lookup per table (`EmbeddingBank.gather`) where the shapes may
        depend on the data, the per-feature lookups of the methods above in a traced graph."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return {
                "user": self.user(batch),
                "seq": self.seq(batch),
                "shared": self.shared(batch),
                "specific": {e: self.specific(batch, e) for e in self.entities},
            }
        looked_up = self.embeddings.gather(batch)
        query = looked_up.columns[self.item_feature]
        pooled = [self.attention.pool(query, *looked_up.sequences[s]) for s in self.seq_names]
        return {
            "user": looked_up.features(self.user_names).flatten(1),
            "seq": torch.cat(pooled, dim=1) if pooled else query.new_zeros((query.shape[0], 0)),
            "shared": looked_up.features(self.shared_names).flatten(1),
            "specific": {
                e: looked_up.features(self.specific_names[e]).flatten(1) for e in self.entities
            },
        }
