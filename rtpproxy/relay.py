"""The C engine facade: the only importer of rtpproxy._relay.

It converts StreamConfig to struct rp_stream, -errno to EngineError, and the
engine's event ring to Event objects delivered on the asyncio loop.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from rtpproxy.engine_api import Address, Counters, Engine, Event, EventSink, StreamConfig, WorkerStats
from rtpproxy.errors import ConfigError, EngineError
from rtpproxy.ports import family_of

log = logging.getLogger("rtpproxy.relay")

EVENTS_PER_SEC = 20       # per stream, after the burst: a spoofing flood cannot starve the control plane
EVENT_BURST = 8
SILENCE_MS = 5000
EVENT_BATCH = 256

_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 16}


def _load():
    """Import the extension, checking that it was built from the same relay.h."""
    from rtpproxy import _relay  # noqa: PLC0415 - imported lazily so the package works without it

    expected = _relay.lib.RP_ABI_VERSION
    got = _relay.lib.rp_abi_version()
    if got != expected:
        raise ImportError(f"rtpproxy._relay ABI {got} does not match relay.h ABI {expected}: rebuild it")
    return _relay.ffi, _relay.lib


def c_engine_available() -> Optional[str]:
    """None if the C engine can be used, else why not."""
    try:
        _load()
    except ImportError as exc:
        return str(exc)
    return None


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise EngineError(what, -rc)
    return rc


class CEngine:
    name = "c"

    def __init__(self, workers: int, max_streams: int, silence_ms: int = SILENCE_MS):
        self._ffi, self._lib = _load()
        ptr = self._lib.rp_engine_new(workers, max_streams, EVENTS_PER_SEC, EVENT_BURST, silence_ms)
        if ptr == self._ffi.NULL:
            raise EngineError("rp_engine_new", self._ffi.errno or 22)
        self._eng = ptr
        self.workers = workers
        self.max_streams = max_streams
        self._counters = self._lib.rp_counters(ptr)
        self._evbuf = self._ffi.new("struct rp_event[]", EVENT_BATCH)
        self._loop = None
        self._sink: Optional[EventSink] = None

    def _addr(self, dst, a: Optional[Address]) -> None:
        if a is None:
            dst.family = 0
            return
        host, port = a
        fam = family_of(host)
        packed = socket.inet_pton(fam, host)
        dst.family = fam
        dst.port = port
        self._ffi.memmove(dst.ip, packed, len(packed))

    def _from_addr(self, a) -> Optional[Address]:
        fam = a.family
        if fam not in _FAMILY:
            return None
        raw = bytes(self._ffi.buffer(a.ip, _FAMILY[fam]))
        return socket.inet_ntop(fam, raw), a.port

    def start(self, loop, on_events: EventSink) -> None:
        self._loop, self._sink = loop, on_events
        _check(self._lib.rp_engine_start(self._eng), "rp_engine_start")
        loop.add_reader(self._lib.rp_event_fd(self._eng), self._drain)

    def _drain(self) -> None:
        n = self._lib.rp_events_read(self._eng, self._evbuf, EVENT_BATCH)
        if n <= 0 or self._sink is None:
            return
        events = []
        for i in range(n):
            e = self._evbuf[i]
            events.append(Event(e.kind, e.stream_id, e.gen, self._from_addr(e.src), bool(e.rtp_valid),
                                e.ssrc, e.seq, e.ts_ns))
        self._sink(events)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._lib.rp_event_fd(self._eng))
            self._loop = None
        _check(self._lib.rp_engine_stop(self._eng), "rp_engine_stop")

    def close(self) -> None:
        if self._eng is not None:
            self.stop()
            self._lib.rp_engine_free(self._eng)
            self._eng = None

    def stream_set(self, stream_id: int, cfg: StreamConfig) -> None:
        s = self._ffi.new("struct rp_stream *")
        s.fd, s.out_fd, s.gen = cfg.fd, cfg.out_fd, cfg.gen & 0xFFFFFFFF
        s.on_mismatch, s.match, s.is_rtp = cfg.on_mismatch, cfg.match, int(cfg.is_rtp)
        s.ssrc_locked, s.lock_ssrc = int(cfg.lock_ssrc is not None), (cfg.lock_ssrc or 0) & 0xFFFFFFFF
        s.relatch_packets = min(max(cfg.relatch_packets, 0), 255)
        s.forward_until_ns = cfg.forward_until_ns
        self._addr(s.latched, cfg.latched)
        self._addr(s.dst, cfg.dst)
        _check(self._lib.rp_stream_set(self._eng, stream_id, s), f"stream {stream_id} set")

    def stream_del(self, stream_id: int) -> None:
        _check(self._lib.rp_stream_del(self._eng, stream_id), f"stream {stream_id} del")

    def stream_retire(self, stream_id: int) -> None:
        """Delete without waiting: close the entry's fds only after quiesce() or a passed grace period."""
        _check(self._lib.rp_stream_retire(self._eng, stream_id), f"stream {stream_id} retire")

    def quiesce(self) -> None:
        self._lib.rp_quiesce(self._eng)

    def watch(self, fd: int) -> None:
        """Workers yield their core when fd (a control socket) becomes readable."""
        _check(self._lib.rp_engine_watch(self._eng, fd), "rp_engine_watch")

    def grace_begin(self) -> None:
        self._lib.rp_grace_begin(self._eng)

    def grace_passed(self) -> bool:
        return bool(self._lib.rp_grace_passed(self._eng))

    def counters(self, stream_id: int) -> Counters:
        c = self._counters[stream_id]
        return Counters(c.packets, c.bytes, c.relayed, c.dropped, c.mismatched, c.last_rx_ns,
                        c.last_ssrc, c.last_seq)

    def worker_stats(self) -> list[WorkerStats]:
        out = []
        st = self._ffi.new("struct rp_worker_stats *")
        for i in range(self.workers):
            _check(self._lib.rp_worker_stats(self._eng, i, st), "rp_worker_stats")
            out.append(WorkerStats(st.wakeups, st.packets, st.relayed, st.dropped, st.events,
                                   st.events_lost, st.streams, st.control_yields))
        return out


def open_engine(backend: str, workers: int, max_streams: int, silence_ms: int = SILENCE_MS) -> Engine:
    """Open the engine the config asks for: 'c', 'py', or 'auto' (C when built)."""
    if backend not in ("auto", "c", "py"):
        raise ConfigError("--backend", f"unknown backend {backend!r}; use auto, c or py")
    if backend in ("auto", "c"):
        why = c_engine_available()
        if why is None:
            return CEngine(workers or os.cpu_count() or 1, max_streams, silence_ms)
        if backend == "c":
            raise ConfigError("--backend", f"the C engine is not available ({why}); "
                              "build it with 'make build' or use --backend py")
        log.warning("C engine not built (%s): using the pure-Python backend, expect much lower capacity", why)
    from rtpproxy.relay_py import PyEngine  # noqa: PLC0415

    return PyEngine(max_streams, silence_ms)
