"""Checks at model creation for tree ensembles and architecture plugins.

A kind that does not work must be a 422 naming it and the error when the model is
created, never a failed training job later: a plugin is loaded, built and run on a
sample batch here; a tree kind's parameters are checked by fitting it on a toy problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.core.errors import Unprocessable
from app.ml.config import BUILTIN_NETWORKS
from app.ml.plugins import PluginCapabilities, PluginError, check_plugin
from app.ml.trees import is_tree, validate
from app.registry.schemas import ModelCreate


@dataclass(frozen=True)
class ArchitectureCheck:
    """The architecture body to store, and what the kind supports."""

    stored: dict[str, Any] | None  # None: a built-in, stored as the body dumps
    linear: bool  # certified removal may apply
    tree: bool
    plugin: PluginCapabilities | None = None


def _sample_inputs(schema: dict[str, Any], features: list[str]) -> int:
    """A plausible preprocessed width (one-hot widths are fitted per shard; a plugin must
    accept any width anyway)."""
    numeric = [f for f in features if f in schema.get("numeric_columns", [])]
    return max(1, len(numeric) + 2 * (len(features) - len(numeric)))


def check(body: ModelCreate, schema: dict[str, Any], features: list[str]) -> ArchitectureCheck:
    arch = body.architecture
    kind = arch.kind
    if kind in BUILTIN_NETWORKS:
        return ArchitectureCheck(None, kind == "logreg", False)
    params = arch.params()
    n_classes = len(schema["label_classes"])
    u = body.unlearning
    if is_tree(kind):
        if u.certified:
            raise Unprocessable(
                f"certified removal does not apply to {kind} tree models", code="invalid_config"
            )
        if "slices" in u.model_fields_set and u.slices != 1:
            raise Unprocessable(
                f"slices do not apply to {kind} tree models: a tree is fitted whole, so each "
                "shard has one slice and is refitted exactly on its retained records "
                "(leave `slices` out or set it to 1)",
                code="slices_not_applicable",
            )
        if u.strategy is not None or u.strategy_params is not None:
            raise Unprocessable(
                f"approximate strategies do not apply to {kind} tree models: a monolithic "
                "tree model retrains on the retained records",
                code="strategy_not_applicable",
            )
        u.slices = 1
        try:
            validate(kind, params)
        except (ValueError, TypeError) as exc:
            raise Unprocessable(
                f"invalid {kind} parameters: {exc}", code="invalid_architecture"
            ) from exc
        return ArchitectureCheck({"kind": kind, **params}, False, True)
    try:
        caps = check_plugin(kind, _sample_inputs(schema, features), n_classes, params)
    except PluginError as exc:
        raise Unprocessable(str(exc), code="architecture_plugin") from exc
    return ArchitectureCheck({"kind": kind, **params}, caps.linear, False, caps)


def check_plugin_kind(
    kind: str, n_inputs: int, n_classes: int, params: dict[str, Any]
) -> PluginCapabilities:
    """A plugin at a known input width (an imported model's): PluginError if it fails."""
    return check_plugin(kind, n_inputs, n_classes, params)
