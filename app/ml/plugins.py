"""Architecture plugins: networks defined outside Palimpsest.

`architecture.kind` may name a Python entry point in group `palimpsest.architectures`
(see ../shared/API.md). Its object is a callable `(n_inputs, n_classes, params) ->
torch.nn.Module` mapping preprocessed inputs `(N, n_inputs)` float32 to logits `(N, 1)`
for two classes or `(N, C)`; `params` is the architecture body without `kind`.

Everything Palimpsest does with a plugin goes through that interface and two optional
declarations on the returned module (or on the callable):

- `palimpsest_linear = True`: the module is exactly one `nn.Linear` named `linear`
  (state keys `linear.weight`, `linear.bias`), so certified removal (Guo et al.) may
  train and serve it; checked when the model is created.
- `input_layer`: an `nn.Linear` whose weight columns are the preprocessed inputs, so
  feature removal can zero and freeze a feature's columns. Without it a feature request
  on a monolithic model falls back to retraining without the column.

A plugin must be deterministic given the parameters `init_model_` sets (it may not draw
from the global RNG in `forward`), which is all SISA's bit-exactness needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

ENTRY_POINT_GROUP = "palimpsest.architectures"

Factory = Callable[[int, int, dict[str, Any]], nn.Module]


class PluginError(ValueError):
    """An architecture plugin is not installed, does not load, or breaks its contract."""


@functools.cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed() -> list[str]:
    """Names of the installed architecture plugins."""
    return sorted(_entry_points())


def refresh() -> None:
    """Forget the cached entry points (a package was installed while running)."""
    _entry_points.cache_clear()
    load_factory.cache_clear()


@functools.cache
def load_factory(kind: str) -> Factory:
    ep = _entry_points().get(kind)
    if ep is None:
        raise PluginError(
            f"no architecture plugin named {kind!r} (entry point group "
            f"{ENTRY_POINT_GROUP!r}); installed: {installed()}"
        )
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginError(
            f"architecture plugin {kind!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise PluginError(f"architecture plugin {kind!r} ({ep.value}) is not callable")
    factory: Factory = obj
    return factory


def build_plugin(kind: str, n_inputs: int, n_classes: int, params: dict[str, Any]) -> nn.Module:
    factory = load_factory(kind)
    try:
        module = factory(n_inputs, n_classes, dict(params))
    except Exception as exc:
        raise PluginError(
            f"architecture plugin {kind!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"architecture plugin {kind!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    if getattr(factory, "palimpsest_linear", False) and not hasattr(module, "palimpsest_linear"):
        setattr(module, "palimpsest_linear", True)  # noqa: B010  (nn.Module typing)
    return module


def declares_linear(module: nn.Module) -> bool:
    return bool(getattr(module, "palimpsest_linear", False))


@dataclass(frozen=True)
class PluginCapabilities:
    """What a plugin's module offers beyond forward (checked on a sample module)."""

    kind: str
    linear: bool
    input_layer: bool
    n_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "linear": self.linear,
            "input_layer": self.input_layer,
            "n_parameters": self.n_parameters,
        }


def check_plugin(
    kind: str, n_inputs: int, n_classes: int, params: dict[str, Any]
) -> PluginCapabilities:
    """Build a sample module and run it on zeros: PluginError naming the plugin and
    what is wrong (not installed, does not load, raises, wrong output shape or dtype)."""
    module = build_plugin(kind, n_inputs, n_classes, params)
    n_out = 1 if n_classes == 2 else n_classes
    n_params = sum(p.numel() for p in module.parameters())
    if n_params == 0:
        raise PluginError(f"architecture plugin {kind!r} returned a module without parameters")
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros((3, n_inputs), dtype=torch.float32))
    except Exception as exc:
        raise PluginError(
            f"architecture plugin {kind!r} failed on inputs of shape (3, {n_inputs}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, n_out):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(
            f"architecture plugin {kind!r} must map (N, {n_inputs}) to logits (N, {n_out}) "
            f"for {n_classes} classes; it returned {shape}"
        )
    if out.dtype != torch.float32:
        raise PluginError(f"architecture plugin {kind!r} returned {out.dtype} logits, not float32")
    linear = declares_linear(module)
    if linear:
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        want = {"linear.weight": (n_out, n_inputs), "linear.bias": (n_out,)}
        if shapes != want:
            raise PluginError(
                f"architecture plugin {kind!r} declares itself linear, so its state must be "
                f"exactly {want}; it is {shapes}"
            )
    layer = getattr(module, "input_layer", None)
    has_input = isinstance(layer, nn.Linear) and layer.in_features == n_inputs
    return PluginCapabilities(kind, linear, has_input, n_params)
