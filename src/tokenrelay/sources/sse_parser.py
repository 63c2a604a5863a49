"""Incremental parser for an upstream's Server-Sent Events byte stream.

Only the ``data`` field matters for OpenAI-compatible streams; comments, ``event``, ``id`` and
``retry`` lines are accepted and ignored. The common frame ``data: {...}\\n\\n`` takes a fast path.
"""

from __future__ import annotations


class SSEDataParser:
    """Feed bytes as they arrive; get back the ``data`` payload of each complete event."""

    __slots__ = ("_after_cr", "_buffer")

    MAX_EVENT_BYTES = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = b""
        self._after_cr = False  # the last chunk ended in \r: a \n starting the next is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the data payloads of the events completed by ``chunk`` (may be empty).

        Raises:
            ValueError: an event grew past ``MAX_EVENT_BYTES`` without ending.
        """
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        frames = buffer.split(b"\n\n")
        self._buffer = frames.pop()
        if len(self._buffer) > self.MAX_EVENT_BYTES:
            raise ValueError("an upstream event exceeded the size limit")
        payloads = []
        for frame in frames:
            if frame.startswith(b"data: ") and b"\n" not in frame:
                payloads.append(frame[6:])
            elif frame:
                data = _data_of(frame)
                if data is not None:
                    payloads.append(data)
        return payloads

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return self._buffer


def _data_of(frame: bytes) -> bytes | None:
    """The joined ``data`` lines of one multi-line frame, or None if it carries no data."""
    lines = []
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        elif not line or line.startswith(b":"):
            continue
        elif line.split(b":", 1)[0] not in (b"event", b"id", b"retry"):
            raise ValueError(f"not a Server-Sent Events line: {line[:80]!r}")
    return b"\n".join(lines) if lines else None
