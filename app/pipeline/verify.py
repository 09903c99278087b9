"""Verification of a candidate: every check that applies, timed, then the conclusion.

Lineage for exact methods that dropped records; utility, fairness and (with records
forgotten) forgetting always; the injection test for approximate strategies; the flip
test for each feature removed by the job.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from app.core.db import session_scope
from app.core.settings import get_settings
from app.jobs import lease
from app.jobs import service as jobs
from app.ml.data import TabularData
from app.ml.preprocess import PreprocessorState
from app.ml.sisa import SisaEnsemble, SisaManifest
from app.pipeline.conclude import Candidate, conclude
from app.pipeline.inputs import JobInputs
from app.pipeline.outcome import RequestEvents
from app.pipeline.outputs import (
    ShardOutputs,
    SharedEnsemble,
    load_ensemble,
    load_kept_outputs,
    load_sharing,
    save_kept_outputs,
)
from app.pipeline.start import device
from app.pipeline.training import version_metrics
from app.registry import artifacts, references
from app.verification import media as media_checks
from app.verification import service as verification
from app.verification.fairness import fairness
from app.verification.forgetting import attack_rows, forgetting
from app.verification.injection import injection


def verify_candidate(
    inputs: JobInputs,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    events: RequestEvents,
    *,
    forgotten: np.ndarray,
    features: list[str],
    removed_features: list[dict[str, str]],
    allow_retrain: bool,
    n_retained: int,
    compute: float,
) -> None:
    """Save the candidate, run every check that applies to it, and conclude the job."""
    store = inputs.store
    dev = device()
    ckpt = artifacts.checkpoint_store(store, inputs.model_id)
    exact = not result["approximate"]
    lease.check(inputs.job_id)  # a taken-over execution writes no candidate
    rel = artifacts.save_manifest(store, inputs.model_id, inputs.new_version, new_manifest)
    jobs.ProgressReporter(inputs.job_id)(0.85)
    with session_scope() as s:
        jobs.claim(s, inputs.job_id, inputs.attempt)
        events.verifying(s, inputs.job_id)
    t0 = time.perf_counter()
    test = inputs.test()
    forget = inputs.forget(forgotten) if len(forgotten) else None
    outputs = ShardOutputs()
    loaded = load_ensemble(inputs.manifest, ckpt, dev)
    baseline = SharedEnsemble.of(loaded, outputs)
    candidate = SharedEnsemble.of(load_sharing(new_manifest, loaded, ckpt, dev), outputs)
    # Retained rows scored beside the forget set (a fixed sample: see `members`).
    members = inputs.members() if forget is not None and len(forget) else None
    # The production version's shard outputs on these very test rows and member rows,
    # kept from when it was promoted: the candidate's unchanged shards and the baseline
    # are not run on them again.
    row_sets = [inputs.test_ids] + ([members.record_ids] if members is not None else [])
    saved, *saved_members = load_kept_outputs(store, inputs.model_id, row_sets)
    seed = inputs.verify_seed("forgetting") % (2**31)
    # The attack's sample of the test rows, drawn as the check draws it, so that the
    # saved outputs serve it too.
    cap = attack_rows(len(test), forget, seed) if forget is not None else None
    attack_test = test if cap is None else test.take(cap)
    if cap is not None:
        outputs.view(attack_test.columns, test.columns, cap)
    if saved:
        outputs.preload(test.columns, saved)
    if members is not None and saved_members and saved_members[0]:
        outputs.preload(members.columns, saved_members[0])
    inputs.phases.add("verify.load", time.perf_counter() - t0)
    checks: dict[str, verification.Check] = {}
    timed = inputs.phases.timed
    if exact and len(forgotten):
        # Manifests prove exclusion only for exact methods; approximate ones rely on
        # the other checks.
        with timed("verify.lineage"):
            checks["lineage"] = verification.lineage_check(new_manifest, forgotten)
    checks |= quality_checks(
        inputs,
        candidate,
        baseline,
        test,
        forget,
        dev,
        exact=exact,
        retained=members,
        attack_test=attack_test,
        seed=seed,
    )
    if not exact and forget is not None and not inputs.spec.unlearning.certified:
        # Izzo et al.'s injection test of the strategy itself, on a sample of this job.
        with timed("verify.injection"):
            u = inputs.spec.unlearning
            checks["injection"] = injection(
                inputs.spec.arch,
                inputs.spec.training,
                inputs.spec.n_classes,
                PreprocessorState.from_dict(new_manifest.entries[0].preprocessor),
                inputs.retained(),
                forget,
                # What the job ran (strategy "auto" chose it).
                strategy=str((result.get("strategy") or {}).get("strategy") or u.strategy_name),
                params=(result.get("strategy") or {}).get("params", u.strategy_params),
                device=dev,
                seed=inputs.verify_seed("injection") % (2**31),
                max_residual=inputs.spec.verification.injection_max_residual,
            )
    media_columns = {e.column for e in new_manifest.feature_spec.media}
    words: dict[str, list[str]] = result.get("tokens") or {}
    for feature in features:
        with timed("verify.feature"):
            if feature in words:  # words forgotten from a text column
                checks["feature"] = media_checks.token_check(
                    candidate, baseline, test, feature, words[feature]
                )
            elif feature in media_columns:  # a whole text, image or audio column
                checks["feature"] = media_checks.media_column_check(
                    candidate, baseline, test, feature
                )
            else:
                checks["feature"] = verification.feature_check(candidate, baseline, test, feature)
    result["verification_cache"] = {
        "shard_outputs_computed": outputs.misses,
        "reused": outputs.hits,
        "kept_from_production": outputs.preloaded,
    }
    decision = conclude(
        inputs,
        Candidate(
            manifest=new_manifest,
            rel=rel,
            checks=checks,
            metrics=version_metrics(candidate, test, n_retained, checks),
            result=result,
            forgotten=forgotten,
            removed_features=removed_features,
            allow_retrain=allow_retrain,
            device=str(dev),
            compute_seconds=compute,
        ),
        events,
    )
    if decision == "promote":
        keys = list(candidate.keys.values())
        parts = [(inputs.test_ids, outputs.of(test.columns, keys))]
        if members is not None:
            parts.append((members.record_ids, outputs.of(members.columns, keys)))
        save_kept_outputs(store, inputs.model_id, new_manifest, parts)


def verify_unlearning(
    inputs: JobInputs,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    events: RequestEvents,
    n_retained: int,
    compute: float,
) -> None:
    """An unlearning job's candidate: it forgot the job's quarantined records."""
    verify_candidate(
        inputs,
        new_manifest,
        result,
        events,
        forgotten=inputs.forgotten,
        features=[],
        removed_features=inputs.spec.removed_with([]),
        allow_retrain=True,
        n_retained=n_retained,
        compute=compute,
    )


def verify_feature(
    inputs: JobInputs,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    events: RequestEvents,
    n_retained: int,
    compute: float,
) -> None:
    """A feature job's candidate: no record forgotten, the feature must be gone."""
    verify_candidate(
        inputs,
        new_manifest,
        result,
        events,
        forgotten=np.zeros(0, dtype=np.int64),
        features=[str(result["feature"])],
        # Words forgotten from a text column leave the column a feature.
        removed_features=inputs.spec.removed_with(
            [(f, r) for f, r in inputs.features if f not in (result.get("tokens") or {})]
        ),
        allow_retrain=True,
        n_retained=n_retained,
        compute=compute,
    )


def _max_drop(inputs: JobInputs) -> float:
    # An explicit 0 means "no drop at all", not "use the default".
    value = inputs.spec.verification.utility_max_drop
    return float(get_settings().utility_max_drop if value is None else value)


def quality_checks(
    inputs: JobInputs,
    candidate: SisaEnsemble,
    baseline: SisaEnsemble,
    test: TabularData,
    forget: TabularData | None,
    dev: torch.device,
    *,
    exact: bool = True,
    retained: TabularData | None = None,
    attack_test: TabularData | None = None,
    seed: int | None = None,
) -> dict[str, verification.Check]:
    """Utility and fairness always; forgetting when records were forgotten, calibrated by
    out-references (a SISA model's own shards; a monolithic model's half-data models)."""
    v = inputs.spec.verification
    timed = inputs.phases.timed
    checks: dict[str, verification.Check] = {}
    with timed("verify.utility"):
        checks["utility"] = verification.utility_check(candidate, baseline, test, _max_drop(inputs))
    with timed("verify.fairness"):
        checks["fairness"] = fairness(
            candidate,
            baseline,
            test,
            list(inputs.spec.group_columns),
            threshold=v.fairness_max_drop,
            min_group_size=v.min_group_size,
        )
    if forget is not None and len(forget):
        with timed("verify.forgetting"):
            refs = (
                baseline
                if inputs.spec.unlearning.is_sisa
                else references.load(inputs.store, inputs.model_id, dev)
            )
            checks["forgetting"] = forgetting(
                candidate,
                baseline,
                refs,
                forget,
                test if attack_test is None else attack_test,
                margin=v.forgetting_margin,
                exact=exact,
                seed=inputs.verify_seed("forgetting") % (2**31) if seed is None else seed,
                retained=retained,
            )
    return checks
