"""`din_source`: DIN (`mkt/models/din.py`) trained on the source entity's rows.

The pre-training stage of the Finetune and CTNet pipelines (docs/baselines.md). The network is
DIN's; only the rows it trains on differ, so it embeds the fields those rows carry: user,
shared and source-specific.
"""

from __future__ import annotations

from mkt.models.din import DIN
from mkt.registry import register


@register("din_source")
class SourceDIN(DIN):
    """DIN on the source entity's rows (its own specific fields); pre-training only."""

    train_entities = "source"
