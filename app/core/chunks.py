"""Bounded IN lists: SQLite allows at most 999 bound parameters in one statement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
CHUNK = 900


def in_chunks(items: Sequence[T], size: int = CHUNK) -> list[list[T]]:
    """`items` cut into lists of at most `size`, in order."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
