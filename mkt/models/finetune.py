"""Finetune baseline (section 4.1.2): pre-train on the source entity's rows only, then
fine-tune on the target entity's rows starting from the pre-trained weights.

Both stages are DIN (`din_source`, then `finetune`). The schemas differ only in the specific
fields, so stage 2 starts from stage 1's:
- user and shared embedding tables (the shared item table is also the sequences' table);
- the sequence target attention;
- the DNN: every layer after the first whole; the first layer's columns for the common fields
  [v_u || v_seq || v_shared] and its bias.
The target-specific embeddings and the first layer's columns that read them start fresh
(the source model has no such fields). Nothing is frozen: stage 2 trains every weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mkt.contract import ConfigError
from mkt.models._baselines import copy_tables
from mkt.models.base import CTRModel
from mkt.models.din import DIN
from mkt.registry import Stage, register, register_pipeline
from mkt.schema import FeatureSchema


@register("finetune")
class Finetune(DIN):
    def __init__(
        self,
        schema: FeatureSchema,
        params: Mapping[str, Any] | None = None,
        pretrained: CTRModel | None = None,
    ) -> None:
        """Without `pretrained` the network starts fresh (e.g. to load a checkpoint)."""
        super().__init__(schema, params)
        if pretrained is not None:
            self.transfer_from(pretrained)

    def transfer_from(self, base: CTRModel) -> None:
        if not isinstance(base, DIN):
            raise ConfigError(
                f"finetune: the pretrained stage must be a DIN ('din_source'), "
                f"got {type(base).__name__}"
            )
        for key in ("embedding_dim", "attention_hidden", "hidden"):
            if base.params[key] != self.params[key]:
                raise ConfigError(
                    f"finetune.{key}: {self.params[key]!r} differs from the pretrained "
                    f"model's {base.params[key]!r}, so its weights cannot be transferred"
                )
        copy_tables(
            base.inputs.embeddings,
            self.inputs.embeddings,
            self.inputs.user_names + self.inputs.shared_names,
            "finetune",
        )
        self.inputs.attention.load_state_dict(base.inputs.attention.state_dict())
        source = [m for m in base.dnn.net if isinstance(m, nn.Linear)]
        target = [m for m in self.dnn.net if isinstance(m, nn.Linear)]
        common = self.common_dim  # same user, sequence and shared fields in both stages
        with torch.no_grad():
            target[0].weight[:, :common].copy_(source[0].weight[:, :common])
            target[0].bias.copy_(source[0].bias)
        for src, dst in zip(source[1:], target[1:], strict=True):
            dst.load_state_dict(src.state_dict())
        # The copied logit layer's bias is the source's like rate; this stage scores targets.
        self.init_output_bias(self.dnn, self.entity)


register_pipeline(
    "finetune",
    (
        Stage("pretrain", "din_source", "source"),
        Stage("finetune", "finetune", "target", pretrained_from="pretrain"),
    ),
)
