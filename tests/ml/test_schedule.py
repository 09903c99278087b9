"""Stage epochs of a SISA shard: per-record passes exact, legacy configs unchanged."""

from __future__ import annotations

import pytest

from app.ml.config import TrainingConfig
from app.ml.schedule import (
    mean_passes_per_record,
    per_record_stage_epochs,
    stage_epochs,
    theoretical_speedup,
)


@pytest.mark.parametrize("slices", [1, 2, 3, 4, 5, 8, 16, 64])
@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 10, 20, 45, 1000])
def test_per_record_schedule_gives_exactly_e_passes_on_average(epochs: int, slices: int) -> None:
    stages = per_record_stage_epochs(epochs, slices)
    assert len(stages) == slices
    assert sum((i + 1) * e for i, e in enumerate(stages)) == epochs * slices
    assert mean_passes_per_record(stages) == epochs
    base = (2 * epochs) // (slices + 1)
    assert set(stages) <= {base, base + 1}


def test_known_schedules() -> None:
    assert per_record_stage_epochs(45, 8) == (10,) * 8  # 2E/(R+1) whole: equal stages
    assert per_record_stage_epochs(20, 8) == (5, 4, 4, 4, 4, 4, 5, 5)
    assert per_record_stage_epochs(3, 4) == (1, 2, 1, 1)
    assert per_record_stage_epochs(1, 8) == (0,) * 7 + (1,)
    assert per_record_stage_epochs(9, 1) == (9,)


def test_legacy_config_trains_every_stage_for_epochs() -> None:
    legacy = TrainingConfig.from_dict({"epochs": 20, "batch_size": 64, "seed": 3})
    assert legacy.schedule == "per_stage"
    assert stage_epochs(legacy, 8) == (20,) * 8
    # Its dict (hashed into every checkpoint key) is what it was before schedules existed.
    assert legacy.to_dict() == {
        "epochs": 20,
        "batch_size": 64,
        "lr": 0.01,
        "weight_decay": 1e-4,
        "seed": 3,
    }
    new = TrainingConfig.from_dict({**legacy.to_dict(), "schedule": "per_record"})
    assert stage_epochs(new, 8) == (5, 4, 4, 4, 4, 4, 5, 5)
    assert new.to_dict()["schedule"] == "per_record"
    assert TrainingConfig.from_dict(new.to_dict()) == new
    assert TrainingConfig.from_dict({"epochs": 2, "schedule": "per_stage"}).to_dict() == (
        TrainingConfig(epochs=2).to_dict()
    )
    with pytest.raises(ValueError):
        TrainingConfig.from_dict({"epochs": 2, "schedule": "per_epoch"})
    # One slice (monolithic models, reference models): both schedules train E epochs.
    assert stage_epochs(new, 1) == stage_epochs(legacy, 1) == (20,)


def test_theoretical_speedup() -> None:
    # Equal stage epochs: S * 3R / (2R + 1), whatever the epochs.
    assert theoretical_speedup((10,) * 8, 16) == pytest.approx(16 * 24 / 17)
    assert theoretical_speedup((3,) * 4, 4) == pytest.approx(4 * 12 / 9)
    assert theoretical_speedup((7,), 5) == pytest.approx(5.0)
    # By hand for (1, 2, 1, 1): work 1+4+3+4 = 12 slice-passes; redone from slice k
    # (k uniform): 12, 11, 7, 4, mean 8.5; S=2 -> 2 * 12 / 8.5.
    assert theoretical_speedup((1, 2, 1, 1), 2) == pytest.approx(2 * 12 / 8.5)
