"""MEM, the Multi-Entity Model of MKT's first stage (paper section 3.2, eqs. 1-11).

One network trained on a batch that mixes source and target rows; every row is routed by its
`entity_index`:

    v^e     = [v_u || v_seq || v_shared || v_spec^e]                  eq. 1-2  EntityInputs
    q^e     = HFA^e(v^e)                                              eq. 3-6  HFA
    g_com   = MMoE(q^e), gate of the row's entity                     eq. 7    self.cke
    g_ind^e = KE^e(v^e)     (SKE for the source, TKE for the target)  eq. 8    self.extractors
    logit   = tower^e([g_com || g_ind^e])
    loss    = BCE_source + BCE_target + gamma * PDL                   eq. 9-11 MEM.loss

docs/model.md maps each equation to the lines below and records the choices the paper
leaves open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkt.contract import ConfigError
from mkt.features import Batch
from mkt.layers import (
    MLP,
    CrossNetwork,
    EmbeddingBank,
    EntityInputs,
    FirstOrder,
    InterestTerm,
    MMoE,
    TargetAttention,
)
from mkt.models.base import CTRModel
from mkt.registry import register
from mkt.schema import FeatureSchema


class HFA(nn.Module):
    """Heterogeneous Feature Alignment for one entity (eqs. 3-6).

    Scores each entity-specific feature in (0, 2) from explicit (DCN) and implicit (MLP)
    crosses, scales its embedding by the score and maps the result to `d_hfa`, the size every
    entity shares; then appends it to the entity-common part [v_u || v_seq || v_shared].
    With `cross_with_shared` the crosses read [v_spec || common] (the paper's text), otherwise
    v_spec alone (its eq. 3).
    """

    def __init__(
        self,
        common_dim: int,
        num_specific: int,
        dim: int,
        d_hfa: int,
        cross_with_shared: bool,
        cross_layers: int,
        mlp_hidden: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_specific = num_specific
        self.dim = dim
        self.cross_with_shared = cross_with_shared
        cross_in = num_specific * dim + (common_dim if cross_with_shared else 0)
        self.explicit = CrossNetwork(cross_in, cross_layers)
        self.implicit = MLP(cross_in, mlp_hidden, dropout)
        self.score = nn.Linear(self.explicit.out_dim + self.implicit.out_dim, num_specific)
        self.align = MLP(num_specific * dim, [d_hfa, d_hfa], dropout, last_activation=False)
        self.out_dim = common_dim + d_hfa

    def forward(self, common: Tensor, specific: Tensor) -> tuple[Tensor, Tensor]:
        """-> (q [B, common + d_hfa], importance p [B, n_spec])."""
        x = torch.cat([specific, common], dim=1) if self.cross_with_shared else specific
        crossed = torch.cat([self.explicit(x), self.implicit(x)], dim=1)  # eq. 3
        p = 2 * torch.sigmoid(self.score(crossed))  # eq. 4
        v = specific.view(-1, self.num_specific, self.dim)  # eq. 5
        scaled = (v * p.unsqueeze(-1)).flatten(1)
        return torch.cat([common, self.align(scaled)], dim=1), p  # eq. 6


def unaligned_q(common: Tensor, specific: dict[str, Tensor], widths: dict[str, int]) -> Tensor:
    """The "w/o HFA" input: every entity's specific embeddings side by side, unscored. An entity
    missing from `specific` contributes zeros, which is exactly what its padding index embeds
    to on rows of another entity (so a target-only graph needs no source tables)."""
    parts = [common]
    for entity, width in widths.items():
        part = specific.get(entity)
        parts.append(part if part is not None else common.new_zeros((common.shape[0], width)))
    return torch.cat(parts, dim=1)


def by_entity(
    entity_index: Tensor, entities: list[str], compute: Callable[[str, Tensor], Tensor]
) -> Tensor:
    """Route a mixed batch: `compute(entity, rows)` runs that entity's modules on its own rows
    only (their indices in the batch), and the results come back in batch order."""
    parts, order = [], []
    for e, entity in enumerate(entities):
        rows = (entity_index == e).nonzero().squeeze(1)
        parts.append(compute(entity, rows))
        order.append(rows)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


@register("mem")
class MEM(CTRModel):
    train_entities = "both"
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": 8,
        "attention_hidden": [32, 16],
        "hfa": True,
        # The paper's text crosses the specific features with the shared ones; its eq. 3
        # crosses the specific ones alone (False). See docs/model.md.
        "hfa_cross_with_shared": True,
        "hfa_cross_layers": 2,
        "hfa_mlp_hidden": [64, 32],
        "d_hfa": 32,
        "cke_hidden": [128, 64],
        "num_experts": 3,
        "tower_hidden": [16],
        "gamma": 0.01,
        # Whether source rows read the target entity's behaviour sequence (docs/model.md,
        # choice 9): off, the source's labels never move the target items' embeddings.
        "source_reads_target_sequence": False,
        "dropout": 0.0,
        # Each entity's logit adds a first-order term over its user, shared and specific
        # features (one weight per value, as the regression's). docs/model.md, MEM choice 12.
        "wide": False,
        # Each entity's logit adds the factorised interest term <v_f W_f^e, v_item> of the
        # user's fields and the candidate (mkt/layers/interest.py), W_f^e the entity's own:
        # the user's vectors are shared, what each entity reads of them is not (one W for
        # both let the source's own tastes into the target's term). docs/model.md, MEM
        # choice 13; on by default with `entity_user` (choice 14, chosen on validation).
        "interest": True,
        # Each user feature's vector is a common row plus a row of the row's entity (the
        # generator's c_u + s_u^e): the source's own tastes get a place of their own instead of
        # the vector the target reads. docs/model.md, MEM choice 14.
        "entity_user": True,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        p = self.params
        check_params(
            "MEM",
            p,
            positive=["embedding_dim", "d_hfa", "num_experts", "hfa_cross_layers"],
            nonempty=["cke_hidden"],
        )
        if p["gamma"] < 0:
            raise ConfigError(f"MEM.gamma: must be >= 0, got {p['gamma']}")
        dim = p["embedding_dim"]
        self.entities = list(schema.entities)
        self.inputs = EntityInputs(
            schema,
            dim,
            embeddings=EmbeddingBank(schema, dim, init_std=p["embedding_init_std"]),
            attention=TargetAttention(dim, p["attention_hidden"]),
        )
        if not p["source_reads_target_sequence"]:
            for f in schema.sequences:
                if f.entity == schema.target_entity:
                    self.inputs.embeddings.read_sequences(f.name, [schema.target_index])
        common = self.inputs.common_dim
        self.spec_widths = {e: self.inputs.specific_dim(e) for e in self.entities}
        self.hfa = nn.ModuleDict()
        if p["hfa"]:
            for e in self.entities:
                n_spec = len(schema.specific_features(e))
                if n_spec == 0:
                    raise ConfigError(f"MEM.hfa: entity {e!r} has no specific features to align")
                self.hfa[e] = HFA(
                    common,
                    n_spec,
                    dim,
                    p["d_hfa"],
                    p["hfa_cross_with_shared"],
                    p["hfa_cross_layers"],
                    p["hfa_mlp_hidden"],
                    p["dropout"],
                )
            q_dim = common + p["d_hfa"]
        else:
            q_dim = common + sum(self.spec_widths.values())
        self.cke = MMoE(q_dim, p["num_experts"], p["cke_hidden"], len(self.entities), p["dropout"])
        # SKE / TKE (eq. 8): independent extractors on v^e, as wide as the CKE output.
        self.extractors = nn.ModuleDict(
            {
                e: MLP(common + self.spec_widths[e], p["cke_hidden"], p["dropout"])
                for e in self.entities
            }
        )
        self.towers = nn.ModuleDict(
            {
                e: MLP(
                    2 * self.cke.out_dim,
                    [*p["tower_hidden"], 1],
                    p["dropout"],
                    last_activation=False,
                )
                for e in self.entities
            }
        )
        for e, tower in self.towers.items():
            self.init_output_bias(tower, e)
        self.wide = nn.ModuleDict()
        if p["wide"]:
            for e in self.entities:
                self.wide[e] = FirstOrder(schema, entity_feature_names(schema, e))
        # Start at zero: the model starts as the one with shared user vectors.
        self.entity_user = nn.ModuleDict()
        if p["entity_user"]:
            for index, e in enumerate(self.entities):
                bank = EmbeddingBank(schema, dim, self.inputs.user_names, init_std=0.0)
                bank.read_by([index])
                self.entity_user[e] = bank
        self.interest = nn.ModuleDict()
        if p["interest"]:
            for e in self.entities:
                self.interest[e] = InterestTerm(self.inputs.num_interest_fields, dim)

    def common(self, parts: dict) -> Tensor:
        return torch.cat([parts["user"], parts["seq"], parts["shared"]], dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        parts = self.inputs(batch)
        for bank in self.entity_user.values():
            parts["user"] = parts["user"] + bank(batch, self.inputs.user_names).flatten(1)
        common, specific = self.common(parts), parts["specific"]
        entity_index = batch["entity_index"]
        out: dict[str, Tensor] = {}

        def align(entity: str, rows: Tensor) -> Tensor:
            q_e, out[f"importance_{entity}"] = self.hfa[entity](
                common[rows], specific[entity][rows]
            )
            return q_e

        if self.params["hfa"]:
            q = by_entity(entity_index, self.entities, align)  # eqs. 3-6
        else:
            q = unaligned_q(common, specific, self.spec_widths)
        g_com = self.cke(q, entity_index)  # eq. 7
        g_ind = by_entity(
            entity_index,
            self.entities,
            lambda e, rows: self.extractors[e](torch.cat([common[rows], specific[e][rows]], dim=1)),
        )  # eq. 8
        tower_in = torch.cat([g_com, g_ind], dim=1)
        if self.interest:
            fields, item = self.inputs.interest_fields(parts["user"], parts["seq"], parts["shared"])

        def predict(entity: str, rows: Tensor) -> Tensor:
            logit = self.towers[entity](tower_in[rows]).squeeze(-1)
            if entity in self.wide:
                logit = logit + self.wide[entity](batch)[rows]
            if entity in self.interest:
                logit = logit + self.interest[entity](fields[rows], item[rows])
            return logit

        logit = by_entity(entity_index, self.entities, predict)
        out.update(logit=logit, g_com=g_com, g_ind=g_ind)
        return out

    def loss(self, batch: Batch, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Eq. 11 divided by the batch size: the BCE of every row (each by its own entity's
        tower) plus gamma times eq. 10, the cosine of each row's g_com and its entity's g_ind,
        averaged over the batch."""
        rows = batch["label"].shape[0]
        bce = F.binary_cross_entropy_with_logits(out["logit"], batch["label"], reduction="none")
        is_source = batch["entity_index"] == self.schema.source_index
        is_target = batch["entity_index"] == self.schema.target_index
        pdl = F.cosine_similarity(out["g_com"], out["g_ind"], dim=1).mean()  # eqs. 9-10
        total = bce.sum() / rows + self.params["gamma"] * pdl
        return {
            "loss": total,
            "bce_source": (bce * is_source).sum().detach() / rows,
            "bce_target": (bce * is_target).sum().detach() / rows,
            "pdl": pdl.detach(),
        }

    def target_path(self, with_logit: bool = False) -> MEMTargetPath:
        """The modules the target entity's knowledge needs, sharing this MEM's parameters;
        `with_logit` adds those of its target prediction (the TKE and the target tower)."""
        return MEMTargetPath(self, with_logit)


class MEMTargetPath(nn.Module):
    """MEM restricted to the target entity (the grey MEM part of the paper's Figure 2):
    embeddings of user, shared and target-specific features, the sequence attention, the
    target HFA and the CKE with the target gate; no source-specific table, HFA, gate or SKE,
    and the TKE and target tower only `with_logit`. Returns the knowledge TEM plugs in: (v_u,
    v_seq, v_shared, g_com^t); `knowledge_and_logit` adds the MEM's target logit."""

    def __init__(self, mem: MEM, with_logit: bool = False) -> None:
        super().__init__()
        schema = mem.schema
        target = schema.target_entity
        self.inputs = EntityInputs(
            schema,
            mem.inputs.dim,
            embeddings=mem.inputs.embeddings.subset(entity_feature_names(schema, target)),
            attention=mem.inputs.attention,
            entities=[target],
        )
        self.target = target
        self.hfa = mem.hfa[target] if mem.params["hfa"] else None
        self.spec_widths = dict(mem.spec_widths)
        self.cke = mem.cke.select_gates([schema.target_index])
        self.extractor = mem.extractors[target] if with_logit else None
        self.tower = mem.towers[target] if with_logit else None
        self.wide = mem.wide[target] if with_logit and target in mem.wide else None
        self.interest = mem.interest[target] if with_logit and target in mem.interest else None
        # Every row of a target path is the target's: its own user rows read on all of them.
        self.entity_user = (
            mem.entity_user[target].subset(self.inputs.user_names)
            if target in mem.entity_user
            else None
        )
        self.out_dims = {
            "user": self.inputs.dim * len(self.inputs.user_names),
            "seq": self.inputs.dim * len(self.inputs.seq_names),
            "shared": self.inputs.dim * len(self.inputs.shared_names),
            "cross": self.cke.out_dim,
        }

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        user, seq, shared, g_com, _ = self.knowledge_and_logit(batch, with_logit=False)
        return user, seq, shared, g_com

    def knowledge_and_logit(
        self, batch: Batch, with_logit: bool = True
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """(v_u, v_seq, v_shared, g_com^t, the MEM's target logit [B] or None)."""
        parts = self.inputs(batch)
        user, seq, shared = parts["user"], parts["seq"], parts["shared"]
        if self.entity_user is not None:
            user = user + self.entity_user(batch, self.inputs.user_names).flatten(1)
        common = torch.cat([user, seq, shared], dim=1)
        specific = parts["specific"][self.target]
        if self.hfa is not None:
            q, _ = self.hfa(common, specific)
        else:
            q = unaligned_q(common, {self.target: specific}, self.spec_widths)
        g_com = self.cke(q, torch.zeros_like(batch["entity_index"]))
        logit = None
        if with_logit:
            if self.extractor is None or self.tower is None:
                raise ValueError("MEMTargetPath: built without with_logit, it has no target tower")
            g_ind = self.extractor(torch.cat([common, specific], dim=1))  # eq. 8, TKE
            logit = self.tower(torch.cat([g_com, g_ind], dim=1)).squeeze(-1)
            if self.wide is not None:
                logit = logit + self.wide(batch)
            if self.interest is not None:
                logit = logit + self.interest(*self.inputs.interest_fields(user, seq, shared))
        return user, seq, shared, g_com, logit


def entity_feature_names(schema: FeatureSchema, entity: str) -> list[str]:
    """The non-sequence features a row of `entity` reads: user, shared, its own specific."""
    features = [*schema.user_features, *schema.shared_features, *schema.specific_features(entity)]
    return [f.name for f in features]


def check_params(model: str, p: dict[str, Any], positive: list[str], nonempty: list[str]) -> None:
    for key in positive:
        if p[key] < 1:
            raise ConfigError(f"{model}.{key}: must be >= 1, got {p[key]}")
    for key in nonempty:
        if not p[key] or any(int(h) < 1 for h in p[key]):
            raise ConfigError(f"{model}.{key}: must be a non-empty list of positive sizes")
    if not 0.0 <= p["dropout"] < 1.0:
        raise ConfigError(f"{model}.dropout: must be in [0, 1), got {p['dropout']}")
