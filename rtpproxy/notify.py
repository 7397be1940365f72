"""Timeout notifications (rtpp_notify.c behaviour): on session timeout write '<tag>\\n' to the
target the U named, over a stream connection that is kept open and reopened once on failure."""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from rtpproxy.config import NotifyTarget

log = logging.getLogger("rtpproxy.notify")

CONNECT_TIMEOUT = 2.0


class Notifier:
    def __init__(self) -> None:
        self._writers: dict[tuple, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.failed = 0

    def notify(self, target: NotifyTarget, tag: str) -> None:
        """Queue one notification; never blocks the caller."""
        task = asyncio.get_running_loop().create_task(self._send(target, tag))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, target: NotifyTarget, tag: str) -> None:
        line = (tag + "\n").encode("latin-1")
        for attempt in (1, 2):
            try:
                writer = await self._writer(target)
                writer.write(line)
                await writer.drain()
                self.sent += 1
                return
            except (TimeoutError, OSError) as exc:
                self._drop(target)
                if attempt == 2:
                    self.failed += 1
                    log.warning("timeout notification %r to %s failed: %s", tag, target.spec, exc)

    async def _writer(self, target: NotifyTarget) -> asyncio.StreamWriter:
        key = (target.kind, target.path, target.host, target.port)
        w = self._writers.get(key)
        if w is not None and not w.is_closing():
            return w
        if target.kind == "unix":
            coro = asyncio.open_unix_connection(target.path)
        else:
            coro = asyncio.open_connection(target.host, target.port)
        _reader, w = await asyncio.wait_for(coro, CONNECT_TIMEOUT)
        self._writers[key] = w
        return w

    def _drop(self, target: NotifyTarget) -> None:
        w: Optional[asyncio.StreamWriter] = self._writers.pop(
            (target.kind, target.path, target.host, target.port), None)
        if w is not None:
            w.close()

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CONNECT_TIMEOUT)
        for w in self._writers.values():
            w.close()
        self._writers.clear()
