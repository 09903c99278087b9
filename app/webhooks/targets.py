"""Where a webhook may be delivered: no server-side request forgery.

A webhook URL is chosen by an admin, but the POST comes from inside the deployment, so
a URL naming loopback, a private network, link-local (cloud metadata at
169.254.169.254), multicast, reserved or unspecified addresses would let it reach what
only the service should. Such targets are refused when the webhook is registered and
again before every delivery, after resolving the name then; the delivery connects to
the very address that was checked (pinned), so a name that resolves to a public
address at the check and to a private one a moment later (DNS rebinding) cannot slip
through. Addresses inside `PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS` are let through (an
internal receiver; the test suite, benchmarks and demo allow 127.0.0.0/8).

Odd spellings of an address (`127.1`, `2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) are
what the system resolver makes of them, so they are judged by the address they reach,
never by how they are written.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ValueError):
    """The URL may not be delivered to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A vetted destination: connect to `address`, speak to `host`."""

    scheme: str
    host: str
    port: int
    address: IPAddress
    path: str  # path and query, as given

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the name."""
        addr = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{addr}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """`PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS`: comma-separated CIDRs (ValueError if bad)."""
    nets = []
    for part in text.split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return tuple(nets)


def check_syntax(url: str) -> None:
    """What any webhook URL must be, before anything is resolved."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise TargetRefused("url must not contain spaces or control characters (CR, LF, ...)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("url must be http or https")
    if not parts.hostname:
        raise TargetRefused("url must name a host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("url must not carry credentials")
    if parts.fragment:
        raise TargetRefused("url must not have a fragment")
    try:
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise TargetRefused("url has an invalid port") from exc


def _plain(addr: IPAddress) -> IPAddress:
    """An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, 6to4, NAT64 ...) is judged as
    the IPv4 address it reaches."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.sixtofour is not None:
            return addr.sixtofour
        if addr in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def refusal(addr: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why `addr` may not be delivered to, or None when it may."""
    if any(addr in net or _plain(addr) in net for net in allowed):
        return None
    plain = _plain(addr)
    for kind, hit in (
        ("unspecified", plain.is_unspecified),
        ("loopback", plain.is_loopback),
        ("link-local", plain.is_link_local),
        ("multicast", plain.is_multicast),
        ("private", plain.is_private),
        ("reserved", plain.is_reserved),
        ("not globally routable", not plain.is_global),
    ):
        if hit:
            return f"{kind} address {addr}"
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    # RFC 6761 names are answered here, never sent to a resolver.
    name = host.rstrip(".").lower()
    if name == "invalid" or name.endswith(".invalid"):
        return []
    if name == "localhost" or name.endswith(".localhost"):
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    out: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        addr = ipaddress.ip_address(raw)
        if addr not in out:
            out.append(addr)
    return out


def vet(url: str, allowed: Sequence[IPNetwork] = ()) -> Target:
    """Resolve `url`'s host now and pick an address it may be delivered to (the first
    one allowed); TargetRefused naming the reason when there is none."""
    check_syntax(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port)
    if not addresses:
        raise TargetRefused(f"the host {host!r} does not resolve")
    reasons = []
    for addr in addresses:
        why = refusal(addr, allowed)
        if why is None:
            path = parts.path or "/"
            if parts.query:
                path += f"?{parts.query}"
            return Target(parts.scheme, host, port, addr, path)
        reasons.append(why)
    raise TargetRefused(
        f"the host {host!r} resolves to {', '.join(reasons)}; webhooks may not target "
        "loopback, private, link-local, multicast, reserved or unspecified addresses "
        "(PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS lists exceptions)"
    )
