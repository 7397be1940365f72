"""The UDP reply cache: a retransmitted cookie gets the stored reply and the command is not
run again (rtpp_command_rcache.c: keyed by cookie alone, 35 s lifetime). Sans-I/O."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

LIFETIME = 35.0          # 32 s + 3 s, as rtpproxy


class ReplyCache:
    def __init__(self, lifetime: float = LIFETIME):
        self.lifetime = lifetime
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, cookie: str, now: float) -> Optional[bytes]:
        self._expire(now)
        hit = self._entries.get(cookie)
        return hit[1] if hit else None

    def put(self, cookie: str, reply: bytes, now: float) -> None:
        self._entries.pop(cookie, None)
        self._entries[cookie] = (now + self.lifetime, reply)
        self._expire(now)

    def _expire(self, now: float) -> None:
        # Insertion order is expiry order because the lifetime is constant.
        while self._entries:
            cookie, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[cookie]

    def __len__(self) -> int:
        return len(self._entries)
