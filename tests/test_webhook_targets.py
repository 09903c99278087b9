"""No server-side request forgery through webhooks: targets that resolve to loopback,
private, link-local, multicast, reserved or unspecified addresses are refused when
registered and again when delivered, after resolving then (DNS rebinding), unless
inside PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS; the POST goes to the checked address.

Nothing here sends a packet off this host: the refused targets are address literals
and names from /etc/hosts (`localhost`) or RFC 6761 (`*.localhost`, `*.invalid`), all
judged without a DNS query; the only receiver is on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.settings import Settings, get_settings
from app.webhooks import targets
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth
from tests.test_webhooks import Receiver, deliver_ids, deliveries, emit, env, keys, run, sent

__all__ = ["env", "keys", "sent"]  # fixtures shared with the webhook tests

REFUSED = {
    "http://127.0.0.1/h": "loopback",
    "http://127.1/h": "loopback",
    "http://2130706433/h": "loopback",
    "http://0x7f.1/h": "loopback",
    "http://0.0.0.0/h": "unspecified",
    "http://[::1]:8080/h": "loopback",
    "http://[::ffff:127.0.0.1]/h": "loopback",
    "http://[::]/h": "unspecified",
    "http://localhost:8000/h": "loopback",
    "http://LOCALHOST./h": "loopback",
    "http://hooks.localhost/h": "loopback",
    "http://10.1.2.3/h": "private",
    "http://172.16.0.1/h": "private",
    "https://192.168.1.10/h": "private",
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://[fe80::1]/h": "link-local",
    "http://[fd00::1]/h": "private",
    "http://224.0.0.1/h": "multicast",
    "http://[ff02::1]/h": "multicast",
    "http://240.0.0.1/h": "reserved",
    "http://100.64.0.1/h": "not globally routable",
    "http://[64:ff9b::a00:1]/h": "private",  # NAT64 of 10.0.0.1
    "http://[2002:7f00:1::]/h": "loopback",  # 6to4 of 127.0.0.1
    "http://nowhere.invalid/h": "does not resolve",
}


@pytest.fixture
def allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set the allowed networks for a test (the module default is 127.0.0.0/8)."""

    def set_to(value: str) -> None:
        monkeypatch.setenv("PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS", value)
        get_settings.cache_clear()

    yield set_to
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.parametrize("url", list(REFUSED))
def test_internal_targets_are_refused_at_registration(
    env: AppEnv, keys: dict[str, str], sent: list[Any], allowed: Any, url: str
) -> None:
    allowed("")
    resp = env.client.post(
        "/v1/webhooks", headers=auth(keys["admin"]), json={"url": url, "events": ["job.failed"]}
    )
    err = assert_error(resp, 422, "webhook_target_refused")
    assert REFUSED[url] in err["message"], err


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x\r\nX-Injected: 1",
        "http://127.0.0.1/x\n",
        "\rhttp://127.0.0.1/x",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/\tx",
        "http://127.0.0.1/\x00",
        "http://127.0.0.1/\x7f",
    ],
)
def test_control_characters_are_refused(
    env: AppEnv, keys: dict[str, str], sent: list[Any], url: str
) -> None:
    # Even where the address is allowed (the module allows 127.0.0.0/8).
    resp = env.client.post(
        "/v1/webhooks", headers=auth(keys["admin"]), json={"url": url, "events": ["job.failed"]}
    )
    assert_error(resp, 422)


def test_allowed_networks_let_internal_receivers_through(
    env: AppEnv, keys: dict[str, str], sent: list[Any], allowed: Any
) -> None:
    h = auth(keys["admin"])
    allowed("10.0.0.0/8, ::1/128")
    for url in ("http://10.9.8.7/h", "http://[::1]/h"):
        r = env.client.post("/v1/webhooks", headers=h, json={"url": url, "events": ["job.failed"]})
        assert r.status_code == 201, r.text
    r = env.client.post(
        "/v1/webhooks", headers=h, json={"url": "http://127.1/h", "events": ["job.failed"]}
    )
    assert_error(r, 422, "webhook_target_refused")


def test_delivery_checks_the_address_again_and_connects_to_it(
    env: AppEnv, keys: dict[str, str], sent: list[Any], allowed: Any
) -> None:
    receiver = Receiver()
    try:
        port = receiver.server.server_address[1]
        # Registered while loopback was allowed; `localhost` is resolved by the hosts
        # file, never by a DNS server.
        allowed("127.0.0.0/8")
        url = f"http://localhost:{port}/hook?x=1"
        r = env.client.post(
            "/v1/webhooks", headers=auth(keys["admin"]), json={"url": url, "events": ["job.failed"]}
        )
        assert r.status_code == 201, r.text
        hook = r.json()
        emit("job.failed", {"job_id": "j1"})
        (did,) = deliver_ids(sent)
        # Now the name leads somewhere refused (as after DNS rebinding, or a narrower
        # allow-list): nothing is sent, and the attempt says why.
        allowed("")
        assert run(did) == "pending"
        assert receiver.received == []
        (d,) = deliveries(env, keys["admin"], hook["id"])
        assert d["last_error"].startswith("refused:") and "loopback" in d["last_error"], d
        assert d["last_status_code"] is None and d["attempts"] == 1
        # Allowed again: sent to the checked address, with the name as the Host.
        allowed("127.0.0.0/8")
        from tests.test_webhooks import make_due

        make_due(did)
        assert run(did) == "delivered"
        (headers, _body) = receiver.received[0]
        assert headers["host"] == f"localhost:{port}"
    finally:
        receiver.close()


def test_vet_pins_the_checked_address() -> None:
    loop = targets.parse_networks("127.0.0.0/8")
    t = targets.vet("http://localhost:8080/a/b?c=1", loop)
    assert t.address == ipaddress.ip_address("127.0.0.1")
    assert t.pinned_url == "http://127.0.0.1:8080/a/b?c=1"
    assert t.host_header == "localhost:8080"
    public = targets.vet("https://93.184.216.34/x")  # a literal: nothing is resolved
    assert public.pinned_url == "https://93.184.216.34:443/x" and public.host_header == (
        "93.184.216.34"
    )
    v6 = targets.vet("http://[2606:4700::1111]/", ())
    assert v6.pinned_url == "http://[2606:4700::1111]:80/"
    assert targets.refusal(ipaddress.ip_address("8.8.8.8")) is None
    assert targets.refusal(ipaddress.ip_address("::ffff:10.0.0.1")) is not None


def test_a_bad_allow_list_refuses_to_start() -> None:
    with pytest.raises(ValidationError):
        Settings(webhook_allowed_networks="127.0.0.0/8, not-a-network")
    assert Settings(webhook_allowed_networks="").webhook_networks == ()
