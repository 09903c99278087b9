"""Encoders for text, image and audio columns, and the network that joins them.

A media column becomes a fixed-width block of the preprocessed input matrix, so every
part of the engine that works on `(N, n_inputs)` float32 inputs (SISA, approximate
strategies, retraining, weighting) works on media models unchanged:

- text: the tokenizer's hashed n-gram ids, as floats (id + 1; 0 pads); the network's
  `nn.EmbeddingBag` averages their embeddings;
- image: the decoded pixels (channels x size x size); a small CNN;
- audio: the log-mel spectrogram (n_mels x frames); a small CNN.

`MediaModel` splits its input into one block per media column (first) and the tabular
inputs, encodes each block and concatenates the encodings and the tabular inputs before
the head (logistic or MLP), whose first layer is the input layer feature removal works on.

The tokenizer drops blocked tokens (whole words, case-insensitively) before it forms
n-grams, so a text scores exactly the same with or without them: invariance by
construction, not by training.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml import media

COLUMN_KINDS = ("text", "image", "audio")
ENCODER_KINDS = {"text": "text_bag", "image": "image_cnn", "audio": "audio_cnn"}
# Per encoder kind: its parameters and their defaults (an override may set any of them).
DEFAULTS: dict[str, dict[str, Any]] = {
    "text_bag": {"buckets": 2**16, "dim": 32, "ngrams": 2, "max_tokens": 128},
    "image_cnn": {"size": 32, "channels": 1, "width": 8},
    "audio_cnn": {
        "sample_rate": 8000,
        "seconds": 1.0,
        "n_mels": 32,
        "n_fft": 256,
        "hop": 128,
        "width": 8,
    },
}
LIMITS: dict[str, tuple[float, float]] = {
    "buckets": (16, 2**22),
    "dim": (1, 1024),
    "ngrams": (1, 4),
    "max_tokens": (1, 4096),
    "size": (8, 256),
    "channels": (1, 3),
    "width": (1, 128),
    "sample_rate": (1000, 48000),
    "seconds": (0.05, 30.0),
    "n_mels": (4, 128),
    "n_fft": (32, 4096),
    "hop": (8, 4096),
}


@dataclass(frozen=True)
class EncoderSpec:
    """One media column's encoder: its column, kind and parameters; `blocked` (text)
    lists tokens the tokenizer drops (casefolded, sorted)."""

    column: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    blocked: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"column": self.column, "kind": self.kind, **self.params}
        if self.blocked:
            d["blocked"] = list(self.blocked)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderSpec:
        params = {k: v for k, v in d.items() if k not in ("column", "kind", "blocked")}
        return cls(str(d["column"]), str(d["kind"]), params, tuple(d.get("blocked", ())))

    def with_blocked(self, tokens: Iterable[str]) -> EncoderSpec:
        merged = tuple(sorted({*self.blocked, *(t.casefold() for t in tokens)}))
        return EncoderSpec(self.column, self.kind, dict(self.params), merged)

    @property
    def width(self) -> int:
        """Input columns this encoder's block occupies."""
        p = self.params
        if self.kind == "text_bag":
            return int(p["max_tokens"]) * int(p["ngrams"])
        if self.kind == "image_cnn":
            return int(p["channels"]) * int(p["size"]) ** 2
        if self.kind == "audio_cnn":
            return int(p["n_mels"]) * media.frames(
                int(p["sample_rate"]), float(p["seconds"]), int(p["hop"])
            )
        raise ValueError(f"unknown encoder kind {self.kind!r}")

    @property
    def out_dim(self) -> int:
        if self.kind == "text_bag":
            return int(self.params["dim"])
        return 2 * int(self.params["width"])


def resolve(
    column: str, column_kind: str, override: Mapping[str, Any] | None = None
) -> EncoderSpec:
    """The encoder of a column of `column_kind`: the default, with `override`'s values.
    ValueError for an unknown kind, a kind that does not fit the column, a bad value."""
    kind = str((override or {}).get("kind") or ENCODER_KINDS[column_kind])
    if kind not in DEFAULTS:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {sorted(DEFAULTS)}")
    if kind != ENCODER_KINDS[column_kind]:
        raise ValueError(f"encoder {kind!r} does not read {column_kind} columns")
    params = dict(DEFAULTS[kind])
    for key, value in (override or {}).items():
        if key == "kind":
            continue
        if key not in params:
            raise ValueError(f"encoder {kind!r} has no parameter {key!r}; it has {sorted(params)}")
        lo, hi = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ValueError(f"{key} must be a number in [{lo:g}, {hi:g}]")
        params[key] = type(params[key])(value)
    if kind == "audio_cnn" and params["hop"] > params["n_fft"]:
        raise ValueError("hop must not exceed n_fft")
    return EncoderSpec(column, kind, params)


# -- text -------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str, blocked: Iterable[str] = ()) -> list[str]:
    """Casefolded words, blocked ones dropped (whole words only)."""
    drop = set(blocked)
    return [w for w in _WORD.findall(text.casefold()) if w not in drop]


def ngram_ids(tokens: Sequence[str], ngrams: int, buckets: int) -> list[int]:
    """Stable hashed ids (CRC-32, not Python's salted hash) of every 1..ngrams-gram."""
    out: list[int] = []
    for n in range(1, ngrams + 1):
        for i in range(len(tokens) - n + 1):
            gram = "\x1f".join(tokens[i : i + n])
            out.append(zlib.crc32(f"{n}:{gram}".encode()) % buckets)
    return out


def text_block(values: Sequence[Any] | np.ndarray, spec: EncoderSpec) -> np.ndarray:
    p = spec.params
    max_tokens, ngrams, buckets = int(p["max_tokens"]), int(p["ngrams"]), int(p["buckets"])
    out = np.zeros((len(values), spec.width), dtype=np.float32)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            continue
        toks = tokenize(str(v), spec.blocked)[:max_tokens]
        ids = ngram_ids(toks, ngrams, buckets)
        if ids:
            out[i, : len(ids)] = np.asarray(ids, dtype=np.float32) + 1.0
    return out


# -- blocks -----------------------------------------------------------------------------


def _bytes(v: Any) -> bytes | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    raise media.MediaError(f"expected the file's bytes, got {type(v).__name__}")


# Decoded blocks of recent column arrays: every shard of an ensemble (and every check
# of a verification) transforms the same rows, and a block depends only on the values
# and the encoder, not on what a shard fitted. Keyed by the array's identity; the entry
# holds the array, so the identity cannot be reused while it is cached.
_CACHE: OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()
_CACHE_ENTRIES = 16
_CACHE_LOCK = threading.Lock()


def block(
    values: Sequence[Any] | np.ndarray,
    spec: EncoderSpec,
    limits: media.MediaLimits = media.MediaLimits(),
) -> np.ndarray:
    """Raw column values -> (N, spec.width) float32. Missing values give zeros."""
    if not isinstance(values, np.ndarray) or values.dtype != object:
        return _block(values, spec, limits)
    key = (id(values), json.dumps(spec.to_dict(), sort_keys=True))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is values:
            _CACHE.move_to_end(key)
            return hit[1]
    out = _block(values, spec, limits)
    out.setflags(write=False)
    with _CACHE_LOCK:
        _CACHE[key] = (values, out)
        while len(_CACHE) > _CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    return out


def _block(
    values: Sequence[Any] | np.ndarray, spec: EncoderSpec, limits: media.MediaLimits
) -> np.ndarray:
    if spec.kind == "text_bag":
        return text_block(values, spec)
    out = np.zeros((len(values), spec.width), dtype=np.float32)
    p = spec.params
    for i, v in enumerate(values):
        data = _bytes(v)
        if data is None:
            continue
        if spec.kind == "image_cnn":
            arr = media.image_array(data, int(p["size"]), int(p["channels"]), limits)
        else:
            arr = media.log_mel(
                data,
                sample_rate=int(p["sample_rate"]),
                seconds=float(p["seconds"]),
                n_mels=int(p["n_mels"]),
                n_fft=int(p["n_fft"]),
                hop=int(p["hop"]),
                limits=limits,
            )
        out[i] = arr.reshape(-1)
    return out


# -- networks ---------------------------------------------------------------------------


class TextBag(nn.Module):
    """Mean of the hashed n-gram embeddings (padding excluded): ids (N, L) -> (N, dim)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(
            int(spec.params["buckets"]) + 1, int(spec.params["dim"]), mode="mean", padding_idx=0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bag(x.long())  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Two conv-ReLU-pool stages and a global average: (N, C, H, W) -> (N, 2 * width)."""

    def __init__(self, channels: int, height: int, width_px: int, width: int) -> None:
        super().__init__()
        self.shape = (channels, height, width_px)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], *self.shape)
        z = nn.functional.max_pool2d(torch.relu(self.conv1(z)), 2)
        z = nn.functional.max_pool2d(torch.relu(self.conv2(z)), 2)
        return z.mean(dim=(2, 3))


def encoder_module(spec: EncoderSpec) -> nn.Module:
    p = spec.params
    if spec.kind == "text_bag":
        return TextBag(spec)
    if spec.kind == "image_cnn":
        return SmallCNN(int(p["channels"]), int(p["size"]), int(p["size"]), int(p["width"]))
    if spec.kind == "audio_cnn":
        n_frames = media.frames(int(p["sample_rate"]), float(p["seconds"]), int(p["hop"]))
        return SmallCNN(1, int(p["n_mels"]), n_frames, int(p["width"]))
    raise ValueError(f"unknown encoder kind {spec.kind!r}")


class MediaModel(nn.Module):
    """Each media block encoded, the tabular inputs after them passed through, all
    concatenated, then `head` (a LogisticRegression or MLP over the concatenation).

    Inputs are [media blocks..., tabular...] and the head's inputs [encodings...,
    tabular...]: a column appended after the inputs (the injection test's) is the
    head's last input column, as it is for a plain network."""

    def __init__(self, n_inputs: int, encoders: Sequence[EncoderSpec], head_factory: Any) -> None:
        super().__init__()
        widths = [e.width for e in encoders]
        self.media_width = sum(widths)
        self.n_tabular = n_inputs - self.media_width
        if self.n_tabular < 0:
            raise ValueError("the inputs are narrower than the encoders' blocks")
        self.widths = widths
        self.columns = [e.column for e in encoders]
        self.encoders = nn.ModuleList([encoder_module(e) for e in encoders])
        self.out_dims = [e.out_dim for e in encoders]
        self.head: nn.Module = head_factory(sum(self.out_dims) + self.n_tabular)

    def head_columns(self, column: str) -> list[int]:
        """The head's input columns fed by a media column's encoder."""
        pos = 0
        for name, dim in zip(self.columns, self.out_dims, strict=True):
            if name == column:
                return list(range(pos, pos + dim))
            pos += dim
        raise KeyError(column)

    def head_index(self, input_columns: Sequence[int]) -> list[int]:
        """Tabular input columns -> the head's input columns they feed."""
        shift = sum(self.out_dims) - self.media_width
        return [c + shift for c in input_columns if c >= self.media_width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        pos = 0
        for enc, w in zip(self.encoders, self.widths, strict=True):
            parts.append(enc(x[:, pos : pos + w]))
            pos += w
        parts.append(x[:, pos:])
        return self.head(torch.cat(parts, dim=1))  # type: ignore[no-any-return]
