"""Benchmarks (`make bench`, `python -m bench.run`)."""

from __future__ import annotations

import secrets


def production_secrets() -> dict[str, str]:
    """Fresh random secrets for a benchmark's production-shaped stack (PostgreSQL refuses
    to start without them, rightly: nothing is derived from a public default)."""
    return {
        "PALIMPSEST_SUBJECT_PEPPER": secrets.token_urlsafe(32),
        "PALIMPSEST_DASHBOARD_SESSION_SECRET": secrets.token_urlsafe(32),
    }
