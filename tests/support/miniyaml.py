"""A tiny reader for the block-YAML subset our deploy files use.

The project's virtualenv has no PyYAML (and adds none for tests), so `test_deploy` reads
`docker-compose.yml` with this when `yaml` is not importable. Supported: block mappings
and sequences by indentation, full-line comments, anchors (`&a`), aliases (`*a`), merge
keys (`<<: *a`), JSON-style flow sequences, quoted and plain scalars. Anything else
raises `ValueError` instead of being misread; where PyYAML exists the two are compared.
"""

from __future__ import annotations

import json
import re
from typing import Any

_INT = re.compile(r"^[-+]?\d+$")
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?$")


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, int, str]] = []  # (line number, indent, content)
        for no, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise ValueError(f"line {no}: tabs in indentation")
            content = raw.strip()
            if not content or content.startswith("#") or content == "---":
                continue
            self.lines.append((no, len(raw) - len(raw.lstrip(" ")), content))
        self.anchors: dict[str, Any] = {}

    def scalar(self, s: str, no: int) -> Any:
        if s.startswith("*"):
            name = s[1:]
            if name not in self.anchors:
                raise ValueError(f"line {no}: unknown alias {s}")
            return self.anchors[name]
        if s.startswith(("[", "{")):
            try:
                return json.loads(s)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {no}: unsupported flow collection: {s}") from exc
        if s.startswith('"'):
            return json.loads(s)
        if s.startswith("'"):
            if not s.endswith("'") or len(s) < 2:
                raise ValueError(f"line {no}: unterminated quote")
            return s[1:-1].replace("''", "'")
        if s.startswith(("&", "!", "|", ">", "%", "@", "`")) or " #" in s:
            raise ValueError(f"line {no}: unsupported YAML syntax: {s}")
        lowered = s.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("null", "~"):
            return None
        if _INT.match(s):
            return int(s)
        if _FLOAT.match(s):
            return float(s)
        return s

    def value(self, rest: str, i: int, indent: int, no: int) -> tuple[Any, int]:
        """The value after `key:` or `- `: inline, or the block on the following lines."""
        anchor = None
        if rest.startswith("&"):
            anchor, _, rest = rest.partition(" ")
            anchor = anchor[1:]
            rest = rest.strip()
        if rest:
            val = self.scalar(rest, no)
        elif i < len(self.lines) and (
            self.lines[i][1] > indent
            or (self.lines[i][1] == indent and self.lines[i][2].startswith("- "))
        ):
            val, i = self.block(i, self.lines[i][1])
        else:
            val = None
        if anchor:
            self.anchors[anchor] = val
        return val, i

    def block(self, i: int, indent: int) -> tuple[Any, int]:
        if self.lines[i][2].startswith("- ") or self.lines[i][2] == "-":
            return self.sequence(i, indent)
        return self.mapping(i, indent)

    def sequence(self, i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(self.lines) and self.lines[i][1] == indent:
            no, _, content = self.lines[i]
            if not content.startswith("-"):
                break
            item = content[1:].strip()
            if re.match(r"^[^\"'\[{*&][^:]*:(\s|$)", item):
                raise ValueError(f"line {no}: mappings inside sequences are not supported")
            val, i = self.value(item, i + 1, indent, no)
            out.append(val)
        return out, i

    def mapping(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        merged: set[str] = set()  # keys from `<<` may be overridden; plain repeats may not
        while i < len(self.lines):
            no, ind, content = self.lines[i]
            if ind < indent:
                break
            if ind > indent:
                raise ValueError(f"line {no}: unexpected indentation")
            if content.startswith("- "):
                break
            m = re.match(r"^([^\s\"'][^:]*|\"[^\"]*\"|'[^']*'):(?:\s+(.*))?$", content)
            if not m:
                raise ValueError(f"line {no}: expected `key: value`: {content}")
            key = m.group(1)
            if key[0] in "\"'":
                key = key[1:-1]
            val, i = self.value((m.group(2) or "").strip(), i + 1, indent, no)
            if key == "<<":
                if not isinstance(val, dict):
                    raise ValueError(f"line {no}: merge key needs a mapping")
                for k, v in val.items():
                    if k not in out:
                        out[k] = v
                        merged.add(k)
                continue
            if key in out and key not in merged:
                raise ValueError(f"line {no}: duplicate key {key!r}")
            merged.discard(key)
            out[key] = val
        return out, i


def safe_load(text: str) -> Any:
    reader = _Reader(text)
    if not reader.lines:
        return None
    value, i = reader.block(0, reader.lines[0][1])
    if i != len(reader.lines):
        raise ValueError(f"line {reader.lines[i][0]}: could not parse")
    return value
