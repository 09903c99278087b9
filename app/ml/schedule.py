"""How many epochs each SISA slice stage trains, and what that makes unlearning cost.

A shard with R slices trains R stages; stage i sees slices 0..i, so a record of slice j
is trained in stages j..R-1 and gets `sum(e[j:])` passes. Two schedules exist:

* `per_stage` (legacy, the meaning of `epochs` for models created before issue 10):
  every stage trains `epochs` epochs, so a record gets `epochs * (R + 1) / 2` passes on
  average, (R + 1) / 2 times what a monolithic model with the same body gives it.
* `per_record` (every model created since): `epochs` is the number of passes over each
  record, as for a monolithic model. Following Bourtoule et al. (2021, section V-B) each
  stage trains about 2E/(R+1) epochs, which makes the average passes per record E and
  the shard's sample-gradient work E times its size, exactly what a monolithic model of
  the same records does. The rule, with integers:

      b = floor(2E / (R + 1)) epochs for every stage;
      rem = E*R - b*R*(R+1)/2 slice-passes are still owed (0 <= rem < R*(R+1)/2);
      walking from the last stage to the first, stage i takes one extra epoch whenever
      rem >= i + 1 (an extra epoch on stage i costs i + 1 slice-passes), rem -= i + 1.

  The walk always ends with rem = 0, so sum((i+1) * e[i]) = E*R exactly: with equal
  slices the mean passes per record is exactly E. Each stage gets b or b + 1 epochs;
  the extras go to the late stages, which see the most data. Records of early slices
  get more passes than late ones (slice j gets sum(e[j:])), as in the paper; only the
  mean is E. When 2E < R + 1 some early stages train zero epochs (their checkpoint is
  the stage before's weights) and SISA degenerates towards one model per shard.

The schedule depends only on (E, R), never on slice sizes, so removing records never
changes it and unlearning stays bit-identical to retraining a shard from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.ml.config import TrainingConfig


def per_record_stage_epochs(epochs: int, slices: int) -> tuple[int, ...]:
    """Stage epochs whose mean passes per record is exactly `epochs` (rule above)."""
    if slices < 1:
        raise ValueError("SISA needs at least one slice")
    if epochs <= 0:
        return (0,) * slices
    base = (2 * epochs) // (slices + 1)
    rem = epochs * slices - base * slices * (slices + 1) // 2
    out = [base] * slices
    for i in reversed(range(slices)):
        if rem >= i + 1:
            out[i] += 1
            rem -= i + 1
    if rem:  # pragma: no cover - impossible by the invariant rem <= (i+1)(i+2)/2 - 1
        raise AssertionError("per-record schedule left passes unassigned")
    return tuple(out)


def stage_epochs(training: TrainingConfig, slices: int) -> tuple[int, ...]:
    """Epochs of each of the `slices` stages under the model's schedule."""
    if training.schedule == "per_record":
        return per_record_stage_epochs(training.epochs, slices)
    return (training.epochs,) * slices


def mean_passes_per_record(stages: Sequence[int]) -> float:
    """Passes over a record of a uniformly random slice (equal slices)."""
    r = len(stages)
    return sum((i + 1) * e for i, e in enumerate(stages)) / r if r else 0.0


def theoretical_speedup(stages: Sequence[int], shards: int) -> float:
    """Expected cost of retraining every record monolithically, over one-record SISA
    unlearning, cost counted in sample-gradient steps.

    S equal shards of R equal slices of m records; the monolithic model trains E = the
    mean passes per record (cost E*S*R*m). The removed record is in one shard, in slice
    k uniform on 0..R-1; unlearning redoes stages k..R-1, stage i costing (i+1)*m*e_i.
    Stage i is redone for i+1 of the R values of k, so the expected cost is
    (m/R) * sum((i+1)^2 e_i), and the speed-up is

        S * R * sum((i+1) e_i) / sum((i+1)^2 e_i)    (with sum((i+1) e_i) = E*R).

    With equal stage epochs (either schedule when 2E/(R+1) is whole) this is
    S * 3R / (2R + 1): 22.6x at S=16, R=8.
    """
    r = len(stages)
    work = sum((i + 1) * e for i, e in enumerate(stages))
    redo = sum((i + 1) ** 2 * e for i, e in enumerate(stages))
    if redo == 0:
        return float("inf")
    return shards * r * work / redo
