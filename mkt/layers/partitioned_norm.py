"""Partitioned normalisation of STAR (Sheng et al., 2021).

z' = (γ · γ_p) (z − μ_p) / sqrt(σ²_p + ε) + (β + β_p): a shared and a per-domain scale and
bias, and statistics per domain p. In training μ_p, σ²_p come from the rows of domain p in
the batch (so a row's output never depends on another domain's rows); in evaluation from
domain p's moving averages. Written with one-hot sums rather than a loop over domains, so a
batch that lacks a domain needs no special case and no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PartitionedNorm(nn.Module):
    def __init__(
        self, dim: int, num_domains: int, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.momentum = momentum
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.domain_gamma = nn.Parameter(torch.ones(num_domains, dim))
        self.domain_beta = nn.Parameter(torch.zeros(num_domains, dim))
        self.register_buffer("running_mean", torch.zeros(num_domains, dim))
        self.register_buffer("running_var", torch.ones(num_domains, dim))

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        """`x` `[B, dim]`, `domain` `[B]` (index of each row's domain) -> `[B, dim]`."""
        if self.training:
            onehot = F.one_hot(domain, self.num_domains).to(x.dtype)  # [B, D]
            count = onehot.sum(0).unsqueeze(1)  # [D, 1]
            mean = onehot.T @ x / count.clamp_min(1.0)
            var = onehot.T @ (x - mean[domain]).square() / count.clamp_min(1.0)
            with torch.no_grad():
                # Moving averages only for the domains present; unbiased variance as BatchNorm.
                seen = count > 0
                unbiased = var * count / (count - 1).clamp_min(1.0)
                m = self.momentum
                self.running_mean.copy_(
                    torch.where(seen, (1 - m) * self.running_mean + m * mean, self.running_mean)
                )
                self.running_var.copy_(
                    torch.where(seen, (1 - m) * self.running_var + m * unbiased, self.running_var)
                )
        else:
            mean, var = self.running_mean, self.running_var
        normed = (x - mean[domain]) * torch.rsqrt(var[domain] + self.eps)
        return normed * (self.gamma * self.domain_gamma[domain]) + (
            self.beta + self.domain_beta[domain]
        )
