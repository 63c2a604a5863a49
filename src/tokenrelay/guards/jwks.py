"""JWKSClient: the signing keys of an identity provider, fetched from its JWKS URL and cached.

Keys are kept by ``kid``. A ``kid`` the cache does not know makes the client fetch the set again
(a provider rotating its keys publishes the new one before it signs with it), but never more
often than ``min_refresh_interval``: tokens naming random kids must not turn the gateway into
a flood of requests to the provider. Lookups that arrive while a fetch is in flight wait for
that fetch instead of starting their own. When the provider cannot be reached, the keys of the
last good fetch stay in use, however old: an outage of the provider is not an outage of ours.

The fetch is asynchronous (aiohttp) on purpose: PyJWT's own ``PyJWKClient`` does blocking I/O,
which would stall every stream of the process while it waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

logger = structlog.get_logger("tokenrelay.auth")

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
PUBLIC_KEY_TYPES = (RSAPublicKey, EllipticCurvePublicKey, Ed25519PublicKey, Ed448PublicKey)

# A key set is a few kilobytes; anything much larger is not one.
_MAX_JWKS_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that verifies token signatures.

    ``algorithm`` is the one algorithm the key is bound to when its publisher named one (a JWK's
    ``alg``); None lets any allowed algorithm of the key's family use it.
    """

    key: PublicKey
    algorithm: str | None = None


class JWKSUnusable(ValueError):
    """The provider answered, but not with a key set we can use."""


class JWKSClient:
    """The keys of one JWKS URL, cached by ``kid``.

    Args:
        url: where the JSON Web Key Set is published.
        session: the HTTP client session to fetch with (its owner closes it).
        cache_ttl: seconds a fetched set is trusted; after it, a lookup fetches it again.
        min_refresh_interval: seconds between two fetches at least, whatever asks for them.
        timeout: seconds one fetch may take in all.
        clock: monotonic seconds; tests pass their own.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        cache_ttl: float = 300.0,
        min_refresh_interval: float = 30.0,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._session = session
        self._cache_ttl = cache_ttl
        self._min_refresh_interval = min_refresh_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None  # of the last fetch that succeeded
        self._attempted_at: float | None = None  # of the last fetch, whatever its outcome
        self._in_flight: asyncio.Task[None] | None = None

    async def get_key(self, kid: str) -> VerificationKey | None:
        """The key named ``kid``, fetching the set first if it may be out of date.

        Returns None when the provider does not publish that key (or, with nothing cached yet,
        cannot be reached); never raises for a provider's failure.
        """
        now = self._clock()
        fresh = self._fetched_at is not None and now - self._fetched_at < self._cache_ttl
        if fresh and kid in self._keys:
            return self._keys[kid]
        if self._in_flight is None and self._may_fetch(now):
            self._attempted_at = now
            # A context of its own: it serves every waiting request, it must not log as the first.
            self._in_flight = asyncio.get_running_loop().create_task(
                self._refresh(), name="jwks refresh", context=contextvars.Context()
            )
        if self._in_flight is not None:
            # Shielded: a caller that goes away must not cancel the fetch the others wait for.
            await asyncio.shield(self._in_flight)
        return self._keys.get(kid)

    async def close(self) -> None:
        """Stop a fetch in flight (the session is its owner's to close)."""
        task, self._in_flight = self._in_flight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._min_refresh_interval

    async def _refresh(self) -> None:
        """Fetch the set; on failure keep the keys there are and say so once per attempt."""
        try:
            keys = await self._download()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.warning(
                "jwks_fetch_failed",
                url=self._url,
                error=type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
                cached_keys=len(self._keys),
            )
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            logger.info("jwks_fetched", url=self._url, keys=len(keys))
        finally:
            self._in_flight = None

    async def _download(self) -> dict[str, VerificationKey]:
        async with self._session.get(
            self._url, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise JWKSUnusable(f"answered HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65_536):
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise JWKSUnusable(f"larger than {_MAX_JWKS_BYTES} bytes")
        return parse_key_set(orjson.loads(body))


def parse_key_set(document: Any) -> dict[str, VerificationKey]:
    """The signing keys of a JWKS document, by ``kid``.

    Keys without a ``kid``, meant for encryption, private, symmetric or of a type PyJWT does not
    know are left out: none of them may verify a token here.

    Raises:
        JWKSUnusable: the document is not a key set, or holds no usable key.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JWKSUnusable('not a JSON Web Key Set (no "keys" list)')
    keys: dict[str, VerificationKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid, use, algorithm = entry.get("kid"), entry.get("use"), entry.get("alg")
        if not isinstance(kid, str) or use not in (None, "sig"):
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, TypeError, ValueError):  # TypeError: an ``alg`` that is a list
            continue
        if isinstance(key, PUBLIC_KEY_TYPES):
            keys[kid] = VerificationKey(key, algorithm if isinstance(algorithm, str) else None)
    if not keys:
        raise JWKSUnusable("no usable signing key")
    return keys
