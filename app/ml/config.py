"""Dataclass configs shared by the engine. Each is saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from app.ml.encoders import EncoderSpec

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
    # Media columns' encoders (app.ml.encoders), resolved at model creation; the head
    # (`kind`, `hidden`) reads their concatenated outputs after the tabular inputs.
    encoders: tuple[EncoderSpec, ...] = ()
    # Tree and plugin kinds: the architecture body without `kind` (built-ins: empty).
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def builtin(self) -> bool:
        return self.kind in BUILTIN_NETWORKS

    def to_dict(self) -> dict[str, Any]:
        # A built-in tabular model's dict (and so every checkpoint key hashed from it) is
        # as it was; media encoders and a plugin's or tree's body are added to it.
        d: dict[str, Any] = (
            {"kind": self.kind, "hidden": list(self.hidden)}
            if self.builtin
            else {"kind": self.kind, **self.params}
        )
        if self.encoders:
            d["encoders"] = {e.column: _encoder_body(e) for e in self.encoders}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchitectureConfig:
        kind = str(d.get("kind", "logreg"))
        encoders = _encoders_of(d.get("encoders"))
        if kind in BUILTIN_NETWORKS:
            return cls(kind=kind, hidden=tuple(d.get("hidden", (64,))), encoders=encoders)
        params = {k: v for k, v in d.items() if k not in ("kind", "encoders")}
        return cls(kind=kind, params=params, encoders=encoders)


def _encoder_body(e: EncoderSpec) -> dict[str, Any]:
    body = e.to_dict()
    del body["column"]
    body.pop("blocked", None)  # a preprocessing matter (FeatureSpec), not the network's
    return body


def _encoders_of(raw: Any) -> tuple[EncoderSpec, ...]:
    """Resolved encoders: `{column: {"kind", ...}}` (an override map once resolved)."""
    if not raw:
        return ()
    return tuple(EncoderSpec.from_dict({"column": c, **body}) for c, body in raw.items())


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
    # Text, image and audio columns with their encoders (blocked tokens included).
    media: tuple[EncoderSpec, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return self.numeric + self.categorical + tuple(e.column for e in self.media)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "fixed_categories": {k: list(v) for k, v in self.fixed_categories.items()},
            "removed": list(self.removed),
        }
        if self.media:
            d["media"] = [e.to_dict() for e in self.media]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(
            numeric=tuple(d.get("numeric", ())),
            categorical=tuple(d.get("categorical", ())),
            fixed_categories={k: tuple(v) for k, v in d.get("fixed_categories", {}).items()},
            removed=tuple(d.get("removed", ())),
            media=tuple(EncoderSpec.from_dict(e) for e in d.get("media", ())),
        )
