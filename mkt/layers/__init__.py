"""Small reusable modules the models are built from (one module per file)."""

from mkt.layers.attention import TargetAttention
from mkt.layers.cross import CrossNetwork
from mkt.layers.embedding import EmbeddingBank
from mkt.layers.first_order import FirstOrder
from mkt.layers.gate import GLUGate
from mkt.layers.inputs import EntityInputs
from mkt.layers.interest import InterestTerm
from mkt.layers.mlp import MLP
from mkt.layers.mmoe import MMoE

__all__ = [
    "MLP",
    "CrossNetwork",
    "EmbeddingBank",
    "EntityInputs",
    "FirstOrder",
    "GLUGate",
    "InterestTerm",
    "MMoE",
    "TargetAttention",
]
