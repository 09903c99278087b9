"""CIDR lists from settings (`PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS`), parsed here so that
settings can validate them without knowing the webhooks that use them."""

from __future__ import annotations

import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (ValueError if one is bad)."""
    nets: list[IPNetwork] = []
    for part in text.split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return tuple(nets)
