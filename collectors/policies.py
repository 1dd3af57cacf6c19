"""Small building blocks for policies (used by the examples and the benchmark)."""
from __future__ import annotations

import torch
from torch import nn


class ArgmaxLayer(nn.Module):
    """Logits -> int64 index, so an ``nn.Module`` can drive a ``Discrete`` action space."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class Scale(nn.Module):
    """Multiply by a constant (e.g. tanh output to a Box's bound)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def mlp(in_dim: int, out_dim: int, hidden: int = 64, depth: int = 2) -> nn.Sequential:
    """``in -> hidden -> ... -> out`` with Tanh activations."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, hidden), nn.Tanh()]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)
