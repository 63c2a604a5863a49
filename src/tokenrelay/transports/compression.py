"""Content codings of responses: negotiation on ``Accept-Encoding`` and flushing compressors.

A stream is compressed event by event: every ``compress`` call ends with a flush, so the client
can decode each event as soon as its bytes arrive, whatever the compressor would rather buffer.
The stream compressors are tuned for many long-lived streams at once: small windows and hash
tables keep each one's memory down (measured in ``benchmarks/payload.py``), and SSE frames repeat
within a few hundred bytes, so a larger window would gain little.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import brotli  # type: ignore[import-untyped]  # ships no type information
import zstandard

ENCODINGS: Final = ("zstd", "br", "gzip")

# RFC 9110 section 12.4.2: 0 to 1 with at most three decimals.
_QVALUE: Final = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)")
_ALIASES: Final = {"x-gzip": "gzip"}  # RFC 9110 section 8.4.1.3

_GZIP_LEVEL: Final = 6
_GZIP_WINDOW_BITS: Final = 16 + 12  # gzip framing, 4 KiB window
_GZIP_MEMORY_LEVEL: Final = 5
_BROTLI_QUALITY: Final = 5  # above 5 each event costs several times the CPU for a few bytes
_BROTLI_WINDOW_BITS: Final = 14
_ZSTD_LEVEL: Final = 3
_ZSTD_STREAM_PARAMETERS: Final = zstandard.ZstdCompressionParameters.from_level(
    _ZSTD_LEVEL, window_log=12, hash_log=10, chain_log=10
)


def choose_encoding(accept_encoding: str | None, offered: Sequence[str]) -> str | None:
    """The content coding to answer with, or None for none (identity).

    ``Accept-Encoding`` is read as RFC 9110 section 12.5.3 says: codings with optional q-values,
    ``q=0`` refusing one, ``*`` standing for every coding not named. The client's highest weight
    wins; among equal weights, the earlier in ``offered``. A request without the header, or with an
    empty one, is not compressed. When the client accepts none of ``offered`` the answer is
    identity, even if it refused identity too: the RFC allows it, and an error would help no one.

    Args:
        accept_encoding: the request's header, None when absent.
        offered: the codings this gateway may use, in order of preference (``ENCODINGS``' names).
    """
    if not accept_encoding or not offered:
        return None
    weights = _weights(accept_encoding)
    anything = weights.get("*", 0.0)
    chosen, chosen_weight = None, 0.0
    for coding in offered:
        weight = weights.get(coding, anything)
        if weight > chosen_weight:
            chosen, chosen_weight = coding, weight
    return chosen


def _weights(accept_encoding: str) -> dict[str, float]:
    """Coding name to q-value; an element with a malformed q-value is ignored, not guessed at."""
    weights: dict[str, float] = {}
    for element in accept_encoding.split(","):
        coding, _, parameters = element.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight: float | None = 1.0
        for parameter in parameters.split(";") if parameters else ():
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                weight = float(value) if _QVALUE.fullmatch(value) else None
        if weight is not None:
            weights.setdefault(_ALIASES.get(coding, coding), weight)
    return weights


class StreamCompressor(Protocol):
    """Compresses one response body, flushing after every chunk."""

    encoding: str  # the Content-Encoding it produces

    def compress(self, chunk: bytes) -> bytes:
        """``chunk`` compressed and flushed: decodable by the client without what follows."""

    def finish(self) -> bytes:
        """The end of the compressed body; the compressor is not used again."""


class GzipStreamCompressor:
    encoding = "gzip"

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(
            _GZIP_LEVEL, zlib.DEFLATED, _GZIP_WINDOW_BITS, _GZIP_MEMORY_LEVEL
        )

    def compress(self, chunk: bytes) -> bytes:
        return self._compressor.compress(chunk) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)


class BrotliStreamCompressor:
    encoding = "br"

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        self._compressor = brotli.Compressor(
            mode=brotli.MODE_TEXT, quality=_BROTLI_QUALITY, lgwin=_BROTLI_WINDOW_BITS
        )

    def compress(self, chunk: bytes) -> bytes:
        compressed: bytes = self._compressor.process(chunk) + self._compressor.flush()
        return compressed

    def finish(self) -> bytes:
        end: bytes = self._compressor.finish()
        return end


class ZstdStreamCompressor:
    encoding = "zstd"

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        # One ZstdCompressor per stream: its compression objects share the compressor's context.
        compressor = zstandard.ZstdCompressor(compression_params=_ZSTD_STREAM_PARAMETERS)
        self._compressor = compressor.compressobj()

    def compress(self, chunk: bytes) -> bytes:
        return self._compressor.compress(chunk) + self._compressor.flush(
            zstandard.COMPRESSOBJ_FLUSH_BLOCK
        )

    def finish(self) -> bytes:
        return self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


_STREAM_COMPRESSORS: Final[Mapping[str, type[StreamCompressor]]] = {
    "gzip": GzipStreamCompressor,
    "br": BrotliStreamCompressor,
    "zstd": ZstdStreamCompressor,
}


def open_stream_compressor(encoding: str) -> StreamCompressor:
    """A new compressor for one streamed response.

    Raises:
        ValueError: ``encoding`` is not one of ``ENCODINGS``.
    """
    try:
        return _STREAM_COMPRESSORS[encoding]()
    except KeyError:
        raise ValueError(f"unknown content coding {encoding!r}") from None


def compress_body(body: bytes, encoding: str) -> bytes:
    """A whole response body compressed in one go (nothing to flush early).

    Raises:
        ValueError: ``encoding`` is not one of ``ENCODINGS``.
    """
    if encoding == "gzip":
        return zlib.compress(body, _GZIP_LEVEL, wbits=31)
    if encoding == "br":
        return bytes(brotli.compress(body, mode=brotli.MODE_TEXT, quality=_BROTLI_QUALITY))
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
    raise ValueError(f"unknown content coding {encoding!r}")
