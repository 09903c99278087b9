"""A model's stored creation body, parsed once into typed configs.

`ModelSpec` travels whole through a job (training, unlearning, verification) instead of
being unpacked into keyword arguments, and `UnlearningConfig` replaces lookups such as
`config["unlearning"]["mode"]` across the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.ml.approximate import DEFAULT_STRATEGY
from app.ml.certified import CertifiedConfig
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig


def _opt_float(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    return None if value is None else float(value)


@dataclass(frozen=True)
class UnlearningConfig:
    """How a model forgets: the `unlearning` block of its creation body."""

    mode: str = "sisa"
    shards: int = 4
    slices: int = 4
    sharding: str = "subject"
    aggregation: str = "mean"
    certified: bool = False
    feature_mode: str = "exact"
    strategy: str | None = None
    strategy_params: dict[str, Any] | None = None
    certified_epsilon: float | None = None
    certified_delta: float | None = None
    certified_lambda: float | None = None
    certified_sigma: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnlearningConfig:
        return cls(
            mode=str(d.get("mode", "sisa")),
            shards=int(d.get("shards", 4)),
            slices=int(d.get("slices", 4)),
            sharding=str(d.get("sharding", "subject")),
            aggregation=str(d.get("aggregation", "mean")),
            certified=bool(d.get("certified")),
            feature_mode=str(d.get("feature_mode") or "exact"),
            strategy=d.get("strategy") or None,
            strategy_params=d.get("strategy_params"),
            certified_epsilon=_opt_float(d, "certified_epsilon"),
            certified_delta=_opt_float(d, "certified_delta"),
            certified_lambda=_opt_float(d, "certified_lambda"),
            certified_sigma=_opt_float(d, "certified_sigma"),
        )

    @property
    def is_sisa(self) -> bool:
        return self.mode != "monolithic"

    @property
    def strategy_name(self) -> str:
        return self.strategy or DEFAULT_STRATEGY

    @property
    def method(self) -> str:
        """The method an unlearning job of this model runs first."""
        if self.is_sisa:
            return "sisa"
        return "certified" if self.certified else self.strategy_name

    @property
    def exact_features(self) -> bool:
        """SISA feature requests retrain every shard without the column."""
        return self.is_sisa and self.feature_mode == "exact"

    def certified_config(self, sigma: float | None = None) -> CertifiedConfig:
        """The model's certificate. Without `certified_sigma` the noise scale is the
        default scaled to the training set (fixed when the model is first trained);
        `sigma` is the one its current state was trained with, which retrains keep."""
        base = CertifiedConfig()
        return CertifiedConfig(
            epsilon=self.certified_epsilon or base.epsilon,
            delta=self.certified_delta or base.delta,
            lam=self.certified_lambda or base.lam,
            sigma=sigma if self.certified_sigma is None else self.certified_sigma,
        )


@dataclass(frozen=True)
class VerificationConfig:
    """Per-model thresholds of the checks (None: the setting's default)."""

    utility_max_drop: float | None = None
    forgetting_margin: float = 0.05
    fairness_max_drop: float = 0.05
    min_group_size: int = 30
    reference_models: int = 2
    injection_max_residual: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerificationConfig:
        return cls(
            utility_max_drop=_opt_float(d, "utility_max_drop"),
            forgetting_margin=float(d.get("forgetting_margin", 0.05)),
            fairness_max_drop=float(d.get("fairness_max_drop", 0.05)),
            min_group_size=int(d.get("min_group_size", 30)),
            reference_models=int(d.get("reference_models", 2)),
            injection_max_residual=_opt_float(d, "injection_max_residual"),
        )


def seed_key(model_name: str) -> str:
    """The key a new model's seeds and checkpoint addresses derive from: its name (with
    the training seed beside it in every derivation), never an install-random id. Kept
    in each manifest (`model_key`), which later jobs read, so models trained before
    keep their id-based key and stay bit-exact."""
    return f"model:{model_name}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to train, unlearn and verify one model."""

    model_key: str  # the model's id: seeds and content addresses derive from it
    arch: ArchitectureConfig
    training: TrainingConfig
    sisa: SisaConfig
    feature_spec: FeatureSpec
    label_classes: tuple[str, ...]
    unlearning: UnlearningConfig
    verification: VerificationConfig
    group_columns: tuple[str, ...]
    test_fraction: float
    removed_features: tuple[tuple[str, str], ...]  # (feature, request id), oldest first

    @property
    def n_classes(self) -> int:
        return len(self.label_classes)

    @classmethod
    def of(cls, model_key: str, config: dict[str, Any]) -> ModelSpec:
        resolved = config["resolved"]
        return cls(
            model_key=model_key,
            arch=ArchitectureConfig.from_dict(config["architecture"]),
            training=TrainingConfig.from_dict(config["training"]),
            sisa=SisaConfig.from_dict(config["unlearning"]),
            feature_spec=FeatureSpec.from_dict(resolved["feature_spec"]),
            label_classes=tuple(str(c) for c in resolved["label_classes"]),
            unlearning=UnlearningConfig.from_dict(config["unlearning"]),
            verification=VerificationConfig.from_dict(config.get("verification") or {}),
            group_columns=tuple(config.get("group_columns") or ()),
            test_fraction=float(config.get("test_fraction", 0.2)),
            removed_features=tuple(
                (str(d["feature"]), str(d["request_id"]))
                for d in resolved.get("removed_features", [])
            ),
        )

    def removed_with(self, new: list[tuple[str, str]]) -> list[dict[str, str]]:
        """The model's removed features after this job adds `new` (feature, request)."""
        out = [{"feature": f, "request_id": r} for f, r in self.removed_features]
        have = {d["feature"] for d in out}
        out += [{"feature": f, "request_id": r} for f, r in new if f not in have]
        return out
