"""TEM, the Target Entity Model of MKT's second stage (paper section 3.3, eqs. 12-13).

A single-entity DNN with its own embeddings, trained on target rows only. With a pretrained
MEM it plugs in four knowledge vectors of the frozen MEM's target path, each filtered by its
own GLU gate and added to TEM's vector of the same meaning (eq. 12):

    v_u_final     = v_u^TEM     + gate_user(v_u^MEM)
    v_seq_final   = v_seq^TEM   + gate_seq(v_seq^MEM)
    v_shared_final= v_shared^TEM+ gate_shared(v_shared^MEM)
    g_cross_final = g_cross^TEM + gate_cross(g_com^t)     g_cross^TEM: the DNN's layer
                                                          `cross_layer` (64 units by default)

Beside the paper (docs/model.md, TEM choices 3-5): with `from_mem_logit` the logit is the
frozen MEM's own target logit plus the DNN's output; with `wide` it adds TEM's own
first-order term over the target's features; given the target's own model too (a frozen TEM
alone, `pretrained=(mem, tem_alone)`), the logit starts from a learnt weighting of the MEM's
logit and that model's, so the TEM can shut out a MEM that predicts worse than no transfer.

`TEM(schema, params, pretrained=None)` is the "w/o MEM" ablation: TEM alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mkt.contract import ConfigError
from mkt.features import Batch
from mkt.layers import (
    MLP,
    EmbeddingBank,
    EntityInputs,
    FirstOrder,
    GLUGate,
    InterestTerm,
    TargetAttention,
)
from mkt.models._baselines import copy_tables
from mkt.models.base import CTRModel
from mkt.models.mem import MEM, check_params, entity_feature_names
from mkt.registry import register
from mkt.schema import FeatureSchema

PLUGS = ("user", "seq", "shared", "cross")
# The weights of (the MEM's logit, TEM alone's logit) the TEM can start from (TEM choice 5).
START_WEIGHTS = {"mean": (0.5, 0.5), "mem": (1.0, 0.0), "tem_alone": (0.0, 1.0)}
EMBEDDINGS = ("frozen_mem", "init_from_mem", "own")


@register("tem")
class TEM(CTRModel):
    train_entities = "target"
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": 8,
        "attention_hidden": [32, 16],
        # The paper's public-data DNN is [128, 64, 16, 1]; the final 1 is the output layer.
        "hidden": [128, 64, 16],
        # g_cross^TEM is the output of this many hidden layers (2: the 64-unit layer, as wide
        # as MEM's g_com with cke_hidden [128, 64]).
        "cross_layer": 2,
        "plug_user": True,
        "plug_seq": True,
        "plug_shared": True,
        "plug_cross": True,
        "dropout": 0.0,
        # TEM's low-level embeddings when a MEM is plugged in (section 3.1: "the TEM is trained
        # with the frozen low-level feature embeddings ... of MEM"): `frozen_mem` reads the
        # MEM's frozen tables, `init_from_mem` starts its own tables as copies of them, `own`
        # starts its own tables afresh. TEM alone always has its own. docs/model.md, TEM choice 1.
        "embeddings": "frozen_mem",
        # With a MEM plugged in, TEM's DNN learns a correction to the frozen MEM's own target
        # logit (its output layer starts at 0, so training starts from the MEM's prediction)
        # rather than the whole logit (False: the paper's eq. 13). docs/model.md, TEM choice 3.
        "from_mem_logit": True,
        # The logit adds TEM's own first-order term over the target's user, shared and
        # specific features (as MEM's `wide`; with `from_mem_logit`, a correction of the
        # MEM's logit beside the DNN's). docs/model.md, TEM choice 4.
        "wide": True,
        # The logit adds the factorised interest term of TEM's final user fields (eq. 12's
        # v_u and v_seq) and the candidate (as MEM's `interest`). docs/model.md, TEM choice 6.
        "interest": False,
    }

    def __init__(
        self,
        schema: FeatureSchema,
        params: Mapping[str, Any] | None = None,
        pretrained: MEM | tuple[MEM, TEM] | None = None,
    ) -> None:
        super().__init__(schema, params)
        p = self.params
        check_params("TEM", p, positive=["embedding_dim", "cross_layer"], nonempty=["hidden"])
        if p["cross_layer"] > len(p["hidden"]):
            raise ConfigError(
                f"TEM.cross_layer: {p['cross_layer']} exceeds the {len(p['hidden'])} hidden layers"
            )
        pretrained, tem_alone = split_pretrained(pretrained)
        if p["embeddings"] not in EMBEDDINGS:
            raise ConfigError(f"TEM.embeddings: {p['embeddings']!r} is not one of {EMBEDDINGS}")
        dim = p["embedding_dim"]
        target = schema.target_entity
        knowledge = None
        if pretrained is not None:
            # Freeze the MEM: no gradients, and eval mode kept by `train()` below.
            pretrained.requires_grad_(False)
            pretrained.eval()
            knowledge = pretrained.target_path(with_logit=bool(p["from_mem_logit"]))
            if p["embeddings"] != "own" and knowledge.inputs.dim != dim:
                raise ConfigError(
                    f"TEM.embedding_dim: {dim}, but embeddings={p['embeddings']!r} takes the "
                    f"MEM's, of dim {knowledge.inputs.dim}"
                )
        if knowledge is not None and p["embeddings"] == "frozen_mem":
            bank = knowledge.inputs.embeddings
        else:
            own_tables = entity_feature_names(schema, target)
            bank = EmbeddingBank(schema, dim, names=own_tables, init_std=p["embedding_init_std"])
            if knowledge is not None and p["embeddings"] == "init_from_mem":
                copy_tables(knowledge.inputs.embeddings, bank, own_tables, "TEM")
        self.inputs = EntityInputs(
            schema,
            dim,
            embeddings=bank,
            attention=TargetAttention(dim, p["attention_hidden"]),
            entities=[target],
        )
        self.target = target
        in_dim = self.inputs.common_dim + self.inputs.specific_dim(target)
        cut = p["cross_layer"]
        self.bottom = MLP(in_dim, p["hidden"][:cut], p["dropout"])
        self.top = MLP(
            self.bottom.out_dim, [*p["hidden"][cut:], 1], p["dropout"], last_activation=False
        )
        self.from_mem_logit = knowledge is not None and bool(p["from_mem_logit"])
        # The target's own model (TEM choice 5), frozen as the MEM is.
        self.tem_alone = tem_alone
        if tem_alone is not None:
            tem_alone.requires_grad_(False)
            tem_alone.eval()
        starts_from = int(self.from_mem_logit) + int(tem_alone is not None)
        # Two frozen predictions are weighed by weights learnt on rows neither model fitted
        # (the holdout), starting from whichever of START_WEIGHTS validates best; one is
        # taken as it is.
        self.start_weights = (
            nn.Parameter(torch.tensor(START_WEIGHTS["mean"])) if starts_from == 2 else None
        )
        if starts_from:
            logit_layer = [m for m in self.top.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(logit_layer.weight)
            nn.init.zeros_(logit_layer.bias)
        else:
            self.init_output_bias(self.top, target)

        self.wide = FirstOrder(schema, entity_feature_names(schema, target)) if p["wide"] else None
        self.interest = (
            InterestTerm(self.inputs.num_interest_fields, dim) if p["interest"] else None
        )
        self.knowledge = knowledge
        self.gates = nn.ModuleDict()
        if self.knowledge is not None:
            own_dims = {
                "user": dim * len(self.inputs.user_names),
                "seq": dim * len(self.inputs.seq_names),
                "shared": dim * len(self.inputs.shared_names),
                "cross": self.bottom.out_dim,
            }
            for name in PLUGS:
                if p[f"plug_{name}"]:
                    self.gates[name] = GLUGate(self.knowledge.out_dims[name], own_dims[name])

    def start_options(self) -> tuple[str, ...]:
        return tuple(START_WEIGHTS) if self.start_weights is not None else super().start_options()

    def use_start(self, name: str) -> None:
        super().use_start(name)
        if self.start_weights is not None:
            with torch.no_grad():
                self.start_weights.copy_(torch.tensor(START_WEIGHTS[name]))

    def train(self, mode: bool = True) -> TEM:
        super().train(mode)
        for frozen in (self.knowledge, self.tem_alone):
            if frozen is not None:
                frozen.eval()
        return self

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        parts = self.inputs(batch)
        user, seq, shared = parts["user"], parts["seq"], parts["shared"]
        specific = parts["specific"][self.target]
        g_com = mem_logit = None
        if self.knowledge is not None:
            mem_user, mem_seq, mem_shared, g_com, mem_logit = self.knowledge.knowledge_and_logit(
                batch, with_logit=self.from_mem_logit
            )
            if "user" in self.gates:
                user = user + self.gates["user"](mem_user)
            if "seq" in self.gates:
                seq = seq + self.gates["seq"](mem_seq)
            if "shared" in self.gates:
                shared = shared + self.gates["shared"](mem_shared)
        g_cross = self.bottom(torch.cat([user, seq, shared, specific], dim=1))
        if g_com is not None and "cross" in self.gates:
            g_cross = g_cross + self.gates["cross"](g_com)  # eq. 12
        logit = self.top(g_cross).squeeze(-1)
        if self.wide is not None:
            logit = logit + self.wide(batch)
        if self.interest is not None:
            logit = logit + self.interest(*self.inputs.interest_fields(user, seq, shared))
        alone_logit = self.tem_alone(batch)["logit"] if self.tem_alone is not None else None
        start = [s for s in (mem_logit, alone_logit) if s is not None]
        if self.start_weights is not None:
            logit = logit + torch.stack(start, dim=1) @ self.start_weights
        elif start:
            logit = logit + start[0]
        return {"logit": logit}

    def serving_module(self) -> TEMServing:
        """The online-serving graph (grey in the paper's Figure 2), sharing this TEM's
        parameters; call `.eval()` on it before exporting."""
        return TEMServing(self)


def split_pretrained(pretrained: Any) -> tuple[MEM | None, TEM | None]:
    """`pretrained`: nothing (TEM alone), a MEM, or a MEM and the target's own model (a TEM
    alone trained on the same target rows as the MEM)."""
    if pretrained is None:
        return None, None
    models = pretrained if isinstance(pretrained, tuple) else (pretrained,)
    mem, alone = models[0], models[1] if len(models) > 1 else None
    if (
        len(models) > 2
        or not isinstance(mem, MEM)
        or (alone is not None and not (isinstance(alone, TEM) and alone.knowledge is None))
    ):
        names = [type(m).__name__ for m in models]
        raise ConfigError(f"TEM: pretrained must be a MEM, or a MEM and a TEM alone; got {names}")
    return mem, alone


class TEMServing(nn.Module):
    """`forward(batch) -> logit [B]` for target rows. TEM already holds only the MEM's target
    path (no source-specific table, HFA, gate, extractor or tower), so this is TEM with a
    plain tensor output, which torch.export and TorchScript tracing take as is."""

    def __init__(self, tem: TEM) -> None:
        super().__init__()
        self.tem = tem

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.tem(batch)["logit"]
