"""Where a callback may be sent: the webhook rule (no loopback, private or link-local
target unless an operator allowed its network).

Seam: the shared SSRF check for webhooks is being written elsewhere; until it lands this
module applies the same rule and reads the same setting, `PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS`
(comma-separated CIDRs). Replace `check_url` by the shared check when it exists.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from app.core.settings import get_settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeTarget(ValueError):
    """The URL is malformed or resolves somewhere callbacks may not go."""


def allowed_networks() -> list[Network]:
    raw = getattr(get_settings(), "webhook_allowed_networks", None)
    if raw is None:
        raw = os.environ.get("PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS", "")
    items = raw if isinstance(raw, list) else str(raw).split(",")
    out: list[Network] = []
    for item in items:
        text = str(item).strip()
        if text:
            out.append(ipaddress.ip_network(text, strict=False))
    return out


def check_shape(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL without credentials or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget("the callback URL must be http or https")
    if not parts.hostname:
        raise UnsafeTarget("the callback URL must name a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("the callback URL must not carry credentials")
    if parts.fragment:
        raise UnsafeTarget("the callback URL must not have a fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeTarget("the callback URL has an invalid port") from exc
    return parts.hostname, port


def check_url(url: str) -> None:
    """Resolve the host now; every address must be public or in an allowed network.
    Called at intake and again before each attempt (DNS can change in between)."""
    host, port = check_shape(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTarget(f"the callback host {host!r} does not resolve") from exc
    allowed = allowed_networks()
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if addr.is_global and not addr.is_multicast:
            continue
        if any(addr.version == net.version and addr in net for net in allowed):
            continue
        raise UnsafeTarget(
            f"the callback host {host!r} resolves to {addr}, which is not a public address "
            "(allow its network with PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS)"
        )
