"""RedisAPIKeyStore: API keys that every instance finds in Redis, by the SHA-256 of the key.

```
<prefix>api_keys    hash: field <sha256 hex of the key>, value {"name", "tenant", "scopes"} (JSON)
```

Operators add and revoke keys while the gateways run (``put``, ``delete``, or ``HSET``/``HDEL``
by hand); the next request sees the change. Lookups of concurrent requests share round trips, so a
burst of new requests does not need a connection each.
"""

from __future__ import annotations

import re

import orjson
import structlog

from tokenrelay.backends.redis_batch import PipelineBatcher
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.guards.auth import APIKeyRecord

logger = structlog.get_logger("tokenrelay.store")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class RedisAPIKeyStore:
    """An APIKeyStore in one Redis hash.

    Args:
        store: the Redis connection (its owner closes it, after this).
    """

    def __init__(self, store: RedisStore) -> None:
        self._key = f"{store.keys.prefix}api_keys".encode()
        self._calls = PipelineBatcher(store)

    async def find(self, sha256_hex: str) -> APIKeyRecord | None:
        """The record of the key with this hash, or None.

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        raw = await self._calls.command("HGET", self._key, sha256_hex).done
        return None if raw is None else _decode(raw, sha256_hex)

    async def put(self, sha256_hex: str, record: APIKeyRecord) -> None:
        """Add a key, or replace what it stands for.

        Args:
            sha256_hex: ``hash_api_key(key)``; the key itself is never stored.
            record: its name, tenant and scopes.

        Raises:
            ValueError: ``sha256_hex`` is not a lowercase hex SHA-256.
            StoreUnavailable: Redis cannot be reached.
        """
        if _SHA256_HEX.fullmatch(sha256_hex) is None:
            raise ValueError("sha256_hex must be 64 lowercase hex digits")
        value = orjson.dumps(
            {"name": record.name, "tenant": record.tenant, "scopes": sorted(record.scopes)}
        )
        await self._calls.command("HSET", self._key, sha256_hex, value).done

    async def delete(self, sha256_hex: str) -> bool:
        """Revoke a key; whether there was one with this hash.

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        removed = await self._calls.command("HDEL", self._key, sha256_hex).done
        return bool(removed)

    async def close(self) -> None:
        """Stop sending lookups (the Redis client is the store's)."""
        await self._calls.close()


def _decode(raw: bytes, sha256_hex: str) -> APIKeyRecord | None:
    """A stored record; one that is not valid denies its key (and is logged), it is not a 500."""
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        fields = None
    if isinstance(fields, dict):
        name, tenant, scopes = fields.get("name"), fields.get("tenant"), fields.get("scopes", [])
        if (
            isinstance(name, str)
            and isinstance(tenant, str)
            and 0 < len(tenant) <= 128
            and isinstance(scopes, list)
            and all(isinstance(scope, str) for scope in scopes)
        ):
            return APIKeyRecord(name, tenant, frozenset(scopes))
    # The hash's first characters name the record for the operator; they say nothing of the key.
    logger.error("api_key_record_malformed", field=sha256_hex[:12])
    return None
