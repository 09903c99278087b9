"""Learned preprocessing: category vocabularies and numeric scaling.

A preprocessor is learned state like weights, so it is fitted per SISA shard on the
shard's *retained* records (or pinned by the dataset schema) and never sees forgotten
data. Numeric statistics are quantised (scale to quarter-octaves, mean to an eighth of
the scale) so that removing a few records almost never changes them; when it does,
the shard's checkpoints no longer apply and SISA restarts that shard from slice 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import torch

from app.ml.config import FeatureSpec
from app.ml.encoders import EncoderSpec, block


def _quantise_scale(std: float) -> float:
    if not math.isfinite(std) or std <= 1e-12:
        return 1.0
    return float(2.0 ** (round(math.log2(std) * 4) / 4))


def _quantise_mean(mean: float, scale: float) -> float:
    if not math.isfinite(mean):
        return 0.0
    step = scale / 8
    return float(round(mean / step) * step)


@dataclass(frozen=True)
class PreprocessorState:
    """Fitted preprocessing: inputs are [media blocks..., numeric..., one-hot per
    categorical...] (media blocks only for models with text, image or audio columns).

    `removed` features still own their input columns (so shapes stay stable across
    versions) but always emit zeros.
    """

    numeric: tuple[tuple[str, float, float], ...]  # (name, mean, scale)
    categorical: tuple[tuple[str, tuple[str, ...]], ...]  # (name, vocabulary)
    removed: tuple[str, ...] = ()
    # Media columns (app.ml.encoders): one fixed-width block each, before the numerics.
    media: tuple[EncoderSpec, ...] = ()

    @property
    def n_inputs(self) -> int:
        return len(self.numeric) + sum(len(v) for _, v in self.categorical) + self.media_width

    @property
    def media_width(self) -> int:
        return sum(e.width for e in self.media)

    def column_slices(self) -> dict[str, slice]:
        """Feature name -> the slice of input columns it occupies: media blocks first
        (none for tabular models), then numeric, then one-hot categoricals, so that a
        column appended after them (the injection test's) is the network head's last."""
        out: dict[str, slice] = {}
        pos = 0
        for e in self.media:
            out[e.column] = slice(pos, pos + e.width)
            pos += e.width
        for i, (name, _, _) in enumerate(self.numeric):
            out[name] = slice(pos + i, pos + i + 1)
        pos += len(self.numeric)
        for name, vocab in self.categorical:
            out[name] = slice(pos, pos + len(vocab))
            pos += len(vocab)
        return out

    def feature_columns(self, feature: str) -> list[int]:
        sl = self.column_slices()
        if feature not in sl:
            raise KeyError(feature)
        s = sl[feature]
        return list(range(s.start, s.stop))

    def with_removed(self, feature: str) -> PreprocessorState:
        if feature in self.removed:
            return self
        return PreprocessorState(
            self.numeric, self.categorical, (*self.removed, feature), self.media
        )

    def with_media(self, media: tuple[EncoderSpec, ...]) -> PreprocessorState:
        """The same state reading media columns with `media` (e.g. tokens blocked)."""
        return PreprocessorState(self.numeric, self.categorical, self.removed, media)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "numeric": [[n, m, s] for n, m, s in self.numeric],
            "categorical": [[n, list(v)] for n, v in self.categorical],
            "removed": list(self.removed),
        }
        if self.media:  # absent for tabular models: their digests as before
            d["media"] = [e.to_dict() for e in self.media]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessorState:
        return cls(
            numeric=tuple((str(n), float(m), float(s)) for n, m, s in d["numeric"]),
            categorical=tuple((str(n), tuple(str(x) for x in v)) for n, v in d["categorical"]),
            removed=tuple(d.get("removed", ())),
            media=tuple(EncoderSpec.from_dict(e) for e in d.get("media", ())),
        )

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def transform(self, columns: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Raw columns -> float32 inputs (N, n_inputs). Unknown categories map to zeros."""
        n = _n_rows(columns)
        out = np.zeros((n, self.n_inputs), dtype=np.float32)
        removed = set(self.removed)
        pos = 0
        for e in self.media:
            if e.column not in removed:  # a removed column's block stays empty
                out[:, pos : pos + e.width] = block(columns[e.column], e)
            pos += e.width
        for i, (name, mean, scale) in enumerate(self.numeric):
            if name in removed:
                continue
            x = np.asarray(columns[name], dtype=np.float64)
            z = (x - mean) / scale
            out[:, pos + i] = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        pos += len(self.numeric)
        for name, vocab in self.categorical:
            if name not in removed:
                rows, cols = _one_hot(columns[name], vocab, n)
                out[rows, pos + cols] = 1.0
            pos += len(vocab)
        return torch.from_numpy(out)


# The one-hot positions of recent (column values, vocabulary) pairs: the shards of an
# ensemble usually share their vocabularies, so the rows an ensemble scores are coded
# once per column rather than once per shard. An entry holds a weak reference to its
# values array (never the values: no row outlives its array here), so an id is never
# mistaken for a later array's; column arrays are never changed in place. Columns of up
# to _ONE_HOT_ROWS rows are kept (a model's test rows, which a warm worker hands out as
# the same arrays job after job), at most _ONE_HOT_CELLS positions in all (int32: 8 MB).
_ONE_HOT: OrderedDict[
    tuple[int, tuple[str, ...]], tuple[weakref.ref[Any], np.ndarray, np.ndarray]
] = OrderedDict()
_ONE_HOT_SIZE = 128
_ONE_HOT_ROWS = 100_000
_ONE_HOT_CELLS = 1_000_000
_ONE_HOT_HELD = 0  # positions held in _ONE_HOT
_ONE_HOT_LOCK = threading.Lock()


def _one_hot(values: Any, vocab: tuple[str, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, vocabulary position) of every value found in `vocab`."""
    key = (id(values), vocab)
    with _ONE_HOT_LOCK:
        hit = _ONE_HOT.get(key)
        if hit is not None and hit[0]() is values:
            _ONE_HOT.move_to_end(key)
            return hit[1], hit[2]
    codes = _codes(values, {v: j for j, v in enumerate(vocab)}, n)
    found = codes >= 0
    rows, cols = np.nonzero(found)[0].astype(np.int32), codes[found].astype(np.int32)
    if n > _ONE_HOT_ROWS or not isinstance(values, np.ndarray):
        return rows, cols
    global _ONE_HOT_HELD
    with _ONE_HOT_LOCK:
        old = _ONE_HOT.pop(key, None)
        _ONE_HOT_HELD -= 0 if old is None else len(old[1])
        _ONE_HOT[key] = (weakref.ref(values), rows, cols)
        _ONE_HOT_HELD += len(rows)
        while len(_ONE_HOT) > 1 and (
            len(_ONE_HOT) > _ONE_HOT_SIZE or _ONE_HOT_HELD > _ONE_HOT_CELLS
        ):
            _ONE_HOT_HELD -= len(_ONE_HOT.popitem(last=False)[1][1])
    return rows, cols


def _n_rows(columns: Mapping[str, np.ndarray]) -> int:
    for v in columns.values():
        return len(v)
    return 0


def _codes(values: np.ndarray, index: dict[str, int], n: int) -> np.ndarray:
    """Vocabulary position of each value (-1: unknown), values normalised by `_cat`."""
    cells = values.tolist() if isinstance(values, np.ndarray) else list(values)
    # Strings (the usual case): dict look-ups mapped in C; anything else is normalised
    # cell by cell, which gives the same codes for strings, only slower.
    if set(map(type, cells)) <= {str}:
        return np.fromiter(map(index.get, cells, repeat(-1)), dtype=np.int64, count=n)
    return np.fromiter((index.get(_cat(v), -1) for v in cells), dtype=np.int64, count=n)


def _vocabulary(values: np.ndarray) -> tuple[str, ...]:
    """Sorted distinct `_cat` values, without the empty string."""
    cells = values.tolist() if isinstance(values, np.ndarray) else list(values)
    distinct = set(cells)
    if set(map(type, distinct)) <= {str}:
        return tuple(sorted(distinct - {""}))
    # Not the distinct values: 1, 1.0 and True are one set element but three strings.
    return tuple(sorted({_cat(v) for v in cells} - {""}))


def _cat(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def fit_preprocessor(spec: FeatureSpec, columns: Mapping[str, np.ndarray]) -> PreprocessorState:
    """Fit vocabularies and scaling on exactly the rows given (a shard's retained records)."""
    numeric: list[tuple[str, float, float]] = []
    for name in spec.numeric:
        x = np.asarray(columns[name], dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            numeric.append((name, 0.0, 1.0))
            continue
        scale = _quantise_scale(float(x.std()))
        numeric.append((name, _quantise_mean(float(x.mean()), scale), scale))
    categorical: list[tuple[str, tuple[str, ...]]] = []
    for name in spec.categorical:
        if name in spec.fixed_categories:
            vocab = tuple(spec.fixed_categories[name])
        else:
            vocab = _vocabulary(columns[name])
        categorical.append((name, vocab))
    return PreprocessorState(tuple(numeric), tuple(categorical), tuple(spec.removed), spec.media)
