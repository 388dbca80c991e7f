"""Fully connected stack: Linear -> activation -> dropout, per hidden layer."""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "prelu": nn.PReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


class MLP(nn.Module):
    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        dropout: float = 0.0,
        activation: str = "relu",
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP.activation: {activation!r} is not one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for i, (a, b) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(hidden) - 1 or last_activation:
                layers.append(ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
