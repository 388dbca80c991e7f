"""FiBiNet (Huang et al., 2019): SENET field importance plus bilinear feature interaction.

Single-domain: trained on the target entity's rows only. Fields are every field of a target
row: user features, each behaviour sequence (mean-pooled, one field each), shared features
and the target's specific features. As in the paper's deep variant:

    p = Bilinear(E), q = Bilinear'(SENET(E)), logit = linear(x) + DNN([p || q])

with the first-order linear part read from one-dimensional embeddings of the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mkt.features import Batch
from mkt.layers.bilinear import BILINEAR_TYPES, BilinearInteraction
from mkt.layers.embedding import EmbeddingBank
from mkt.layers.inputs import EntityInputs
from mkt.layers.mlp import MLP
from mkt.layers.pooling import MeanPooling
from mkt.layers.senet import SENet
from mkt.models._baselines import (
    EMBEDDING_DIM,
    SINGLE_DNN,
    SingleEntityModel,
    choice,
    dropout_rate,
    entity_fields,
    layer_sizes,
    positive,
)
from mkt.registry import register
from mkt.schema import FeatureSchema


@register("fibinet")
class FiBiNet(SingleEntityModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "hidden": SINGLE_DNN,  # DNN on the combination layer, the last one the logit
        "dropout": 0.0,
        "reduction_ratio": 3,  # SENET: excitation's middle layer is num_fields / ratio wide
        "bilinear_type": "field_interaction",  # one of BILINEAR_TYPES
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dim = self.params["embedding_dim"]
        self.num_fields = self.input_dim // dim
        kind = choice(self, "bilinear_type", BILINEAR_TYPES)
        self.senet = SENet(self.num_fields, positive(self, "reduction_ratio"))
        self.bilinear = BilinearInteraction(self.num_fields, dim, kind)
        self.bilinear_senet = BilinearInteraction(self.num_fields, dim, kind)
        self.dnn = MLP(
            2 * self.bilinear.out_dim,
            layer_sizes(self, "hidden", logit=True),
            dropout_rate(self),
            last_activation=False,
        )
        self.init_output_bias(self.dnn, self.entity)
        # First-order part: a scalar weight per feature value, the same fields as above.
        linear_bank = EmbeddingBank(
            schema,
            1,
            list(self.inputs.embeddings.tables),
            init_std=self.params["embedding_init_std"],
        )
        self.linear = EntityInputs(
            schema, 1, embeddings=linear_bank, attention=MeanPooling(), entities=[self.entity]
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        fields = self.fields(batch).view(-1, self.num_fields, self.params["embedding_dim"])
        combined = torch.cat(
            [self.bilinear(fields), self.bilinear_senet(self.senet(fields))], dim=1
        )
        first_order = entity_fields(self.linear(batch), self.entity).sum(1)
        return {"logit": self.dnn(combined).squeeze(-1) + first_order}
