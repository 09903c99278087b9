"""Dataclass configs shared by the engine. Each is saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# The built-in networks; `kind` may also be "gbdt" / "random_forest" (app.ml.trees) or
# the name of an architecture plugin (app.ml.plugins), whose body is `params`.
ArchitectureKind = str
BUILTIN_NETWORKS: tuple[str, ...] = ("logreg", "mlp")
ShardingKind = Literal["subject", "source", "random"]
UnlearningMode = Literal["sisa", "monolithic"]
# How a SISA model reads `epochs` (app.ml.schedule): `per_stage` is the legacy meaning,
# `per_record` the meaning of every model created since issue 10.
EpochSchedule = Literal["per_stage", "per_record"]
SCHEDULES: tuple[EpochSchedule, ...] = ("per_stage", "per_record")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Which network maps preprocessed inputs to class logits."""

    kind: ArchitectureKind = "logreg"
    hidden: tuple[int, ...] = (64,)
    # Tree and plugin kinds: the architecture body without `kind` (built-ins: empty).
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def builtin(self) -> bool:
        return self.kind in BUILTIN_NETWORKS

    def to_dict(self) -> dict[str, Any]:
        # A built-in's dict (and so every checkpoint key hashed from it) is as it was.
        if self.builtin:
            return {"kind": self.kind, "hidden": list(self.hidden)}
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchitectureConfig:
        kind = str(d.get("kind", "logreg"))
        if kind in BUILTIN_NETWORKS:
            return cls(kind=kind, hidden=tuple(d.get("hidden", (64,))))
        params = {k: v for k, v in d.items() if k not in ("kind", "encoders")}
        return cls(kind=kind, params=params)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings.

    `epochs` is what `schedule` says (see app.ml.schedule): with `per_record` the passes
    over each record in every mode; with `per_stage` (legacy) the epochs of every SISA
    slice stage. A monolithic model (one slice) trains `epochs` epochs under either.
    A stored dict without `schedule` is legacy, and `to_dict` leaves `per_stage` out, so
    a legacy model's dict, and every checkpoint key hashed from it, is as it always was.
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.01
    weight_decay: float = 1e-4
    seed: int = 0
    schedule: EpochSchedule = "per_stage"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown epoch schedule {self.schedule!r}; known: {SCHEDULES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.schedule == "per_stage":
            del d["schedule"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingConfig:
        keys = ("epochs", "batch_size", "lr", "weight_decay", "seed", "schedule")
        return cls(**{k: d[k] for k in keys if k in d})


@dataclass(frozen=True)
class SisaConfig:
    """Shards x slices layout of a SISA ensemble."""

    shards: int = 4
    slices: int = 4
    sharding: ShardingKind = "subject"
    aggregation: Literal["mean", "vote"] = "mean"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SisaConfig:
        return cls(
            shards=int(d.get("shards", 4)),
            slices=int(d.get("slices", 4)),
            sharding=d.get("sharding", "subject"),
            aggregation=d.get("aggregation", "mean"),
        )


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns feed the model and how.

    `fixed_categories` pins a categorical vocabulary from the dataset schema instead of
    fitting it on a shard; `removed` lists features forgotten by feature requests: the
    preprocessor emits zeros for their inputs, so the model is structurally blind to them.
    """

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    fixed_categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    removed: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "fixed_categories": {k: list(v) for k, v in self.fixed_categories.items()},
            "removed": list(self.removed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(
            numeric=tuple(d.get("numeric", ())),
            categorical=tuple(d.get("categorical", ())),
            fixed_categories={k: tuple(v) for k, v in d.get("fixed_categories", {}).items()},
            removed=tuple(d.get("removed", ())),
        )
