"""Forgetting words from a text model: a feature request on a text column with `tokens`.

The column stays a feature; its encoder's tokenizer drops the words (whole words,
case-insensitively) before it forms n-grams, so every text scores the same with or
without them. The weights that learned from them are then corrected: SISA models retrain
every shard under the new tokenizer (exact, a Celery chord); monolithic models (and SISA
in approximate feature mode) get the embedding rows of every n-gram holding a forgotten
word zeroed, then a repair pass on the retained rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from app.core.db import session_scope
from app.ml.checkpoints import CheckpointStore
from app.ml.config import FeatureSpec
from app.ml.data import TabularData
from app.ml.device import derive_seed, runtime_fingerprint
from app.ml.encoders import EncoderSpec, MediaModel, TextBag, ngram_ids, tokenize
from app.ml.preprocess import PreprocessorState
from app.ml.sisa import ProgressFn, ShardEntry, SisaManifest
from app.ml.training import fit
from app.models import DeletionRequest
from app.pipeline import methods

REPAIR_EPOCHS = 2


def tokens_of(request_ids: list[str]) -> dict[str, list[str]]:
    """Feature -> the words its requests among `request_ids` forget (none: the column)."""
    if not request_ids:
        return {}
    out: dict[str, set[str]] = {}
    with session_scope() as s:
        for feature, tokens in s.execute(
            select(DeletionRequest.feature, DeletionRequest.tokens).where(
                DeletionRequest.id.in_(request_ids), DeletionRequest.kind == "feature"
            )
        ):
            if feature and tokens:
                out.setdefault(str(feature), set()).update(str(t) for t in tokens)
    return {f: sorted(t) for f, t in out.items()}


def column_features(
    features: list[tuple[str, str]], tokens: dict[str, list[str]]
) -> list[tuple[str, str]]:
    """The (feature, request) pairs that remove a whole column (not words)."""
    return [(f, r) for f, r in features if f not in tokens]


def spec_blocking(spec: FeatureSpec, tokens: dict[str, list[str]]) -> FeatureSpec:
    """`spec` with each text column's tokenizer also dropping its words."""
    if not tokens:
        return spec
    media = tuple(e.with_blocked(tokens[e.column]) if e.column in tokens else e for e in spec.media)
    return replace(spec, media=media)


def _blocked_media(
    prep: PreprocessorState, tokens: dict[str, list[str]]
) -> tuple[EncoderSpec, ...]:
    return tuple(e.with_blocked(tokens[e.column]) if e.column in tokens else e for e in prep.media)


def _bucket_rows(enc: EncoderSpec, texts: np.ndarray, words: set[str]) -> list[int]:
    """Embedding rows (id + 1) of every n-gram of these texts that holds one of `words`."""
    p = enc.params
    n_max, buckets, max_tokens = int(p["ngrams"]), int(p["buckets"]), int(p["max_tokens"])
    rows: set[int] = set()
    for text in texts:
        if text is None:
            continue
        toks = tokenize(str(text), enc.blocked)[:max_tokens]
        for n in range(1, n_max + 1):
            for i in range(len(toks) - n + 1):
                gram = toks[i : i + n]
                if words & set(gram):
                    rows.add(ngram_ids(gram, n, buckets)[-1] + 1)
    return sorted(rows)


def repair_entry(
    manifest: SisaManifest,
    e: ShardEntry,
    data: TabularData,
    tokens: dict[str, list[str]],
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[ShardEntry, dict[str, Any]]:
    """One model made blind to the words: the tokenizer drops them, the embedding rows
    of n-grams that held them are zeroed, and a repair pass runs on `data`."""
    prep = PreprocessorState.from_dict(e.preprocessor)
    model, _ = _load(manifest, e, prep, store, device)
    new_prep = prep.with_media(_blocked_media(prep, tokens))
    zeroed: dict[str, int] = {}
    if isinstance(model, MediaModel):
        for enc, module in zip(prep.media, model.encoders, strict=True):
            if enc.column in tokens and isinstance(module, TextBag):
                rows = _bucket_rows(enc, data.columns[enc.column], set(tokens[enc.column]))
                with torch.no_grad():
                    module.bag.weight[rows] = 0.0
                zeroed[enc.column] = len(rows)
    x = new_prep.transform(data.columns).to(device)
    y = torch.from_numpy(np.asarray(data.labels, dtype=np.int64)).to(device)
    seed = derive_seed(manifest.training.seed, manifest.model_key, "tokens", job_id, e.shard)
    fit(model, x, y, manifest.training, seed, epochs=REPAIR_EPOCHS)
    key = f"mono-{methods._tag(e.final_key, job_id, 'tokens')}"
    store.save(key, methods._tensors(model), {"from": e.final_key, "job": job_id, "tokens": 1})
    entry = replace(e, final_key=key, checkpoint_keys=[key], preprocessor=new_prep.to_dict())
    return entry, {"method": "tokens_repair", "zeroed_rows": zeroed, "repair_epochs": REPAIR_EPOCHS}


def _load(
    manifest: SisaManifest,
    e: ShardEntry,
    prep: PreprocessorState,
    store: CheckpointStore,
    device: torch.device,
) -> tuple[torch.nn.Module, PreprocessorState]:
    from app.ml.architectures import build_model

    model = build_model(manifest.arch, prep.n_inputs, manifest.n_classes)
    tensors, _ = store.load(e.final_key)
    model.load_state_dict(tensors)
    return model.to(device), prep


def approximate_tokens(
    manifest: SisaManifest,
    retained: TabularData,
    shard_of: np.ndarray,
    tokens: dict[str, list[str]],
    *,
    job_id: str,
    store: CheckpointStore,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> tuple[SisaManifest, dict[str, Any]]:
    """Every shard's final model repaired on its retained rows (one shard: monolithic)."""
    shard_of = np.asarray(shard_of, dtype=np.int64)
    entries: list[ShardEntry] = []
    per_shard: dict[str, Any] = {}
    for i, e in enumerate(manifest.entries):
        rows = np.flatnonzero(shard_of == e.shard) if len(manifest.entries) > 1 else None
        data = retained if rows is None else retained.take(rows)
        entry, info = repair_entry(manifest, e, data, tokens, job_id, store, device)
        entries.append(entry)
        per_shard[str(e.shard)] = info
        if progress is not None:
            progress((i + 1) / len(manifest.entries))
    new = replace(
        manifest,
        feature_spec=spec_blocking(manifest.feature_spec, tokens),
        entries=entries,
        runtime=runtime_fingerprint(device),
    )
    return new, {"method": "tokens_repair", "approximate": True, "shards": per_shard}
