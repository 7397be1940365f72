"""Pure-Python relay backend: the C engine's behaviour on the asyncio loop.

It exists so the package works where the extension is not built and so the
tests can hold both backends to the same cases. Same rules as csrc/engine.c:
latched-source check, per-stream rate-limited events, counters, silence events.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from rtpproxy.engine_api import (
    EV_CANDIDATE,
    EV_MISMATCH,
    EV_SILENT,
    EV_UNLATCHED,
    MATCH_IP,
    MISMATCH_FORWARD,
    MISMATCH_FORWARD_UNHEARD,
    Counters,
    Event,
    EventSink,
    StreamConfig,
    WorkerStats,
)
from rtpproxy.errors import EngineError
from rtpproxy.relay import EVENT_BURST, EVENTS_PER_SEC, SILENCE_MS

BATCH = 32
PKT_BUF = 2048
_EVENT_COST_NS = 1_000_000_000 // EVENTS_PER_SEC
_BURST_NS = _EVENT_COST_NS * EVENT_BURST


@dataclass
class _Slot:
    cfg: StreamConfig
    sock: socket.socket
    out: Optional[socket.socket]
    counters: Counters = field(default_factory=Counters)
    tokens_ns: int = _BURST_NS
    bucket_ts: int = 0
    cand_tokens_ns: int = _BURST_NS
    cand_bucket_ts: int = 0
    candidate: Optional[tuple] = None      # (source, ssrc, last seq, count)
    silent: bool = False
    heard: bool = False                    # a packet from cfg.latched was accepted (FORWARD_UNHEARD)


def _normalise(addr) -> tuple[str, int]:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


class PyEngine:
    name = "py"
    workers = 1

    def __init__(self, max_streams: int, silence_ms: int = SILENCE_MS):
        self.max_streams = max_streams
        self._silence_ns = silence_ms * 1_000_000
        self._slots: dict[int, _Slot] = {}
        self._loop = None
        self._sink: Optional[EventSink] = None
        self._pending: list[Event] = []
        self._stats = {"wakeups": 0, "packets": 0, "relayed": 0, "dropped": 0, "events": 0}
        self._timer = None

    # -- lifecycle
    def start(self, loop, on_events: EventSink) -> None:
        self._loop, self._sink = loop, on_events
        for sid, slot in self._slots.items():
            loop.add_reader(slot.sock.fileno(), self._readable, sid)
        self._timer = loop.call_later(0.2, self._tick)

    def stop(self) -> None:
        if self._loop is None:
            return
        for slot in self._slots.values():
            self._loop.remove_reader(slot.sock.fileno())
        if self._timer:
            self._timer.cancel()
        self._loop = None

    def close(self) -> None:
        self.stop()
        for slot in self._slots.values():       # the fds belong to ports.py: never let GC close them
            slot.sock.detach()
            if slot.out is not None:
                slot.out.detach()
        self._slots.clear()

    # -- table
    def stream_set(self, stream_id: int, cfg: StreamConfig) -> None:
        if not 0 <= stream_id < self.max_streams or cfg.fd < 0:
            raise EngineError(f"stream {stream_id} set", 22)
        old = self._slots.get(stream_id)
        sock = old.sock if old and old.cfg.fd == cfg.fd else _borrow(cfg.fd)
        out = None
        if cfg.out_fd >= 0:
            out = old.out if old and old.cfg.out_fd == cfg.out_fd and old.out else _borrow(cfg.out_fd)
        if old is None:
            slot = _Slot(cfg, sock, out)
            self._slots[stream_id] = slot
            if self._loop is not None:
                self._loop.add_reader(cfg.fd, self._readable, stream_id)
            return
        if old.cfg.fd != cfg.fd:
            if self._loop is not None:
                self._loop.remove_reader(old.cfg.fd)
                self._loop.add_reader(cfg.fd, self._readable, stream_id)
            old.sock.detach()
        if old.out is not None and old.out is not out:
            old.out.detach()
        if old.cfg.latched != cfg.latched:
            old.heard = False
        old.cfg, old.sock, old.out = cfg, sock, out

    def stream_retire(self, stream_id: int) -> None:
        self.stream_del(stream_id)           # one thread: nothing can hold the entry meanwhile

    def quiesce(self) -> None:
        pass

    def watch(self, fd: int) -> None:
        pass                                 # packets are handled on the control thread itself

    def grace_begin(self) -> None:
        pass

    def grace_passed(self) -> bool:
        return True

    def stream_del(self, stream_id: int) -> None:
        slot = self._slots.pop(stream_id, None)
        if slot is None:
            raise EngineError(f"stream {stream_id} del", 2)
        if self._loop is not None:
            self._loop.remove_reader(slot.cfg.fd)
        slot.sock.detach()
        if slot.out is not None:
            slot.out.detach()

    def counters(self, stream_id: int) -> Counters:
        slot = self._slots.get(stream_id)
        return Counters(**vars(slot.counters)) if slot else Counters()

    def worker_stats(self) -> list[WorkerStats]:
        return [WorkerStats(**self._stats, events_lost=0, streams=len(self._slots))]

    # -- packet path
    @staticmethod
    def _event_allowed(slot: _Slot, now: int, bucket: str = "") -> bool:
        tokens, ts = getattr(slot, bucket + "tokens_ns"), getattr(slot, bucket + "bucket_ts")
        credit = min(tokens + (now - ts), _BURST_NS)
        setattr(slot, bucket + "bucket_ts", now)
        if credit < _EVENT_COST_NS:
            setattr(slot, bucket + "tokens_ns", credit)
            return False
        setattr(slot, bucket + "tokens_ns", credit - _EVENT_COST_NS)
        return True

    @staticmethod
    def _candidate_step(slot: _Slot, src, ssrc: int, seq: int, need: int) -> bool:
        """Consecutive packets (one SSRC, seq +1) from one non-latched source; true every `need`."""
        c = slot.candidate
        count = c[3] + 1 if c and c[0] == src and c[1] == ssrc and (c[2] + 1) & 0xFFFF == seq else 1
        slot.candidate = (src, ssrc, seq, count)
        return count % need == 0

    def _event(self, kind, sid, slot, src, rtp_valid, ssrc, seq, now) -> None:
        self._pending.append(Event(kind, sid, slot.cfg.gen, src, rtp_valid, ssrc, seq, now))
        self._stats["events"] += 1

    def _readable(self, sid: int) -> None:
        slot = self._slots.get(sid)
        if slot is None:
            return
        self._stats["wakeups"] += 1
        now = time.monotonic_ns()
        cfg, c = slot.cfg, slot.counters
        for _ in range(BATCH):
            try:
                data, _anc, flags, addr = slot.sock.recvmsg(PKT_BUF)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break                               # ICMP errors queued on the socket: nothing to read
            src = _normalise(addr)
            c.packets += 1
            c.bytes += len(data)
            self._stats["packets"] += 1
            if flags & socket.MSG_TRUNC:
                c.dropped += 1
                continue
            rtp_valid, ssrc, seq = False, 0, 0
            if cfg.is_rtp and len(data) >= 12 and data[0] >> 6 == 2 and not 192 <= data[1] <= 223:
                seq = int.from_bytes(data[2:4], "big")
                ssrc = int.from_bytes(data[8:12], "big")
                rtp_valid = ssrc != 0
            latched = cfg.latched is not None
            if not latched or not _matches(cfg, src) or \
                    (cfg.lock_ssrc is not None and rtp_valid and ssrc != cfg.lock_ssrc):
                if latched:
                    c.mismatched += 1
                    if cfg.relatch_packets and rtp_valid and \
                            self._candidate_step(slot, src, ssrc, seq, cfg.relatch_packets) and \
                            self._event_allowed(slot, now, "cand_"):
                        self._event(EV_CANDIDATE, sid, slot, src, rtp_valid, ssrc, seq, now)
                if self._event_allowed(slot, now):
                    self._event(EV_MISMATCH if latched else EV_UNLATCHED, sid, slot, src, rtp_valid, ssrc, seq, now)
                forward = cfg.on_mismatch == MISMATCH_FORWARD or \
                    (cfg.on_mismatch == MISMATCH_FORWARD_UNHEARD and not slot.heard)
                if not forward or (cfg.forward_until_ns and now >= cfg.forward_until_ns):
                    c.dropped += 1
                    continue
            else:
                slot.heard = True
            c.last_rx_ns = now
            slot.silent = False
            if rtp_valid:
                c.last_ssrc, c.last_seq = ssrc, seq
            if slot.out is None or cfg.dst is None:
                c.dropped += 1
                continue
            try:
                slot.out.sendto(data, cfg.dst)
                c.relayed += 1
                self._stats["relayed"] += 1
            except OSError:
                c.dropped += 1
        self._flush()

    def _flush(self) -> None:
        if self._pending and self._sink is not None:
            events, self._pending = self._pending, []
            self._sink(events)

    def _tick(self) -> None:
        now = time.monotonic_ns()
        for sid, slot in self._slots.items():
            last = slot.counters.last_rx_ns
            if self._silence_ns and not slot.silent and last and now - last >= self._silence_ns:
                slot.silent = True
                self._event(EV_SILENT, sid, slot, None, False, 0, 0, now)
        self._flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(0.2, self._tick)


def _matches(cfg: StreamConfig, src: tuple[str, int]) -> bool:
    host, port = cfg.latched
    if cfg.match == MATCH_IP:
        return src[0] == host
    return src == (host, port)


def _borrow(fd: int) -> socket.socket:
    """A socket object over an fd owned by someone else (ports.py); detach() before dropping it."""
    return socket.socket(fileno=fd)
