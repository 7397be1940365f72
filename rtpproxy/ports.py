"""Media port allocation: even RTP / odd RTCP pairs, randomised, quarantined after release.

PortPool is sans-I/O (it takes `now`); bind_pair does the binding and moves on to
the next candidate when a port is taken by another program.
"""
from __future__ import annotations

import collections
import errno
import heapq
import random
import socket
from dataclasses import dataclass
from typing import Iterable, Optional

from rtpproxy.errors import PortsExhausted

QUARANTINE_S = 10.0          # a released pair is not handed out again for this long, so late
                             # packets of an ended call cannot reach the next call on that port
RCVBUF = 256 * 1024          # rtpproxy's per-socket receive buffer
DEFAULT_TOS = 0xB8           # EF, as rtpproxy's -t default


def port_range(min_port: int, max_port: int) -> tuple[int, int]:
    """rtpproxy's rounding: -m rounds up to even; the highest RTP port leaves room for RTCP."""
    lo = min_port + (min_port & 1)
    hi = max_port - 1 if max_port & 1 else max_port - 2
    return lo, hi


class PortPool:
    """RTP port numbers (even) for one address family."""

    def __init__(self, min_port: int, max_port: int, sequential: bool = False,
                 skip: Iterable[int] = (), rng: Optional[random.Random] = None,
                 quarantine: float = QUARANTINE_S):
        lo, hi = port_range(min_port, max_port)
        skipped = set(skip)
        ports = [p for p in range(lo, hi + 1, 2) if p not in skipped and p + 1 not in skipped]
        if not ports:
            raise ValueError(f"no RTP port pair fits in {min_port}..{max_port}")
        self.sequential = sequential
        self.quarantine = quarantine
        self._rng = rng or random.SystemRandom()
        self._free = ports
        if sequential:
            heapq.heapify(self._free)
        self._held: collections.deque[tuple[float, int]] = collections.deque()
        self._in_use: set[int] = set()
        self.size = len(ports)

    def __len__(self) -> int:
        return len(self._free) + len(self._held)

    def _release_expired(self, now: float) -> None:
        while self._held and self._held[0][0] <= now:
            self._put(self._held.popleft()[1])

    def _put(self, port: int) -> None:
        if self.sequential:
            heapq.heappush(self._free, port)
        else:
            self._free.append(port)

    def take(self, now: float) -> Optional[int]:
        """A free port, or None. Quarantined ports are used only when nothing else is left."""
        self._release_expired(now)
        if self._free:
            if self.sequential:
                port = heapq.heappop(self._free)
            else:
                i = self._rng.randrange(len(self._free))
                self._free[i], self._free[-1] = self._free[-1], self._free[i]
                port = self._free.pop()
        elif self._held:
            port = self._held.popleft()[1]
        else:
            return None
        self._in_use.add(port)
        return port

    def release(self, port: int, now: float) -> None:
        if port in self._in_use:
            self._in_use.discard(port)
            self._held.append((now + self.quarantine, port))

    def in_use(self) -> int:
        return len(self._in_use)


@dataclass
class PortPair:
    port: int
    rtp: socket.socket
    rtcp: socket.socket

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


def _media_socket(family: int, host: str, port: int, tos: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
        else:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.setblocking(False)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def family_of(host: str) -> int:
    """The address family of a numeric host."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_pair(pool: PortPool, host: str, now: float, tos: int = DEFAULT_TOS) -> PortPair:
    """Bind RTP on an even port and RTCP on the next one, trying further ports when taken."""
    family = family_of(host)
    for _ in range(pool.size):
        port = pool.take(now)
        if port is None:
            break
        try:
            rtp = _media_socket(family, host, port, tos)
        except OSError as exc:
            pool.release(port, now)
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        try:
            rtcp = _media_socket(family, host, port + 1, tos)
        except OSError as exc:
            rtp.close()
            pool.release(port, now)
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        return PortPair(port, rtp, rtcp)
    raise PortsExhausted(f"no free port pair on {host} ({pool.in_use()} pairs in use of {pool.size})")
