"""Who may post: path token, HTTP basic auth and an IP allowlist.

The sender signs nothing, so authenticity rests on a secret in the URL (a path token or
``https://user:pass@host/...``) and, optionally, on where the request comes from. Secrets are
compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from dataclasses import dataclass

from bridge.errors import Forbidden, Unauthorized
from bridge.settings import BridgeSettings, Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(text: str | None) -> IPAddress | None:
    """An address as peers and proxies write it: bare, ``v4:port`` or ``[v6]:port``."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port (an IPv6 address has at least two colons)
        host, _, port = text.partition(":")
        if port.isascii() and port.isdigit():
            text = host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _within(address: IPAddress, networks: tuple[Network, ...]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class Gate:
    """The checks a webhook request passes before its body is read."""

    token: str | None
    basic_auth: tuple[str, str] | None
    allowed_networks: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...]

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> Gate:
        basic = None
        if settings.basic_auth_username is not None and settings.basic_auth_password is not None:
            basic = (settings.basic_auth_username, settings.basic_auth_password)
        return cls(
            token=settings.token,
            basic_auth=basic,
            allowed_networks=settings.allowed_networks,
            trusted_proxies=settings.trusted_proxies,
        )

    def token_matches(self, presented: str | None) -> bool:
        if self.token is None:
            return presented is None
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def client_address(self, peer: str | None, forwarded_for: str | None) -> IPAddress | None:
        """The client as far as trusted proxies vouch for it (X-Forwarded-For, from the right).

        Raises :class:`Forbidden` (``bad_forwarded_for``) when a hop a trusted proxy passed on
        is not an address: who sent the request cannot be told.
        """
        address = _parse_ip(peer)
        if address is None or not forwarded_for or not _within(address, self.trusted_proxies):
            return address
        for hop in reversed(forwarded_for.split(",")):
            if not hop.strip():
                continue  # an empty list element, which HTTP allows
            hop_address = _parse_ip(hop)
            if hop_address is None:
                # Stopping here would take the last proxy for the client.
                raise Forbidden(
                    "X-Forwarded-For holds a hop that is not an IP address: the client is unknown",
                    code="bad_forwarded_for",
                )
            address = hop_address
            if not _within(address, self.trusted_proxies):
                return address
        return address

    def check_source(self, peer: str | None, forwarded_for: str | None) -> None:
        if not self.allowed_networks:
            return
        address = self.client_address(peer, forwarded_for)
        if address is None or not _within(address, self.allowed_networks):
            raise Forbidden("source address is not in the allowlist")

    def check_basic_auth(self, authorization: str | None) -> None:
        if self.basic_auth is None:
            return
        user, password = self.basic_auth
        presented = _basic_credentials(authorization)
        if presented is None:
            raise Unauthorized("basic authentication required")
        user_ok = hmac.compare_digest(presented[0].encode(), user.encode())
        password_ok = hmac.compare_digest(presented[1].encode(), password.encode())
        if not (user_ok and password_ok):
            raise Unauthorized("basic authentication failed")


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (non-ASCII text included), or not UTF-8 once decoded
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
