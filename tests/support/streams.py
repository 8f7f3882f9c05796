"""Input streams for feeding the MTOM parser: `GeneratedStream` hands out the bytes of a
generator on demand, so a test or benchmark can send a body of any size without holding it."""

from __future__ import annotations

from collections.abc import Iterator


class GeneratedStream:
    """A file-like object whose bytes come from a generator, never all in memory."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.pending = b""

    def read(self, n: int = -1) -> bytes:
        while len(self.pending) < n:
            nxt = next(self.chunks, None)
            if nxt is None:
                break
            self.pending = self.pending + nxt if self.pending else nxt
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
