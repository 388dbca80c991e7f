"""What every model in the zoo is: a `CTRModel` built from a feature schema and params.

A model maps a batch (see `mkt.features`) to one logit per row. Joint models route each row
by `batch["entity_index"]` to its entity's tower; single-entity models only ever see the rows
of the entity they are trained on (`train_entities`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from mkt.contract import ConfigError
from mkt.features import Batch
from mkt.layers.embedding import INIT_STD, EmbeddingBank
from mkt.layers.first_order import FirstOrder
from mkt.schema import FeatureSchema

# Parameters every model accepts, with these defaults unless its own `defaults` say otherwise
# (docs/training.md, "The training recipe", for how they were chosen).
COMMON_DEFAULTS: dict[str, Any] = {
    # Standard deviation of the normal the embedding tables start from.
    "embedding_init_std": INIT_STD,
}


class CTRModel(nn.Module):
    # Which rows a stage of this model trains on: "target", "source" or "both".
    train_entities: ClassVar[str] = "target"
    # Defaults of every accepted parameter; `build_model` rejects any other key.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.params = resolve_params(type(self), params or {})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Returns at least `logit`: `[B]`. Models may add tensors (e.g. for aux losses)."""
        raise NotImplementedError

    def loss(self, batch: Batch, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`loss` (what is minimised) plus named components for logging."""
        bce = F.binary_cross_entropy_with_logits(out["logit"], batch["label"])
        return {"loss": bce, "bce": bce.detach()}

    # -- the training recipe's hooks (docs/training.md) -----------------------------------
    def prior_logit(self, entity: str) -> float:
        """Log-odds of the entity's train like rate (0 where the schema does not say)."""
        rate = self.schema.like_rate(entity, "train")
        if rate is None or not 0.0 < rate < 1.0:
            return 0.0
        return math.log(rate / (1.0 - rate))

    def init_output_bias(self, layer: nn.Module, entity: str) -> None:
        """Start a logit layer (the last Linear of `layer`) at the entity's train like rate,
        so no epoch is spent learning the base rate."""
        linear = [m for m in layer.modules() if isinstance(m, nn.Linear)][-1]
        if linear.out_features != 1:
            raise ValueError(f"{type(self).__name__}: {linear} is not a 1-unit logit layer")
        with torch.no_grad():
            linear.bias.fill_(self.prior_logit(entity))

    def start_options(self) -> tuple[str, ...]:
        """The starts a stage built on trained models can take, each scored on validation
        before its first epoch (the best is trained on); the first is the model as built."""
        return ("as built",)

    def use_start(self, name: str) -> None:
        """Set the model to one of `start_options()` (a model with one start has nothing to
        set)."""
        if name not in self.start_options():
            raise ValueError(f"{type(self).__name__}: no start {name!r} in {self.start_options()}")

    def embedding_banks(self) -> list[EmbeddingBank]:
        """The banks with trainable tables (a frozen pretrained stage's are left out)."""
        return [
            m
            for m in self.modules()
            if isinstance(m, EmbeddingBank) and any(p.requires_grad for p in m.parameters())
        ]

    def use_item_attributes(self, maps: Mapping[str, torch.Tensor]) -> list[str]:
        """Item vectors with their attributes (`EmbeddingBank.use_item_attributes`) in every
        trainable bank, before training: a frozen pretrained model keeps the item vectors it
        was trained with, and a first-order term (one weight per value, as a logistic
        regression's) stays one weight per item. Returns the attributes taken."""
        first_order = {id(m.weights) for m in self.modules() if isinstance(m, FirstOrder)}
        taken: list[str] = []
        for bank in self.embedding_banks():
            if id(bank) not in first_order:
                taken += bank.use_item_attributes(maps)
        return sorted(set(taken))

    def embedding_tables(self) -> list[nn.Parameter]:
        """The trainable embedding tables: the parameters a row-wise optimiser takes."""
        tables = {id(t.weight): t.weight for b in self.embedding_banks() for t in b.tables.values()}
        return list(tables.values())

    def use_sparse_gradients(self, sparse: bool = True, min_rows: int = 0) -> None:
        """Switch the trainable embedding tables of at least `min_rows` rows to sparse
        gradients (or every table back to dense)."""
        for bank in self.embedding_banks():
            bank.use_sparse_gradients(sparse, min_rows)

    def count_embedding_rows(self, batches: Iterable[Batch]) -> list[torch.Tensor]:
        """The counting pass of `embedding_l2` over an epoch's batches; returns the count
        tensors (to be summed across data-parallel workers, in this order)."""
        banks = self.embedding_banks()
        device = next(self.parameters()).device
        for bank in banks:
            bank.reset_touch_counts(device)
        for batch in batches:
            for bank in banks:
                bank.count_rows(batch)
        return [bank.touch_counts[name] for bank in banks for name in sorted(bank.touch_counts)]

    def embedding_l2(self, batch: Batch) -> torch.Tensor:
        """L2 of the trainable embedding rows `batch` touches (`EmbeddingBank.l2_penalty`)."""
        banks = self.embedding_banks()
        if not banks:
            return torch.zeros(())
        return torch.stack([bank.l2_penalty(batch) for bank in banks]).sum()


Scored = TypeVar("Scored")


def choose_start(
    model: CTRModel, validate: Callable[[], Scored], score: Callable[[Scored], float]
) -> tuple[str, dict[str, Scored]]:
    """Validate each of the model's starts, leave the model at the best-scoring one; returns
    its name and every start's validation (both runners' "epoch 0")."""
    results = {}
    for start in model.start_options():
        model.use_start(start)
        results[start] = validate()
    best = max(results, key=lambda name: score(results[name]))
    model.use_start(best)
    return best, results


def start_note(chosen: str, valid_auc: Mapping[str, float]) -> str:
    """What the log adds when a start was chosen among several ('' for one)."""
    if len(valid_auc) < 2:
        return ""
    each = ", ".join(f"{name} {value:.4f}" for name, value in valid_auc.items())
    return f" (start: {chosen}; valid auc of each start: {each})"


def resolve_params(cls: type[CTRModel], params: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {**COMMON_DEFAULTS, **cls.defaults}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown parameter(s) {unknown}; accepted: {sorted(defaults)}"
        )
    # Copies: a model's params must not alias the class's defaults (or another stage's params,
    # which a config dump would write as YAML anchors).
    resolved = copy.deepcopy(defaults)
    for key, value in params.items():
        default = defaults[key]
        if default is not None and value is not None and not _compatible(default, value):
            raise ConfigError(
                f"{cls.__name__}.{key}: expected {type(default).__name__}, got {value!r}"
            )
        resolved[key] = value
    return resolved


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))
