"""Seeded media datasets for the tests: generated CV text, Pillow-drawn images, tones
as 16-bit WAV. Each label is learnable from its modality alone."""

from __future__ import annotations

import io
import math
import wave
import zipfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SKILLS = ["python", "sql", "welding", "nursing", "accounting", "design", "sales", "logistics"]
FILLER = ["experienced", "reliable", "team", "player", "with", "years", "of", "work", "in"]


def cv_text(rng: np.random.Generator, good: bool, licence: bool) -> str:
    words = list(rng.choice(FILLER, size=6))
    skill = SKILLS[:4] if good else SKILLS[4:]
    words += list(rng.choice(skill, size=3))
    if licence:
        words.insert(int(rng.integers(0, len(words))), "driving licence")
    return " ".join(words).capitalize() + "."


def png(label: int, rng: np.random.Generator, size: int = 24) -> bytes:
    im = Image.new("L", (size, size), color=int(rng.integers(0, 40)))
    d = ImageDraw.Draw(im)
    x0, y0 = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    x1, y1 = x0 + int(rng.integers(10, 15)), y0 + int(rng.integers(10, 15))
    if label:
        d.ellipse([x0, y0, x1, y1], fill=255)
    else:
        d.line([x0, y0, x1, y1], fill=255, width=2)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wav(
    freq: float, rng: np.random.Generator, seconds: float = 0.5, rate: int = 8000, width: int = 2
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * math.pi * freq * t) + 0.05 * rng.normal(size=t.shape)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(width)
        wf.setframerate(rate)
        if width == 2:
            wf.writeframes((np.clip(x, -1, 1) * 32000).astype("<i2").tobytes())
        else:
            wf.writeframes(((np.clip(x, -1, 1) * 120) + 128).astype(np.uint8).tobytes())
    return buf.getvalue()


def rows(
    kind: str, n_subjects: int = 24, per_subject: int = 2, seed: int = 0, prefix: str = ""
) -> list[dict[str, Any]]:
    """Records with `subject`, `source`, `group`, `age`, `label` and one media column
    `media` (text, or the file's bytes for image and audio)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_subjects):
        for j in range(per_subject):
            label = int(rng.integers(0, 2))
            group = ["a", "b"][s % 2]
            if kind == "text":
                value: Any = cv_text(rng, bool(label), bool(rng.integers(0, 2)))
            elif kind == "image":
                value = png(label, rng)
            else:
                value = wav(300.0 if label else 1200.0 + 200 * (s % 2), rng)
            out.append(
                {
                    "subject": f"{prefix}s{s:03d}",
                    "source": f"district{s % 3}",
                    "group": group,
                    "age": float(rng.integers(18, 60)),
                    "label": "yes" if label else "no",
                    "media": value,
                    "name": f"files/s{s:03d}-{j}.{'png' if kind == 'image' else 'wav'}",
                }
            )
    return out


def parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    cols = {k: [r[k] for r in records] for k in records[0] if k != "name"}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def zip_bytes(
    records: list[dict[str, Any]],
    kind: str,
    *,
    manifest: str = "csv",
    extra: dict[str, bytes] | None = None,
    drop: set[str] = frozenset(),
) -> bytes:
    """A manifest naming each record's file, and the files (text inline)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        table: dict[str, list[Any]] = {
            k: [] for k in ("subject", "source", "group", "age", "label", "media")
        }
        for r in records:
            for k in table:
                if k == "media" and kind != "text":
                    table[k].append(r["name"])
                    if r["name"] not in drop:
                        zf.writestr(r["name"], r["media"])
                else:
                    table[k].append(r[k])
        if manifest == "none":
            pass
        elif manifest == "csv":
            lines = [",".join(table)]
            for i in range(len(records)):
                lines.append(
                    ",".join(
                        f'"{table[k][i]}"' if k == "media" else str(table[k][i]) for k in table
                    )
                )
            zf.writestr("manifest.csv", "\n".join(lines) + "\n")
        else:
            mb = io.BytesIO()
            pq.write_table(pa.table(table), mb)
            zf.writestr("manifest.parquet", mb.getvalue())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def spec(name: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "subject_column": "subject",
        "label_column": "label",
        "source_column": "source",
        "group_columns": ["group"],
        f"{kind}_columns": ["media"],
        **extra,
    }
