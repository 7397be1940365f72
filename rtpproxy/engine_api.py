"""What both relay backends share: the stream entry, counters and events.

Addresses are (host, port) tuples with the host in numeric form, as the socket
module returns them; None means "no address".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

Address = tuple[str, int]

MISMATCH_DROP = 0
MISMATCH_FORWARD = 1
MISMATCH_FORWARD_UNHEARD = 2            # forward until the latched source is heard, then drop
MATCH_ADDR = 0
MATCH_IP = 1

EV_UNLATCHED = 1
EV_MISMATCH = 2
EV_SILENT = 3
EV_CANDIDATE = 4


@dataclass(frozen=True)
class StreamConfig:
    """Forwarding entry for one local socket: packets arriving on fd leave out_fd to dst."""

    fd: int
    out_fd: int = -1
    latched: Optional[Address] = None      # None: every packet is a mismatch (forwarded or dropped, reported)
    dst: Optional[Address] = None          # None: count and drop
    gen: int = 0
    on_mismatch: int = MISMATCH_DROP
    match: int = MATCH_ADDR
    is_rtp: bool = True
    lock_ssrc: Optional[int] = None        # also require this SSRC from the latched source
    relatch_packets: int = 0               # >0: report a source after this many consecutive packets
    forward_until_ns: int = 0              # FORWARD only until this monotonic time, then DROP (0: always)


@dataclass
class Counters:
    packets: int = 0
    bytes: int = 0
    relayed: int = 0
    dropped: int = 0
    mismatched: int = 0
    last_rx_ns: int = 0
    last_ssrc: int = 0
    last_seq: int = 0


@dataclass(frozen=True)
class Event:
    kind: int
    stream_id: int
    gen: int
    src: Optional[Address]
    rtp_valid: bool
    ssrc: int
    seq: int
    ts_ns: int


@dataclass(frozen=True)
class WorkerStats:
    wakeups: int = 0
    packets: int = 0
    relayed: int = 0
    dropped: int = 0
    events: int = 0
    events_lost: int = 0
    streams: int = 0
    control_yields: int = 0      # the worker gave its core to a waiting command (engine.watch)


EventSink = Callable[[Sequence[Event]], None]


class Engine(Protocol):
    """The interface both backends implement (relay.CEngine and relay_py.PyEngine)."""

    name: str

    def start(self, loop, on_events: EventSink) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
    def stream_set(self, stream_id: int, cfg: StreamConfig) -> None: ...
    def stream_del(self, stream_id: int) -> None: ...
    def stream_retire(self, stream_id: int) -> None: ...     # fds closable after quiesce() or a grace period
    def quiesce(self) -> None: ...
    def watch(self, fd: int) -> None: ...                      # a control socket: yield the core to it
    def grace_begin(self) -> None: ...                         # quiesce() without the wait:
    def grace_passed(self) -> bool: ...                        # fds retired before begin closable once True
    def counters(self, stream_id: int) -> Counters: ...
    def worker_stats(self) -> list[WorkerStats]: ...
