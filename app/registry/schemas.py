"""Model creation body and model/version views."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.schemas import BatchingIn

__all__ = ["BatchingIn"]


BUILTIN_KINDS = ("logreg", "mlp")


class ArchitectureIn(BaseModel):
    """A built-in network: "logreg" or "mlp" (the other kinds: `ExtendedArchitectureIn`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["logreg", "mlp"] = "logreg"
    # Hidden layer widths (MLP), each between 1 and 4096.
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [64], min_length=1, max_length=6
    )
    # Text, image and audio columns: column -> {"kind": ..., parameters} overriding the
    # default encoder of the column's kind (app.ml.encoders.DEFAULTS).
    encoders: dict[str, dict[str, Any]] | None = Field(default=None, max_length=64)

    def params(self) -> dict[str, Any]:
        return {}

    def stored(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden": list(self.hidden)}


class ExtendedArchitectureIn(BaseModel):
    """Beyond the built-ins (issue 14): "gbdt" or "random_forest" (scikit-learn tree
    ensembles as SISA shard models), or the name of an installed architecture plugin
    (entry point group `palimpsest.architectures`). The other keys are the kind's
    parameters (`params`), checked when the model is created."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(
        min_length=1,
        max_length=100,
        json_schema_extra={"not": {"enum": list(BUILTIN_KINDS)}},
    )

    @field_validator("kind")
    @classmethod
    def _not_builtin(cls, kind: str) -> str:
        if kind in BUILTIN_KINDS:
            raise ValueError(f"{kind!r} is a built-in architecture (its keys: kind, hidden)")
        return kind

    def params(self) -> dict[str, Any]:
        """The body as given, without `kind` (and `encoders`, which name column encoders)."""
        return {k: v for k, v in (self.model_extra or {}).items() if k != "encoders"}

    def stored(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}


AnyArchitectureIn = ArchitectureIn | ExtendedArchitectureIn


class TrainingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=256, ge=1, le=65536)
    lr: float = Field(default=0.01, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class UnlearningIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["sisa", "monolithic"] = "sisa"
    shards: int = Field(default=4, ge=1, le=128)
    slices: int = Field(default=4, ge=1, le=64)
    sharding: Literal["subject", "source", "random"] = "subject"
    aggregation: Literal["mean", "vote"] = "mean"
    certified: bool = False
    # SISA feature requests: `exact` retrains every shard without the column (a Celery
    # chord); `approximate` applies the monolithic method to each shard's model.
    feature_mode: Literal["exact", "approximate"] = "exact"
    # Monolithic models: the approximate strategy (app.ml.approximate registry) and
    # overrides of its hyper-parameters; default DEFAULT_STRATEGY with its defaults.
    strategy: str | None = Field(default=None, min_length=1, max_length=40)
    strategy_params: dict[str, Any] | None = None
    # Certified removal (Guo et al. 2020): the (epsilon, delta) certificate, the L2
    # strength (mean form) and the noise scale; defaults are the engine's.
    certified_epsilon: float | None = Field(default=None, gt=0, le=100)
    certified_delta: float | None = Field(default=None, gt=0, lt=1)
    certified_lambda: float | None = Field(default=None, gt=0, le=10)
    certified_sigma: float | None = Field(default=None, ge=0, le=1e6)


class VerificationIn(BaseModel):
    """Per-model thresholds (defaults come from settings)."""

    model_config = ConfigDict(extra="forbid")
    utility_max_drop: float | None = Field(default=None, ge=0, le=1)
    # Membership inference: the candidate's attack AUC on the forget set may exceed the
    # out-references' by at most this margin.
    forgetting_margin: float = Field(default=0.05, ge=0, le=0.5)
    # Fairness: a group whose accuracy or TPR drops by more than this (and significantly)
    # fails the check; groups smaller than min_group_size are not judged.
    fairness_max_drop: float = Field(default=0.05, ge=0, le=1)
    min_group_size: int = Field(default=30, ge=1, le=1_000_000)
    # Monolithic models: reference models trained on random halves for the forgetting check.
    reference_models: int = Field(default=2, ge=0, le=16)
    # Izzo et al.'s injection test for approximate strategies: reported always; gating
    # only when a maximum residual share (0..1) is set.
    injection_max_residual: float | None = Field(default=None, ge=0, le=10)
    # Promote only after an admin approves, even when every check passes.
    require_approval: bool = False
    # An approximate method whose forgetting check is inconclusive (the attack cannot
    # find the forget set even in the baseline) falls back to exact retraining unless
    # this is true: the model's owner accepts "not shown to remember" as enough.
    accept_inconclusive_forgetting: bool = False


class UnlearningPatch(BaseModel):
    """The parts of the unlearning block that may change after training: how later jobs
    unlearn. Mode, shards, slices, sharding, aggregation and the certified settings shaped
    the trained versions and stay as they were created (unknown keys are a 422)."""

    model_config = ConfigDict(extra="forbid")
    strategy: str | None = Field(default=None, min_length=1, max_length=40)
    strategy_params: dict[str, Any] | None = None
    feature_mode: Literal["exact", "approximate"] | None = None


class ModelPatch(BaseModel):
    """`PATCH /v1/models/{name}`: settings that may change after creation. Each block
    given replaces the model's (`unlearning`: only the keys given); none changes nothing."""

    model_config = ConfigDict(extra="forbid")
    batching: BatchingIn | None = None
    unlearning: UnlearningPatch | None = None


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    dataset_id: str = Field(min_length=1, max_length=64)
    architecture: AnyArchitectureIn = Field(default_factory=ArchitectureIn)
    training: TrainingIn = Field(default_factory=TrainingIn)
    unlearning: UnlearningIn = Field(default_factory=UnlearningIn)
    feature_columns: list[str] | None = None
    group_columns: list[str] | None = None
    test_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    verification: VerificationIn = Field(default_factory=VerificationIn)
    batching: BatchingIn = Field(default_factory=BatchingIn)


class ModelCreated(BaseModel):
    id: str
    name: str
    status: str
    job_id: str


class VersionOut(BaseModel):
    version: int
    status: str
    created_at: datetime
    created_by_job: str | None
    metrics: dict[str, Any]


class ModelOut(BaseModel):
    id: str
    name: str
    status: str
    production_version: int | None
    dataset_id: str
    config: dict[str, Any]
    versions: list[VersionOut]


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]] = Field(min_length=1, max_length=10000)


class Prediction(BaseModel):
    label: str
    score: float


class PredictOut(BaseModel):
    version: int
    predictions: list[Prediction]
