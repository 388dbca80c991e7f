"""What the baseline models (section 4.1.2) share: the rows and fields a single-entity model
reads, the inputs of a joint model, and the checks of their size parameters.

None of the baselines has HFA, so each decides where the entity-specific fields go; see
docs/baselines.md for every model's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mkt.contract import ConfigError
from mkt.features import Batch
from mkt.layers.attention import TargetAttention
from mkt.layers.embedding import EmbeddingBank
from mkt.layers.inputs import EntityInputs
from mkt.layers.pooling import MeanPooling
from mkt.layers.towers import EntityTowers
from mkt.models.base import CTRModel
from mkt.schema import FeatureSchema

# Sizes of the paper's public data set runs (section 4.1.3).
EMBEDDING_DIM = 8
SINGLE_DNN = [128, 64, 16, 1]
JOINT_SHARED = [128, 64]
JOINT_TOWER = [16, 1]
ATTENTION_HIDDEN = [32, 16]


def layer_sizes(model: CTRModel, key: str, logit: bool = False) -> list[int]:
    """`params[key]` as a list of positive widths; with `logit`, the last must be the 1-unit
    logit layer."""
    sizes = list(model.params[key])
    ok = bool(sizes) and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    )
    if not ok or (logit and sizes[-1] != 1):
        need = (
            "positive layer widths ending in the 1-unit logit layer"
            if logit
            else "positive layer widths"
        )
        raise ConfigError(f"{type(model).__name__}.{key}: expected {need}, got {sizes!r}")
    return sizes


def positive(model: CTRModel, key: str) -> Any:
    value = model.params[key]
    if value <= 0:
        raise ConfigError(f"{type(model).__name__}.{key}: must be > 0, got {value!r}")
    return value


def dropout_rate(model: CTRModel) -> float:
    rate = model.params["dropout"]
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"{type(model).__name__}.dropout: must be in [0, 1), got {rate!r}")
    return float(rate)


def choice(model: CTRModel, key: str, choices: tuple[str, ...]) -> str:
    value = model.params[key]
    if value not in choices:
        raise ConfigError(f"{type(model).__name__}.{key}: {value!r} is not one of {choices}")
    return value


def entity_fields(parts: dict[str, Any], entity: str) -> Tensor:
    """`EntityInputs` output -> [v_u || v_seq || v_shared || v_spec(entity)]."""
    return torch.cat(
        [parts["user"], parts["seq"], parts["shared"], parts["specific"][entity]], dim=1
    )


class SingleEntityModel(CTRModel):
    """A single-domain model: trained on the rows of one entity (`train_entities`: the
    target, or the source in a pre-training stage) and reading every field those rows carry,
    eq. 1's v = [v_u || v_seq || v_shared || v_spec(entity)], both behaviour sequences
    included. The other entity's specific features are not embedded at all.

    Sequences are mean-pooled unless a subclass overrides `sequence_pooler`."""

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        self.entity = (
            schema.source_entity if self.train_entities == "source" else schema.target_entity
        )
        dim = positive(self, "embedding_dim")
        names = [
            f.name
            for f in (
                *schema.user_features,
                *schema.shared_features,
                *schema.specific_features(self.entity),
            )
        ]
        self.inputs = EntityInputs(
            schema,
            dim,
            embeddings=EmbeddingBank(
                schema, dim, names, init_std=self.params["embedding_init_std"]
            ),
            attention=self.sequence_pooler(dim),  # type: ignore[arg-type]
            entities=[self.entity],
        )
        self.common_dim = self.inputs.common_dim
        self.input_dim = self.common_dim + self.inputs.specific_dim(self.entity)

    def sequence_pooler(self, dim: int) -> nn.Module:
        """Pools a sequence with the call of `TargetAttention`: (query, keys, mask)."""
        return MeanPooling()

    def fields(self, batch: Batch) -> Tensor:
        """`[B, input_dim]`: user, pooled sequences, shared, then this entity's specific
        fields, `embedding_dim` columns each (the first `common_dim` columns are the fields
        every entity has)."""
        return entity_fields(self.inputs(batch), self.entity)


class JointModel(CTRModel):
    """A joint model: trained on the mixed rows of all entities, each row scored by its own
    entity's tower (`batch["entity_index"]`). Inputs are eq. 1 as MEM reads them: sequences
    pooled by one target attention shared across entities (section 3.2.1), unless a subclass
    overrides `sequence_pooler`."""

    train_entities = "both"

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dim = positive(self, "embedding_dim")
        self.entities = list(schema.entities)
        self.inputs = EntityInputs(
            schema,
            dim,
            embeddings=EmbeddingBank(schema, dim, init_std=self.params["embedding_init_std"]),
            attention=self.sequence_pooler(dim),  # type: ignore[arg-type]
        )
        self.common_dim = self.inputs.common_dim
        self.specific_dims = [self.inputs.specific_dim(e) for e in self.entities]

    def init_tower_biases(self, towers: EntityTowers) -> None:
        """Each entity's tower starts at that entity's train like rate."""
        for entity, tower in zip(self.entities, towers.towers, strict=True):
            self.init_output_bias(tower, entity)

    def encode(self, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """[v_u || v_seq || v_shared] `[B, common_dim]`, and each entity's specific fields
        `[B, specific_dims[e]]` (zeros on the other entities' rows)."""
        parts = self.inputs(batch)
        common = torch.cat([parts["user"], parts["seq"], parts["shared"]], dim=1)
        return common, [parts["specific"][e] for e in self.entities]

    def sequence_pooler(self, dim: int) -> nn.Module:
        return TargetAttention(dim, layer_sizes(self, "attention_hidden"))


def embedding_bank_of(model: CTRModel, who: str) -> EmbeddingBank:
    """The embedding tables of a pre-trained stage (for the two-stage baselines)."""
    bank = getattr(getattr(model, "inputs", None), "embeddings", None)
    if not isinstance(bank, EmbeddingBank):
        raise ConfigError(
            f"{who}: pretrained model {type(model).__name__} has no embedding tables to transfer"
        )
    return bank


def copy_tables(source: EmbeddingBank, target: EmbeddingBank, names: list[str], who: str) -> None:
    """Copy (not share) the named tables; the stages then train independently."""
    for name in names:
        if name not in source.tables:
            raise ConfigError(f"{who}: pretrained model has no embedding table for {name!r}")
        src, dst = source.tables[name].weight, target.tables[name].weight
        if src.shape != dst.shape:
            raise ConfigError(
                f"{who}: embedding {name!r} is {tuple(src.shape)} in the pretrained model, "
                f"{tuple(dst.shape)} here (embedding_dim or schema differ)"
            )
        with torch.no_grad():
            dst.copy_(src)
