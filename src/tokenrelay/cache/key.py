"""What makes two requests the same request, and which requests may share an answer.

Two requests are the same when they would make the same upstream generate the same thing for
the same tenant: every field of the body counts except those that only shape how the answer is
carried (``stream``, ``stream_options``, ``detach``). Key order and whitespace do not count,
since the key hashes the parsed body re-encoded with sorted keys. Values are compared as JSON
spells them: ``0`` and ``0.0`` are different keys (a miss, never a wrong hit).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from tokenrelay.config import CachePolicy

# Fields that change how an answer travels, not what it says.
TRANSPORT_FIELDS = frozenset({"stream", "stream_options", "detach"})


def cache_key(tenant: str, upstream: str, body: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a canonical form of a request.

    Args:
        tenant: the caller's tenant; tenants never share entries.
        upstream: what answers the request (the upstream's URL, or the agent's name).
        body: the parsed request body.
    """
    request = {name: value for name, value in body.items() if name not in TRANSPORT_FIELDS}
    canonical = orjson.dumps([tenant, upstream, request], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def cacheable(policy: CachePolicy, body: dict[str, Any]) -> bool:
    """Whether a request's answer may be stored and shared under ``policy``.

    ``deterministic`` accepts only greedy decoding of one choice: ``temperature`` present and 0
    (absent means the upstream's default, 1) and ``n`` absent or 1. Anything else a request may
    set (``top_p``, ``seed``, penalties) is part of the key, so it cannot make a wrong hit.
    """
    if policy == "never":
        return False
    if policy == "always":
        return True
    n = body.get("n")
    return _is_number(body.get("temperature"), 0) and (n is None or _is_number(n, 1))


def _is_number(value: object, expected: int) -> bool:
    # JSON true and false are not numbers, even though True == 1 and False == 0 in Python.
    return isinstance(value, int | float) and not isinstance(value, bool) and value == expected
