"""A session's recent output, addressed by absolute byte offset, for lossless reattach. Pure."""

from __future__ import annotations

from collections import deque

DEFAULT_CAPACITY = 1024 * 1024
# Small chunks (keystroke echoes) are merged up to this size, so 1 MiB of echo is not a million
# tiny objects; larger chunks are kept as they came.
_COALESCE = 16 * 1024


class OutputBuffer:
    """Keeps at least the last `capacity` bytes ever appended (at most one chunk more).

    `total` counts every byte appended since the session began; `start` is the offset of the
    oldest byte still held. A reader at offset N can be served exactly when N >= start.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, start: int = 0) -> None:
        """`start`: the offset of the first byte to come (a gateway that adopted a running shell
        continues its numbering)."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self.total = start

    @property
    def start(self) -> int:
        return self.total - self._held

    @property
    def held(self) -> int:
        """Bytes held now (the buffer's memory, give or take object overhead)."""
        return self._held

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self._chunks and len(self._chunks[-1]) + len(data) <= _COALESCE:
            self._chunks[-1] += data
        else:
            self._chunks.append(bytes(data))
        self._held += len(data)
        self.total += len(data)
        while self._held - len(self._chunks[0]) >= self.capacity:
            self._held -= len(self._chunks.popleft())

    def read(self, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes from absolute `offset` (start <= offset <= total)."""
        if not self.start <= offset <= self.total:
            raise ValueError(f"offset {offset} outside [{self.start}, {self.total}]")
        if offset == self.total or limit <= 0:
            return b""
        # Walk back from the newest chunk: readers are almost always near the tail.
        position = self.total
        index = len(self._chunks)
        while position > offset:
            index -= 1
            position -= len(self._chunks[index])
        out = bytearray()
        skip = offset - position
        while index < len(self._chunks) and len(out) < limit:
            chunk = self._chunks[index]
            out += chunk[skip : skip + limit - len(out)]
            skip = 0
            index += 1
        return bytes(out)
