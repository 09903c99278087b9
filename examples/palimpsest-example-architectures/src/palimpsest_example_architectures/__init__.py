"""Example Palimpsest architecture plugins.

Each callable takes `(n_inputs, n_classes, params)` and returns a `torch.nn.Module`
mapping preprocessed inputs `(N, n_inputs)` float32 to logits: `(N, 1)` for two classes,
`(N, n_classes)` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _outputs(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


class ResidualMLP(nn.Module):
    """input_layer -> `blocks` residual ReLU blocks -> head."""

    def __init__(self, n_inputs: int, n_classes: int, width: int, blocks: int) -> None:
        super().__init__()
        # Named `input_layer`: Palimpsest's feature removal zeroes and freezes its columns.
        self.input_layer = nn.Linear(n_inputs, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, _outputs(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.input_layer(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.head(h)


def residual_mlp(n_inputs: int, n_classes: int, params: dict[str, Any]) -> nn.Module:
    unknown = set(params) - {"width", "blocks"}
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; known: ['blocks', 'width']")
    width = int(params.get("width", 32))
    blocks = int(params.get("blocks", 2))
    if not 1 <= width <= 4096 or not 0 <= blocks <= 16:
        raise ValueError("width must lie in [1, 4096] and blocks in [0, 16]")
    return ResidualMLP(n_inputs, n_classes, width, blocks)


class Linear(nn.Module):
    # Declares the module to be exactly one linear layer named `linear`: Palimpsest may
    # then use certified removal (Guo et al. 2020) for it.
    palimpsest_linear = True

    def __init__(self, n_inputs: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_inputs, _outputs(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def linear(n_inputs: int, n_classes: int, params: dict[str, Any]) -> nn.Module:
    if params:
        raise ValueError(f"example-linear takes no parameters, got {sorted(params)}")
    return Linear(n_inputs, n_classes)


class Bilinear(nn.Module):
    """logits = head((U x) * (V x)): no layer whose columns are the inputs alone."""

    def __init__(self, n_inputs: int, n_classes: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Linear(n_inputs, rank)
        self.v = nn.Linear(n_inputs, rank)
        self.head = nn.Linear(rank, _outputs(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.u(x) * self.v(x))


def bilinear(n_inputs: int, n_classes: int, params: dict[str, Any]) -> nn.Module:
    return Bilinear(n_inputs, n_classes, int(params.get("rank", 8)))
