"""Networks over preprocessed tabular inputs.

Binary tasks use a single logit (class 1 vs class 0), which is what certified removal
(Guo et al. 2020) is stated for; multi-class tasks use one logit per class.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from app.ml.config import ArchitectureConfig
from app.ml.plugins import build_plugin
from app.ml.trees import TreeEnsemble, is_tree


def n_outputs(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


class LogisticRegression(nn.Module):
    """One linear layer: x (N, d) -> logits (N, 1 | C)."""

    def __init__(self, n_inputs: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_inputs, n_outputs(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]


class MLP(nn.Module):
    """ReLU multi-layer perceptron: x (N, d) -> hidden... -> logits (N, 1 | C).

    The first layer is `self.input_layer` so feature removal can zero and freeze the
    columns that belong to one input feature.
    """

    def __init__(self, n_inputs: int, n_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        self.input_layer = nn.Linear(n_inputs, hidden[0])
        layers: list[nn.Module] = [nn.ReLU()]
        for a, b in itertools.pairwise(hidden):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(hidden[-1], n_outputs(n_classes)))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(x))  # type: ignore[no-any-return]


def build_model(arch: ArchitectureConfig, n_inputs: int, n_classes: int) -> nn.Module:
    if n_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    if arch.encoders:  # media columns: encoders, then this head over their outputs
        from app.ml.encoders import MediaModel

        head = ArchitectureConfig(kind=arch.kind, hidden=arch.hidden, params=arch.params)
        return MediaModel(n_inputs, arch.encoders, lambda d: build_model(head, d, n_classes))
    if arch.kind == "logreg":
        return LogisticRegression(n_inputs, n_classes)
    if arch.kind == "mlp":
        return MLP(n_inputs, n_classes, arch.hidden)
    if is_tree(arch.kind):
        return TreeEnsemble(arch.kind, n_inputs, n_classes, arch.params)
    # Anything else names an architecture plugin (PluginError when it does not work).
    return build_plugin(arch.kind, n_inputs, n_classes, arch.params)


def input_layer(model: nn.Module) -> nn.Linear:
    """The layer whose weight columns correspond one-to-one to preprocessed inputs."""
    if isinstance(model, LogisticRegression):
        return model.linear
    if isinstance(model, MLP):
        return model.input_layer
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and hasattr(model, "head_columns"):  # MediaModel
        return input_layer(head)
    layer = getattr(model, "input_layer", None)  # a plugin that exposes one
    if isinstance(layer, nn.Linear):
        return layer
    raise TypeError(f"no input layer known for {type(model).__name__}")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, 1 | C) -> class probabilities (N, C)."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1.0 - p1, p1], dim=1)
    return torch.softmax(logits, dim=1)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; labels are class indices (N,)."""
    if logits.shape[1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
    return nn.functional.cross_entropy(logits, labels)
