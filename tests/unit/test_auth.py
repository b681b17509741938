from __future__ import annotations

import base64
import ipaddress

import pytest

from bridge.auth import Gate
from bridge.errors import Forbidden, Unauthorized


def gate(
    *,
    token: str | None = None,
    basic: tuple[str, str] | None = None,
    allowed: str = "",
    proxies: str = "",
) -> Gate:
    def nets(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(p) for p in text.split(",") if p)

    return Gate(
        token=token, basic_auth=basic, allowed_networks=nets(allowed), trusted_proxies=nets(proxies)
    )


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_token_must_match_exactly() -> None:
    g = gate(token="s3cret-token-0123456789")
    assert g.token_matches("s3cret-token-0123456789")
    assert not g.token_matches("s3cret-token-012345678")
    assert not g.token_matches(None)
    assert gate().token_matches(None)
    assert not gate().token_matches("anything")


def test_basic_auth_accepts_the_right_pair_only() -> None:
    g = gate(basic=("venue", "pa:ss"))
    g.check_basic_auth(basic("venue", "pa:ss"))
    wrong = (None, "", basic("venue", "wrong"), basic("other", "pa:ss"), "Bearer x", "Basic !!")
    for header in wrong:
        with pytest.raises(Unauthorized):
            g.check_basic_auth(header)


def test_basic_auth_that_is_not_ascii_is_refused_as_unauthorized() -> None:
    g = gate(basic=("venue", "pa:ss"))
    latin1 = "Basic " + base64.b64encode(b"venue:caf\xe9").decode()  # decodes, is not UTF-8
    for header in ("Basic caf\u00e9", "Basic \udce9\udcff", "Basic dmVudWU6\u00e9", latin1):
        with pytest.raises(Unauthorized):
            g.check_basic_auth(header)


def test_allowlist_uses_the_peer_when_no_proxy_is_trusted() -> None:
    g = gate(allowed="203.0.113.0/24")
    g.check_source("203.0.113.9", None)
    with pytest.raises(Forbidden):
        g.check_source("127.0.0.1", "203.0.113.9")  # a spoofed header is ignored


def test_allowlist_believes_forwarded_for_only_from_trusted_proxies() -> None:
    g = gate(allowed="203.0.113.0/24", proxies="10.0.0.0/8")
    g.check_source("10.1.2.3", "198.51.100.1, 203.0.113.9")
    g.check_source("10.1.2.3", "203.0.113.9, 10.9.9.9")
    with pytest.raises(Forbidden):
        g.check_source("10.1.2.3", "203.0.113.9, 198.51.100.1")
    with pytest.raises(Forbidden):
        g.check_source("10.1.2.3", None)


def test_forwarded_for_hops_may_carry_a_port() -> None:
    g = gate(allowed="203.0.113.0/24,2001:db8::/32", proxies="10.0.0.0/8")
    g.check_source("10.1.2.3", "203.0.113.5:4711")
    g.check_source("10.1.2.3", "[2001:db8::5]:4711, 10.9.9.9:80")
    g.check_source("10.1.2.3", "203.0.113.5, , 10.9.9.9")  # empty list elements are allowed
    with pytest.raises(Forbidden):
        g.check_source("10.1.2.3", "198.51.100.1:4711")


@pytest.mark.parametrize("hop", ["unknown", "203.0.113.5:http", "203.0.113.5:4711:1", "::1]"])
def test_a_forwarded_for_hop_that_is_no_address_is_refused_not_taken_for_the_proxy(
    hop: str,
) -> None:
    # The proxy's own network is allowed: taking it for the client would let anyone in.
    g = gate(allowed="10.0.0.0/8,203.0.113.0/24", proxies="10.0.0.0/8")
    with pytest.raises(Forbidden) as refused:
        g.check_source("10.1.2.3", f"203.0.113.5, {hop}")
    assert refused.value.code == "bad_forwarded_for"


def test_ipv4_mapped_ipv6_peer_matches_ipv4_ranges() -> None:
    gate(allowed="127.0.0.0/8").check_source("::ffff:127.0.0.1", None)
