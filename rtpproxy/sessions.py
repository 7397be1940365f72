"""Sessions as rtpproxy models them, sans-I/O.

A session is one media line of one call: call-id + from_tag exactly as sent
(Kamailio appends ";<medianum>"). It has two sides, rtpproxy's stream[0] and
stream[1]. Side i owns local port pair P_i; its remote is the party that sends
to P_i. A packet arriving on side i leaves through side (1-i)'s socket towards
side (1-i)'s remote. Side 0 gets its port from the first U (its remote is the
callee), side 1 from the first L (its remote is the caller).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from rtpproxy.latch import LatchState


@dataclass
class Side:
    rtp: LatchState = field(default_factory=LatchState)
    rtcp: LatchState = field(default_factory=lambda: LatchState(is_rtp=False))
    pair: Any = None                 # ports.PortPair once a port is allocated
    local_host: Optional[str] = None # bind address of the pair
    advertised: Optional[str] = None # address shown in U/L replies (None: port only)
    rtp_id: Optional[int] = None     # engine stream ids
    rtcp_id: Optional[int] = None
    codecs: Optional[str] = None
    weak: bool = False
    onhold: bool = False

    @property
    def port(self) -> Optional[int]:
        return self.pair.port if self.pair else None


@dataclass
class Session:
    call_id: str
    from_tag: str
    created: float
    to_tag: Optional[str] = None
    sides: tuple[Side, Side] = field(default_factory=lambda: (Side(), Side()))
    last_signal: float = 0.0
    complete: bool = False
    strong: bool = False
    notify: Optional[tuple[str, str]] = None     # (target, tag)
    gen: int = 0

    def alive(self) -> bool:
        return self.strong or self.sides[0].weak or self.sides[1].weak

    @property
    def label(self) -> str:
        return f"{self.call_id} {self.from_tag}"


def medianum(tag: str) -> Optional[str]:
    """The ';N' suffix clients append to tags, without the ';' (None if absent)."""
    head, sep, tail = tag.rpartition(";")
    return tail if sep and head else None


def find_stream(session_tag: str, from_tag: str, to_tag: Optional[str]) -> int:
    """rtpproxy's find_stream: 0 if the command names the session from its creator's side,
    1 from the other side, -1 if it does not name this session (exact tags, §2.11)."""
    if session_tag == from_tag:
        return 0
    if to_tag is None:
        return -1
    if session_tag == to_tag:
        return 1
    num = medianum(from_tag)
    if num is not None and session_tag == f"{to_tag};{num}":
        return 1
    return -1


def tag_prefix_match(stored: str, given: str) -> bool:
    """compare_session_tags for D/R/N: exact, or the stored tag is '<given>;N'."""
    return stored == given or (stored.startswith(given + ";") and ";" not in stored[len(given) + 1:])


class SessionTable:
    def __init__(self) -> None:
        self._by_call: dict[str, list[Session]] = {}
        self.count = 0

    def __iter__(self) -> Iterator[Session]:
        for sessions in self._by_call.values():
            yield from sessions

    def __len__(self) -> int:
        return self.count

    def contains(self, s: Session) -> bool:
        return any(x is s for x in self._by_call.get(s.call_id, ()))

    def add(self, s: Session) -> None:
        self._by_call.setdefault(s.call_id, []).append(s)
        self.count += 1

    def remove(self, s: Session) -> None:
        lst = self._by_call.get(s.call_id, [])
        if s in lst:
            lst.remove(s)
            self.count -= 1
            if not lst:
                del self._by_call[s.call_id]

    def lookup(self, call_id: str, from_tag: str, to_tag: Optional[str]) -> tuple[Optional[Session], int]:
        """The session a U/L/P/S/Q/C names, and find_stream's index for it."""
        for s in self._by_call.get(call_id, ()):
            i = find_stream(s.from_tag, from_tag, to_tag)
            if i >= 0:
                return s, i
        return None, -1

    def matching(self, call_id: str, from_tag: str, to_tag: Optional[str]) -> list[tuple[Session, int]]:
        """Every session D/R/N act on (prefix tag matching), with the side the match came from."""
        out = []
        for s in self._by_call.get(call_id, ()):
            if tag_prefix_match(s.from_tag, from_tag):
                out.append((s, 0))
            elif to_tag is not None and tag_prefix_match(s.from_tag, to_tag):
                out.append((s, 1))
        return out


def remaining_ttl(s: Session, now: float, rx: tuple[float, float], ttl: float, setup_ttl: float,
                  independent: bool) -> float:
    """Seconds left before the session times out. rx holds the last accepted packet time
    (monotonic seconds, 0 = never) on each side. The clock restarts on every U/L and, by
    default, on a packet in either direction; with independent TTLs each direction must
    keep its own media flowing."""
    limit = ttl if s.complete else setup_ttl
    if independent:
        return min(limit - (now - max(s.last_signal, r)) for r in rx)
    return limit - (now - max(s.last_signal, *rx))
