"""Media datasets: `.zip` archives (a manifest and the files it names), Parquet with
the files' bytes in binary columns, the checks every file passes before anything is
stored, and the content-addressed media store.

An archive is checked before it is read (entry count, names, declared and actual sizes,
compression ratio) and every media file is decoded once at ingest, so a dataset holds
only files that training and predict can read. Each refusal is a 422 naming the file.

Media bytes live beside the Parquet partitions, one folder per storage partition and one
file per distinct content: `<dataset>/media/p0003/<sha256>`. The Parquet column holds
the reference `p0003/<sha256>`. A subject's records share a partition, so erasing them
deletes their files (those no remaining record of the partition names) and rewrites
nothing else.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.core.errors import Unprocessable
from app.core.settings import Settings
from app.core.storage import ArtifactStore
from app.datasets.parsing import read_table
from app.datasets.schemas import DatasetSpec
from app.ml import media
from app.ml.encoders import DEFAULTS

MANIFESTS = ("manifest.csv", "manifest.parquet")
MEDIA = "media"
# Below this size a file's compression ratio is not judged (short text compresses well);
# the archive's total size bounds many such files.
RATIO_FLOOR_BYTES = 1 * 2**20


@dataclass
class MediaTable:
    """The manifest (or Parquet) table with image and audio columns as binary values,
    and, per media column, the name that errors give each row's file."""

    table: pa.Table
    names: dict[str, list[str]]


def is_zip(data: bytes, filename: str) -> bool:
    return data[:4] == b"PK\x03\x04" or filename.lower().endswith(".zip")


def limits_of(settings: Settings) -> media.MediaLimits:
    return media.MediaLimits(
        max_file_bytes=settings.media_max_file_bytes,
        max_image_pixels=settings.media_max_image_pixels,
        max_audio_seconds=settings.media_max_audio_seconds,
    )


def media_columns(spec: DatasetSpec) -> dict[str, str]:
    """Column -> kind (`text`, `image`, `audio`) as the spec declares them."""
    out: dict[str, str] = {}
    for kind, cols in (
        ("text", spec.text_columns),
        ("image", spec.image_columns),
        ("audio", spec.audio_columns),
    ):
        for c in cols or []:
            if c in out:
                raise Unprocessable(
                    f"column {c!r} is declared both {out[c]} and {kind}", code="invalid_spec"
                )
            out[c] = kind
    return out


def _bad(message: str) -> Unprocessable:
    return Unprocessable(message, code="invalid_archive")


def _safe_name(name: str) -> str:
    """An entry's path, refused when it could land outside the archive's root."""
    if (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or any(part == ".." for part in name.split("/"))
    ):
        raise _bad(f"archive entry {name!r}: unsafe path (absolute or leaving the archive)")
    return posixpath.normpath(name)


def read_zip(data: bytes, spec: DatasetSpec, settings: Settings) -> MediaTable:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _bad(f"not a readable zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > settings.media_max_entries:
            raise _bad(
                f"the archive has {len(infos)} entries, more than {settings.media_max_entries}"
            )
        entries: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            name = _safe_name(info.filename)
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise _bad(f"archive entry {name!r} is encrypted")
            total += info.file_size
            if info.file_size > settings.media_max_file_bytes:
                raise _bad(
                    f"archive entry {name!r}: {info.file_size} bytes, more than the "
                    f"{settings.media_max_file_bytes} allowed per file"
                )
            if (
                info.file_size > RATIO_FLOOR_BYTES
                and info.file_size
                > settings.media_max_compression_ratio * max(info.compress_size, 1)
            ):
                raise _bad(f"archive entry {name!r}: compression ratio too high (a zip bomb?)")
            if total > settings.media_max_uncompressed_bytes:
                raise _bad(
                    "the archive unpacks to more than "
                    f"{settings.media_max_uncompressed_bytes} bytes"
                )
            entries[name] = info

        def read(name: str) -> bytes:
            info = entries[name]
            try:
                with zf.open(info) as fh:
                    # Never trust the declared size: read at most one byte beyond it.
                    out = fh.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise _bad(f"archive entry {name!r} does not unpack: {exc}") from exc
            if len(out) != info.file_size:
                raise _bad(f"archive entry {name!r} is not the size its header declares")
            return out

        found = [m for m in MANIFESTS if m in entries]
        if len(found) != 1:
            raise _bad(
                "the archive needs exactly one manifest at its root "
                f"({' or '.join(MANIFESTS)}); found {found or 'none'}"
            )
        raw = read(found[0])
        try:
            if found[0].endswith(".parquet"):
                table = pq.read_table(io.BytesIO(raw))
            else:
                table = pacsv.read_csv(
                    io.BytesIO(raw),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in media_columns(spec)}
                    ),
                )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise _bad(f"{found[0]} does not read: {str(exc).splitlines()[0]}") from exc
        names: dict[str, list[str]] = {}
        for col, kind in media_columns(spec).items():
            if col not in table.column_names:
                continue  # plan_columns names the missing column
            values = table.column(col).cast(pa.string()).to_pylist()
            if kind == "text":
                texts: list[str | None] = []
                for v in values:
                    key = None if v is None else posixpath.normpath(v.removeprefix("./"))
                    if key is not None and key.lower().endswith(".txt") and key in entries:
                        try:
                            texts.append(read(key).decode("utf-8"))
                        except UnicodeDecodeError as exc:
                            raise _bad(f"file {key!r} is not UTF-8 text") from exc
                    else:
                        texts.append(v)
                table = table.set_column(
                    table.column_names.index(col), col, pa.array(texts, pa.string())
                )
                continue
            blobs: list[bytes | None] = []
            col_names: list[str] = []
            for i, v in enumerate(values):
                if v is None or v == "":
                    blobs.append(None)
                    col_names.append(f"row {i}")
                    continue
                key = posixpath.normpath(v.removeprefix("./"))
                if key not in entries:
                    raise _bad(
                        f"file {v!r} (column {col!r}, row {i} of {found[0]}) is not in the archive"
                    )
                blobs.append(read(key))
                col_names.append(key)
            table = table.set_column(
                table.column_names.index(col), col, pa.array(blobs, pa.binary())
            )
            names[col] = col_names
        return MediaTable(table, names)


def read_upload(data: bytes, filename: str, spec: DatasetSpec, settings: Settings) -> MediaTable:
    """A zip archive, or a CSV/Parquet file (media as binary Parquet columns)."""
    if is_zip(data, filename):
        return read_zip(data, spec, settings)
    table = read_table(data, filename)
    names = {}
    for col, kind in media_columns(spec).items():
        if kind != "text" and col in table.column_names:
            names[col] = [f"row {i}" for i in range(table.num_rows)]
    return MediaTable(table, names)


def check_media(mt: MediaTable, spec: DatasetSpec, settings: Settings) -> pa.Table:
    """Every image and audio cell decodes (else 422 naming the file); text columns are
    strings. The table with media columns as binary and text columns as strings."""
    limits = limits_of(settings)
    table = mt.table
    audio = DEFAULTS["audio_cnn"]
    for col, kind in media_columns(spec).items():
        if col not in table.column_names:
            raise Unprocessable(
                f"{kind} column {col!r} is not a column of the file", code="invalid_spec"
            )
        arr = table.column(col)
        if kind == "text":
            t = arr.type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
                raise Unprocessable(
                    f"text column {col!r} must hold strings, not {t}", code="invalid_file"
                )
            continue
        t = arr.type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)):
            raise Unprocessable(
                f"{kind} column {col!r} must hold the files' bytes (a binary column) or name "
                f"files of a zip archive, not {t}",
                code="invalid_file",
            )
        names = mt.names.get(col) or [f"row {i}" for i in range(table.num_rows)]
        for i, value in enumerate(arr.to_pylist()):
            if value is None:
                continue
            try:
                if kind == "image":
                    media.open_image(value, limits)
                else:
                    media.log_mel(
                        value,
                        sample_rate=audio["sample_rate"],
                        seconds=audio["seconds"],
                        n_mels=audio["n_mels"],
                        n_fft=audio["n_fft"],
                        hop=audio["hop"],
                        limits=limits,
                    )
            except media.MediaError as exc:
                raise Unprocessable(
                    f"{kind} file {names[i]!r} (column {col!r}): {exc}", code="invalid_media"
                ) from exc
    return table


# -- the media store ----------------------------------------------------------------------


def media_prefix(artifact_prefix: str) -> str:
    return f"{artifact_prefix}/{MEDIA}"


def store_media(
    store: ArtifactStore, artifact_prefix: str, values: list[bytes | None], partitions: list[int]
) -> list[str | None]:
    """Write each file once per partition, content-addressed; its references."""
    refs: list[str | None] = []
    written: set[str] = set()
    for value, p in zip(values, partitions, strict=True):
        if value is None:
            refs.append(None)
            continue
        ref = f"p{p:04d}/{hashlib.sha256(value).hexdigest()}"
        if ref not in written:
            store.write_bytes(f"{media_prefix(artifact_prefix)}/{ref}", value)
            written.add(ref)
        refs.append(ref)
    return refs


def load_media(
    store: ArtifactStore, artifact_prefix: str, refs: Iterable[str | None]
) -> list[bytes | None]:
    cache: dict[str, bytes] = {}
    out: list[bytes | None] = []
    for ref in refs:
        if ref is None:
            out.append(None)
            continue
        if ref not in cache:
            cache[ref] = store.read_bytes(f"{media_prefix(artifact_prefix)}/{ref}")
        out.append(cache[ref])
    return out


def delete_media(store: ArtifactStore, artifact_prefix: str, refs: Iterable[str]) -> None:
    for ref in sorted(set(refs)):
        store.delete(f"{media_prefix(artifact_prefix)}/{ref}")
