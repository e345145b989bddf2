"""The byte path of a web terminal: the shell's output into a replayable buffer, and from there to
the one front door attached to it, with flow control and a grace period for coming back.

The SSH door does not use this: its channels are joined to the container's with `redirect()`.
A `Stream` knows nothing of the session manager; it is told how long the grace is and what to
call when it runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from .outbuf import OutputBuffer
from .upstream import Shell

READ_CHUNK = 65536
# Output flow control. Attached: the pump reads ahead of what the person's socket took by at most
# ATTACHED_WINDOW (keeps a runaway `yes` from queueing seconds of output ahead of Ctrl-C).
# Detached: it stops reading (the shell pauses when it next writes) while less than
# IN_FLIGHT_RESERVE bytes before the drop would still be replayable; what was in flight when the
# socket died (send buffers, bounded by SEND_BUFFER in the web door) can be replayed exactly.
ATTACHED_WINDOW = 256 * 1024
IN_FLIGHT_RESERVE = 1024 * 1024 - READ_CHUNK


class StreamSink(Protocol):
    """A front door reading a shell's output. It may drop and come back: see `Stream.attach`."""

    async def attached(self, offset: int, lost: int) -> None:
        """Called before any output: the stream starts at `offset`; `lost` bytes were too old."""

    async def output(self, data: bytes) -> None: ...

    async def superseded(self) -> None:
        """Another attach took this stream over; this sink gets nothing more."""


class WatchSink(Protocol):
    """An admin's view of a stream (watch or join): output only, and told when it skipped."""

    async def output(self, data: bytes) -> None: ...

    async def gap(self, lost: int) -> None:
        """`lost` bytes went by while this view was too slow to take them."""


class Attachment:
    """One front door reading the output from `cursor` on, in its own sender task."""

    def __init__(self, stream: Stream, sink: StreamSink, cursor: int) -> None:
        self.stream = stream
        self.sink = sink
        self.cursor = cursor
        self.task: asyncio.Task | None = None

    async def send(self) -> None:
        stream, output = self.stream, self.stream.output
        while True:
            if self.cursor < output.total:
                data = output.read(self.cursor, READ_CHUNK)
                await self.sink.output(data)
                self.cursor += len(data)
                stream.space.set()
            else:
                stream.more.clear()
                await stream.more.wait()

    async def flush(self, timeout: float) -> None:
        """Wait until the sink took everything the pump read (the shell's last words)."""
        try:
            async with asyncio.timeout(timeout):
                while self.task is not None and not self.task.done() and self.cursor < self.stream.output.total:
                    self.stream.space.clear()
                    await self.stream.space.wait()
        except TimeoutError:
            self.stream.log.info("output not flushed to the front door within %.0f s", timeout)

    def stop(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class Watcher:
    """An extra reader of a stream (an admin watching or joined): it never holds the pump back.
    One that falls more than the buffer behind skips ahead (and its sink hears of the gap), so a
    slow admin's browser cannot slow the owner's shell."""

    def __init__(self, stream: Stream, sink: WatchSink) -> None:
        self.stream = stream
        self.sink = sink
        self.cursor = stream.output.start  # the whole buffer: the current screen, replayed
        self.task: asyncio.Task | None = None

    async def send(self) -> None:
        output = self.stream.output
        while True:
            if self.cursor < output.start:
                lost, self.cursor = output.start - self.cursor, output.start
                await self.sink.gap(lost)
            elif self.cursor < output.total:
                data = output.read(self.cursor, READ_CHUNK)
                self.cursor += len(data)
                await self.sink.output(data)
            else:
                self.stream.more.clear()
                await self.stream.more.wait()

    def stop(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class Stream:
    """One shell's output: the buffer, the pump that fills it, the attachment that drains it, and
    the grace timer that runs while nobody is attached."""

    def __init__(
        self,
        shell: Shell,
        log: logging.LoggerAdapter,
        *,
        name: str,
        note_output: Callable[[bytes], None],
        grace: float,
        abandoned: Callable[[], Awaitable[None]],
        dropped: Callable[[StreamSink], None],
        start: int = 0,
    ) -> None:
        self.shell = shell
        self.log = log
        self.name = name
        self.output = OutputBuffer(start=start)  # the holder's numbering: `start` is its offset
        self.attachment: Attachment | None = None
        self.watchers: list[Watcher] = []
        self.detached_cursor = start  # what the last attachment had taken when it went
        self.attached_once = False
        self.more = asyncio.Event()  # more output, or the stream closes
        self.space = asyncio.Event()  # a reader advanced, or attachments changed
        self._note_output = note_output
        self._grace_seconds = grace
        self._abandoned = abandoned  # the grace ran out
        self._dropped = dropped  # a sink failed while sending: its owner detaches it
        self._grace: asyncio.Task | None = None

    def _may_read(self) -> bool:
        total = self.output.total
        if self.attachment is not None:
            return total - self.attachment.cursor < ATTACHED_WINDOW
        keep_from = max(0, self.detached_cursor - IN_FLIGHT_RESERVE)
        return total + READ_CHUNK - keep_from <= self.output.capacity

    async def pump(self) -> None:
        """Shell output into the buffer until the shell closes it, with flow control: when the
        reader falls behind (see `_may_read`) we stop reading, and SSH windowing stops the
        container. Raises ConnectionError if the connection breaks."""
        while True:
            while not self._may_read():
                self.space.clear()
                await self.space.wait()
            data = await self.shell.read(READ_CHUNK)
            if not data:
                return
            self.output.append(data)
            self._note_output(data)
            self.more.set()

    async def attach(self, sink: StreamSink, offset: int = 0) -> Attachment:
        """Attach `sink` from byte `offset` on. A sink already attached is superseded. Bytes older
        than the buffer are reported as lost."""
        offset = max(0, min(offset, self.output.total))
        start = max(offset, self.output.start)
        old = self.attachment
        if old is not None:
            old.stop()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await old.sink.superseded()
            self.log.info("attachment superseded by a new one")
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        attachment = Attachment(self, sink, start)
        self.attachment = attachment
        self.attached_once = True
        await sink.attached(start, start - offset)
        attachment.task = asyncio.create_task(self._run(attachment), name=f"send-{self.name}")
        self.space.set()
        return attachment

    def watch(self, sink: WatchSink) -> Watcher:
        """Add a reader that starts at the oldest byte kept and follows live, beside the
        attachment (never instead of it). The caller stops it with `unwatch`."""
        watcher = Watcher(self, sink)
        self.watchers.append(watcher)
        watcher.task = asyncio.create_task(self._run_watcher(watcher), name=f"watch-{self.name}")
        return watcher

    async def _run_watcher(self, watcher: Watcher) -> None:
        try:
            await watcher.send()
        except (ConnectionError, RuntimeError) as exc:
            self.log.info("a watcher went away while sending: %r", exc)

    def unwatch(self, watcher: Watcher) -> None:
        watcher.stop()
        if watcher in self.watchers:
            self.watchers.remove(watcher)

    async def _run(self, attachment: Attachment) -> None:
        try:
            await attachment.send()
        except (ConnectionError, RuntimeError) as exc:
            self.log.info("front door went away while sending: %r", exc)
            self._dropped(attachment.sink)

    def detach(self, sink: StreamSink) -> None:
        """`sink`'s front door went away: the grace starts. A no-op when another sink has taken
        over, or the grace already runs."""
        attachment = self.attachment
        if attachment is not None:
            if attachment.sink is not sink:
                return
            attachment.stop()
            self.attachment = None
            self.detached_cursor = attachment.cursor
            self.space.set()
        elif self._grace is not None:
            return
        # A page that never received its session message has nothing to come back to.
        grace = self._grace_seconds if self.attached_once else 0.0
        self.log.info("detached; %.0f s to reattach", grace)
        self._grace = asyncio.create_task(self._expire(grace), name=f"grace-{self.name}")

    async def _expire(self, grace: float) -> None:
        await asyncio.sleep(grace)
        if self.attachment is None:
            await self._abandoned()

    async def close(self) -> None:
        """The session ends: the grace stops, the attached sink gets what was read (briefly)."""
        if self._grace is not None and self._grace is not asyncio.current_task():
            self._grace.cancel()
        for watcher in list(self.watchers):
            self.unwatch(watcher)
        attachment = self.attachment
        if attachment is not None:
            await attachment.flush(timeout=2)
            attachment.stop()
            self.attachment = None
