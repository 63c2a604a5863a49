"""Where runs live in Redis: every key of a run carries the run's hash tag.

```
<prefix>{run:<id>}:events    Stream, entry id <seq>-0, fields t (type) and d (data JSON)
<prefix>{run:<id>}:meta      hash: sealed, dropped, bytes, last (the log's state)
<prefix>{run:<id>}:info      the run's record (RunInfo as JSON; the registry's)
<prefix>{run:<id>}:readers   readers on every instance
<prefix>{run:<id>}:wake      pub/sub channel: the last seq after each append, "sealed" at the end
<prefix>cancel               pub/sub channel: ids of runs to cancel, for the driving instance
```

Redis Cluster hashes only the part between the first ``{`` and ``}``, so all keys of one run
(and its wake channel, for sharded pub/sub) share a slot and one Lua script may touch them all,
while different runs spread over the cluster.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenrelay.errors import NotFound


class RunKeys(NamedTuple):
    events: bytes
    meta: bytes
    info: bytes
    readers: bytes
    wake: bytes

    @property
    def all(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The keys that expire together: what seal and append set the TTL of."""
        return (self.events, self.meta, self.info, self.readers)


class KeyLayout:
    """Builds the key names of one gateway deployment (one ``key_prefix``)."""

    __slots__ = ("cancel_channel", "prefix")

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a key prefix must not contain { or }: it would be every key's tag")
        self.prefix = prefix
        self.cancel_channel = f"{prefix}cancel".encode()

    def run(self, run_id: str) -> RunKeys:
        """The keys of one run.

        Raises:
            NotFound: the id cannot be a run's (a brace would break its hash tag).
        """
        if "{" in run_id or "}" in run_id:
            raise NotFound(f"run {run_id} does not exist or has expired")
        base = f"{self.prefix}{{run:{run_id}}}:"
        return RunKeys(
            (base + "events").encode(),
            (base + "meta").encode(),
            (base + "info").encode(),
            (base + "readers").encode(),
            (base + "wake").encode(),
        )
