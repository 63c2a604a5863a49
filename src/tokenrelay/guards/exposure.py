"""Secure by default: a gateway reachable from other machines must know who is calling."""

from __future__ import annotations

import ipaddress

from tokenrelay.config import Settings


class InsecureBind(Exception):
    """Serving without authentication on an address other machines can reach."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_access_notice(settings: Settings) -> str | None:
    """What to tell the operator about running without auth; None when auth is configured.

    Raises:
        InsecureBind: no auth on a non-loopback address, and ``auth.insecure_no_auth`` is not set.
    """
    if settings.auth.enabled:
        return None
    host = settings.server.host
    if is_loopback(host):
        return (
            f"no API keys or JWT configured: open to every client of {host} "
            f"(tenant {settings.auth.open_tenant!r})"
        )
    if not settings.auth.insecure_no_auth:
        raise InsecureBind(
            f"refusing to serve on {host} without authentication: configure auth.api_keys or "
            "auth.jwt (docs/security.md), or pass --insecure-no-auth to serve it open"
        )
    return f"--insecure-no-auth: serving {host} with NO authentication; every caller is trusted"
