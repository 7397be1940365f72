"""The media service: sessions wired to ports, the latching policy and the engine.

Runs on the asyncio thread. Commands (control/commands.py) call create/update/
delete; the engine's events come in through on_events; tick() runs once a
second for timeouts. Every change to a session ends in push(), which derives the
engine entries of its four sockets from the session and sends those that changed.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from rtpproxy import latch
from rtpproxy.config import Bind, Config
from rtpproxy.engine_api import (
    EV_CANDIDATE,
    EV_MISMATCH,
    EV_SILENT,
    EV_UNLATCHED,
    Address,
    Counters,
    Engine,
    Event,
    StreamConfig,
)
from rtpproxy.errors import NftError, PortsExhausted
from rtpproxy.nftmgr import KernelFlow
from rtpproxy.ports import PortPool, bind_pair, family_of
from rtpproxy.sessions import Session, SessionTable, Side, remaining_ttl
from rtpproxy.stats import Stats

log = logging.getLogger("rtpproxy.sessions")

REFUSED_LOG_INTERVAL = 10.0      # seconds between "refused source" log lines of one session
LIMBO_MAX = 1024                 # ended sessions' socket pairs held at most before D closes them itself
ADOPT_PER_PERIOD = 50            # pre-latched sessions looked at per period (new_period(), 10 per second)
# Deferred work runs in slices of at most this much (background_slice): a control command that
# arrives meanwhile waits for one slice, never for a whole batch (measured: a 50-session adoption
# step held the control thread ~2 ms, closing a second's retired sockets ~0.7 ms).
SLICE_ADOPT = 2                  # sessions adopted (~40-140 us each)
SLICE_CLOSE = 16                 # retired pairs closed (~9 us each: two sockets)
SLICE_EXPIRE = 8                 # timed-out sessions ended


@dataclass(frozen=True)
class StreamRef:
    session: Session
    side: int
    rtcp: bool


class MediaService:
    def __init__(self, cfg: Config, engine: Engine, clock: Callable[[], float] = time.monotonic,
                 on_timeout: Optional[Callable[[Session], None]] = None, firewall=None):
        self.cfg = cfg
        self.engine = engine
        self.firewall = firewall             # firewall.MediaFirewall, or None with --no-nft
        self.kernel = None                   # kernel.KernelTier when the kernel tier is on
        self.kernel_state = "off (not enabled)"
        self.policy = cfg.latch_policy()
        self.clock = clock
        self.on_timeout = on_timeout
        self.sessions = SessionTable()
        self.stats = Stats()
        self.draining = False
        skip = [c.port for c in cfg.control if c.port] + [c.port - 1 for c in cfg.control if c.port]
        self.pools = {fam: PortPool(cfg.min_port, cfg.max_port, cfg.sequential_ports, skip)
                      for fam in (socket.AF_INET, socket.AF_INET6)}
        self._free_ids = list(range(cfg.max_streams - 1, -1, -1))
        self._streams: dict[int, StreamRef] = {}
        self._pushed: dict[int, StreamConfig] = {}
        self._gen = 0
        self._refused_logged: dict[int, float] = {}
        self._ssrc_pending: dict[int, Session] = {}               # SSRC-locked sessions yet to see RTP
        self._prelatched: dict[int, Session] = {}                 # sessions with streams latch.pre_latched
        self._deadlines: list[tuple[float, int, int, Session]] = []   # (when to look again, order, gen, session)
        self._order = itertools.count()
        # Pairs of ended sessions go limbo -> grace (a grace period runs in the engine) -> closable
        # (no worker can still use them) -> closed a slice at a time; nothing waits for a worker.
        self._limbo: list = []
        self._grace: list = []
        self._closable: list = []
        self._adopt_budget = ADOPT_PER_PERIOD

    # ---- ports and sides --------------------------------------------------
    def open_side(self, s: Session, idx: int, bind: Bind) -> None:
        """Give side idx of s a local RTP/RTCP pair on bind (raises PortsExhausted)."""
        side = s.sides[idx]
        pair = bind_pair(self.pools[family_of(bind.host)], bind.host, self.clock(), self.cfg.tos)
        if self.firewall is not None:
            try:
                self.firewall.open(s.call_id, _sockets(bind.host, pair.port))   # before the reply leaves
            except NftError:
                self._release(pair, bind.host)
                raise
        old, old_host = side.pair, side.local_host
        side.pair, side.local_host, side.advertised = pair, bind.host, bind.shown
        if side.rtp_id is None:
            side.rtp_id, side.rtcp_id = self._free_ids.pop(), self._free_ids.pop()
            self._streams[side.rtp_id] = StreamRef(s, idx, False)
            self._streams[side.rtcp_id] = StreamRef(s, idx, True)
        if old is not None:
            self.push(s)                 # the engine lets go of the old fds before they are closed
            self._release(old, old_host)  # where the old pair was bound, which `N` may have changed

    def _release(self, pair, host: str, retired: bool = False) -> None:
        """Give a pair back: its firewall holes (if opened), its port (quarantined), its sockets
        (retired: their engine entries were retired, so they close once a grace period has passed,
        see new_period)."""
        if self.firewall is not None:
            self.firewall.close(_sockets(host, pair.port))
        self.pools[family_of(host)].release(pair.port, self.clock())
        if retired:
            self._limbo.append(pair)
            if len(self._limbo) >= LIMBO_MAX:
                self.close_retired()
        else:
            pair.close()

    def close_retired(self) -> None:
        """Close every retired pair now (shutdown, or a limbo that outgrew LIMBO_MAX)."""
        if self._limbo or self._grace:
            self.engine.quiesce()                # one wait for every worker covers all of them
        for pairs in (self._closable, self._grace, self._limbo):
            for pair in pairs:
                pair.close()
            pairs.clear()

    # ---- sessions ---------------------------------------------------------
    def new_session(self, call_id: str, from_tag: str, to_tag: Optional[str]) -> Session:
        self._gen += 1
        s = Session(call_id, from_tag, self.clock(), to_tag=to_tag, gen=self._gen)
        return s

    def register(self, s: Session) -> None:
        self.sessions.add(s)
        self.stats.nsess_created += 1
        log.info("[%s] created, tag %s", s.call_id, s.from_tag)

    def signal(self, s: Session, idx: int, addr: Optional[Address], asymmetric: bool,
               mode: Optional[str] = None, ssrc_lock: Optional[bool] = None) -> None:
        """A U/L gave side idx's remote (the party that sends to side idx's port); mode and
        ssrc_lock override the daemon's latching policy for this call."""
        now = self.clock()
        side = s.sides[idx]
        rtcp_addr = (addr[0], addr[1] + 1) if addr else None
        m = latch.Mode(mode) if mode else None
        side.rtp = latch.signal(side.rtp, addr, now, asymmetric, self.policy, m, ssrc_lock)
        side.rtcp = latch.signal(side.rtcp, rtcp_addr, now, asymmetric, self.policy, m, ssrc_lock)
        side.onhold = addr is None
        if side.rtp.ssrc_lock and side.rtp.latched and not side.rtp.ssrc:
            self._ssrc_pending[id(s)] = s

    def touch(self, s: Session) -> None:
        s.last_signal = self.clock()
        # A U/L restarts the clock; the earliest it can run out is the shorter TTL from now.
        limit = min(self.cfg.ttl, self.cfg.setup_ttl)
        heapq.heappush(self._deadlines, (s.last_signal + limit, next(self._order), s.gen, s))
        if not s.complete and s.sides[1].pair is not None:
            s.complete = True
            self.stats.nsess_complete += 1

    def destroy(self, s: Session, reason: str) -> None:
        self.sessions.remove(s)
        if self.kernel is not None and self.kernel.holds(s.gen):
            self.kernel.poll(force=True)         # the latest kernel counts, then
            self.kernel.remove(s.gen)            # media back to the sockets before they close
        rtp = [self.counters(s, i) for i in (0, 1)]
        rtp_dirs = sum(1 for c in rtp if c.packets)
        rtcp_dirs = sum(1 for i in (0, 1) if self.counters(s, i, rtcp=True).packets)
        # side 1 receives from the caller, side 0 from the callee
        summary = (f"rtp from caller {rtp[1].packets} in/{rtp[1].relayed} relayed/{rtp[1].dropped} dropped, "
                   f"from callee {rtp[0].packets} in/{rtp[0].relayed} relayed/{rtp[0].dropped} dropped")
        for side in s.sides:
            for sid in (side.rtp_id, side.rtcp_id):
                if sid is None:
                    continue
                self.stats.absorb(self.stream_counters(sid))
                if sid in self._pushed:
                    self.engine.stream_retire(sid)     # no wait here: D answers at once
                    del self._pushed[sid]
                del self._streams[sid]
                self._refused_logged.pop(sid, None)
                self._free_ids.append(sid)
            if side.pair is not None:
                if self.kernel is not None:
                    self.kernel.forget(_sockets(side.local_host, side.port))
                self._release(side.pair, side.local_host, retired=True)
                side.pair = None
        self._ssrc_pending.pop(id(s), None)
        self._prelatched.pop(id(s), None)
        self.stats.session_ended(self.clock() - s.created, rtp_dirs, rtcp_dirs)
        if reason == "timed out":
            self.stats.nsess_timeout += 1
        log.info("[%s] %s, tag %s; %s", s.call_id, reason, s.from_tag, summary)

    def destroy_all(self, reason: str) -> int:
        if self.kernel is not None:
            self.kernel.poll(force=True)
            self.kernel.close_all()          # one flush, like the firewall's
        if self.firewall is not None:
            self.firewall.close_all()        # one flush; the per-session closes then have nothing left
        doomed = list(self.sessions)
        for s in doomed:
            self.destroy(s, reason)
        self.close_retired()
        return len(doomed)

    # ---- the engine entries ----------------------------------------------
    def push(self, s: Session) -> None:
        now = self.clock()
        for idx in (0, 1):
            side, other = s.sides[idx], s.sides[1 - idx]
            if side.pair is None:
                continue
            for sid, st, own, out, other_st in (
                (side.rtp_id, side.rtp, side.pair.rtp, other.pair.rtp if other.pair else None, other.rtp),
                (side.rtcp_id, side.rtcp, side.pair.rtcp, other.pair.rtcp if other.pair else None, other.rtcp),
            ):
                view = latch.engine_view(st, now, self.policy)
                cfg = StreamConfig(fd=own.fileno(), out_fd=out.fileno() if out else -1, latched=view.latched,
                                   dst=other_st.remote if out else None, gen=s.gen,
                                   on_mismatch=view.on_mismatch, match=view.match, is_rtp=st.is_rtp,
                                   lock_ssrc=view.lock_ssrc, relatch_packets=view.relatch_packets,
                                   forward_until_ns=int(view.forward_until * 1e9))
                if self._pushed.get(sid) != cfg:
                    self.engine.stream_set(sid, cfg)
                    self._pushed[sid] = cfg
        if _has_prelatched(s):
            self._prelatched[id(s)] = s
        if self.kernel is not None:
            self.kernel.sync(s.gen, kernel_flows(s))

    def _adopt(self, s: Session) -> bool:
        """Fold in what the engine did alone: pre-latched streams that accepted packets from their
        SDP address are latched there (no event is raised for them, see latch.engine_view)."""
        changed = False
        for side in s.sides:
            if side.pair is None:
                continue
            for rtcp in (True, False):            # RTCP first: if it was heard, RTP's adoption keeps it
                st = side.rtcp if rtcp else side.rtp
                if not latch.pre_latched(st):
                    continue
                sid = side.rtcp_id if rtcp else side.rtp_id
                c = self.engine.counters(sid) if sid in self._pushed else Counters()
                new = latch.adopt(st, c.packets > c.mismatched, c.last_ssrc)
                if new is st:
                    continue
                changed = True
                if rtcp:
                    side.rtcp = new
                else:
                    side.rtp = new
                    side.rtcp = latch.follow_rtp(side.rtcp, new.remote)    # RTCP only from where RTP comes
                log.info("[%s] latched %s %s:%s on port %s", s.call_id, "rtcp" if rtcp else "rtp", *new.remote,
                         side.port)
        return changed

    # ---- counters: the engine's, plus what the kernel tier forwarded for the same socket -------
    def socket_of(self, sid: int) -> Optional[Address]:
        """The local (address, port) of a call's engine entry (None: unknown or released)."""
        ref = self._streams.get(sid)
        if ref is None:
            return None
        side = ref.session.sides[ref.side]
        return (side.local_host, side.port + (1 if ref.rtcp else 0)) if side.pair else None

    def _kernel_socket(self, sid: int) -> Optional[Address]:
        """socket_of, when the kernel tier is on (its figures are kept per socket)."""
        return self.socket_of(sid) if self.kernel is not None else None

    def stream_counters(self, sid: int) -> Counters:
        c = self.engine.counters(sid) if sid in self._pushed else Counters()
        sock = self._kernel_socket(sid)
        if sock is not None:
            packets, payload = self.kernel.counts(sock)
            if packets:
                c = replace(c, packets=c.packets + packets, bytes=c.bytes + payload, relayed=c.relayed + packets)
        return c

    def last_activity(self, sid: int) -> float:
        """Monotonic seconds of the stream's last packet, in the engine or the kernel (0: none)."""
        best = self.engine.counters(sid).last_rx_ns / 1e9 if sid in self._pushed else 0.0
        sock = self._kernel_socket(sid)
        return max(best, self.kernel.last_active(sock)) if sock is not None else best

    def in_kernel(self, sid: int) -> bool:
        sock = self._kernel_socket(sid)
        return sock is not None and self.kernel.in_kernel(sock)

    def counters(self, s: Session, idx: int, rtcp: bool = False) -> Counters:
        side = s.sides[idx]
        sid = side.rtcp_id if rtcp else side.rtp_id
        return self.stream_counters(sid) if sid is not None else Counters()

    # ---- events from the engine ------------------------------------------
    def on_events(self, events: list[Event]) -> None:
        now = self.clock()
        touched: dict[int, Session] = {}
        for ev in events:
            ref = self._streams.get(ev.stream_id)
            if ref is None or ref.session.gen != ev.gen:
                continue                                 # the stream was deleted or reused since
            s = ref.session
            if id(s) in self._prelatched and self._adopt(s):
                touched[id(s)] = s                   # the engine's own evidence first: it came first
            if ev.kind == EV_SILENT:
                log.info("[%s] media stopped on port %s (%s)", s.call_id, s.sides[ref.side].port,
                         "rtcp" if ref.rtcp else "rtp")
                continue
            if ev.kind not in (EV_UNLATCHED, EV_MISMATCH, EV_CANDIDATE) or ev.src is None:
                continue
            if self._learn(s, ref, ev, now):
                touched[id(s)] = s
        for s in touched.values():
            self.push(s)

    def _learn(self, s: Session, ref: StreamRef, ev: Event, now: float) -> bool:
        side = s.sides[ref.side]
        st = side.rtcp if ref.rtcp else side.rtp
        last_rx = self.engine.counters(ev.stream_id).last_rx_ns / 1e9
        sock = self._kernel_socket(ev.stream_id)
        if sock is not None and ev.kind == EV_CANDIDATE:
            # The latched source may be talking through the kernel, unseen by the engine.
            last_rx = max(last_rx, self.kernel.last_active(sock, fresh=True))
        new, verdict = latch.on_packet(st, ev.kind, ev.src, ev.rtp_valid, ev.ssrc, now, last_rx, self.policy)
        if verdict is latch.Verdict.REFUSED:
            self.stats.refused += 1
            last = self._refused_logged.get(ev.stream_id, 0.0)
            if now - last >= REFUSED_LOG_INTERVAL:
                self._refused_logged[ev.stream_id] = now
                log.warning("[%s] refused media from %s:%s on port %s: latched to %s:%s", s.call_id,
                            ev.src[0], ev.src[1], side.port, *(st.remote or ("-", "-")))
            return False
        if verdict is latch.Verdict.UNCHANGED:
            return False
        if ref.rtcp:
            side.rtcp = new
        else:
            side.rtp = new
            if verdict is not latch.Verdict.FILLED:
                side.rtcp = latch.follow_rtp(side.rtcp, ev.src)     # RTCP only from where RTP comes
        log.info("[%s] %s %s %s:%s on port %s", s.call_id, verdict.value, "rtcp" if ref.rtcp else "rtp",
                 ev.src[0], ev.src[1], side.port)
        return True

    # ---- timers -------------------------------------------------------------
    def tick(self) -> None:
        """Once a second: keep firewall holes alive, read the kernel's counters, lock SSRCs.
        (Timeouts, closing sockets and adoption are background_slice()'s; update windows close
        in the engine by themselves: entries carry their deadline.)"""
        if self.firewall is not None:
            self.firewall.refresh()
        if self.kernel is not None:
            self.kernel.poll()
        self._lock_known_ssrcs()

    def new_period(self) -> None:
        """Every 0.1 s (daemon): move retired pairs along their grace period, and the adoption
        budget of the next period. The engine already forwards
        pre-latched streams correctly; adopting a thousand calls at once would hold the control
        thread (and a core it may share with a worker) for a burst the media would feel, while
        50 per period still moves 500 calls a second into the kernel tier."""
        self._adopt_budget = ADOPT_PER_PERIOD
        if self._grace and self.engine.grace_passed():
            self._closable += self._grace
            self._grace = []
        if self._limbo and not self._grace:
            self.engine.grace_begin()            # passes once each worker has finished a batch
            self._grace, self._limbo = self._limbo, []

    def background_slice(self) -> bool:
        """One slice of deferred work: close firewall holes and retired sockets, end timed-out sessions, adopt
        pre-latched streams. True if it did something (call again: there may be more); the
        daemon runs slices back to back with the event loop's I/O in between."""
        if self.firewall is not None and self.firewall.flush_closes():
            return True                          # holes of ended calls: first, one transaction
        if self._closable:
            for pair in self._closable[-SLICE_CLOSE:]:
                pair.close()
            del self._closable[-SLICE_CLOSE:]
            return True
        return self._expire(SLICE_EXPIRE) or self._adopt_some(min(SLICE_ADOPT, self._adopt_budget))

    def _expire(self, limit: int) -> bool:
        """End up to limit sessions whose time is up. Only sessions whose deadline has come are
        looked at: media keeps pushing a live session's deadline out, so a busy relay checks each
        session about once per TTL."""
        now = self.clock()
        looked = 0
        while self._deadlines and self._deadlines[0][0] <= now and looked < limit:
            _, _, gen, s = heapq.heappop(self._deadlines)
            if s.gen != gen or not self.sessions.contains(s):
                continue
            looked += 1
            left = self.remaining(s)
            if left > 0:
                heapq.heappush(self._deadlines, (now + left, next(self._order), gen, s))
                continue
            if s.notify and self.on_timeout:
                self.on_timeout(s)
            self.destroy(s, "timed out")
        return looked > 0

    def _adopt_some(self, limit: int) -> bool:
        looked = 0
        for key, s in list(itertools.islice(self._prelatched.items(), limit)):
            looked += 1
            self._prelatched.pop(key, None)
            if not self.sessions.contains(s):
                continue
            if self._adopt(s):
                self.push(s)                             # (push queues it again if still pre-latched)
            if _has_prelatched(s):
                self._prelatched[key] = s                # to the back of the queue
        self._adopt_budget -= looked
        return looked > 0

    def _lock_known_ssrcs(self) -> None:
        """Streams latched by signalling alone (strict) raise no event for their own packets, so
        the SSRC to lock is taken from their counters once media has arrived."""
        for key, s in list(self._ssrc_pending.items()):
            waiting = False
            for idx, side in enumerate(s.sides):
                st = side.rtp
                if not (st.ssrc_lock and st.latched and not st.ssrc):
                    continue
                ssrc = self.counters(s, idx).last_ssrc
                if ssrc:
                    side.rtp = replace(st, ssrc=ssrc)
                else:
                    waiting = True
            self.push(s)
            if not waiting:
                del self._ssrc_pending[key]

    def _last_rx(self, side: Side) -> float:
        best = 0.0
        for sid in (side.rtp_id, side.rtcp_id):
            if sid is not None:
                best = max(best, self.last_activity(sid))      # media forwarded in the kernel counts too
        return best

    def remaining(self, s: Session) -> float:
        rx = tuple(self._last_rx(side) for side in s.sides)
        return remaining_ttl(s, self.clock(), rx, self.cfg.ttl, self.cfg.setup_ttl, self.cfg.independent_ttl)

    # ---- totals ---------------------------------------------------------------
    def live_counters(self) -> list[tuple[bool, Counters]]:
        return [(ref.rtcp, self.stream_counters(sid)) for sid, ref in self._streams.items() if sid in self._pushed]

    def active_streams(self) -> int:
        return len(self._pushed)

    def engine_entries(self):
        """(stream id, StreamRef, the StreamConfig the engine runs) of every call's live entry."""
        for sid, ref in self._streams.items():
            cfg = self._pushed.get(sid)
            if cfg is not None:
                yield sid, ref, cfg

    # ---- engine ids for entries outside calls (the table files' manual entries) -------------
    def take_stream_id(self) -> int:
        if not self._free_ids:
            raise PortsExhausted("no engine stream id left: the port range bounds them (-m/-M)")
        return self._free_ids.pop()

    def give_stream_id(self, sid: int) -> None:
        self._free_ids.append(sid)


def _has_prelatched(s: Session) -> bool:
    return any(latch.pre_latched(st) for side in s.sides if side.pair for st in (side.rtp, side.rtcp))


def kernel_flows(s: Session) -> list[KernelFlow]:
    """The flows of s the kernel may forward: RTP and RTCP each once both parties are latched
    (symmetric, no SSRC lock: the kernel checks addresses only), on concrete local addresses
    of the parties' family."""
    callee_side, caller_side = s.sides          # side 1 receives from the caller, side 0 from the callee
    if callee_side.pair is None or caller_side.pair is None:
        return []
    flows = []
    for off, pick in ((0, lambda side: side.rtp), (1, lambda side: side.rtcp)):
        a_st, b_st = pick(caller_side), pick(callee_side)
        if not all(st.latched and st.remote and not st.asymmetric and not st.ssrc_lock for st in (a_st, b_st)):
            continue
        a_local = (caller_side.local_host, caller_side.port + off)
        b_local = (callee_side.local_host, callee_side.port + off)
        hosts = (a_st.remote[0], b_st.remote[0], a_local[0], b_local[0])
        if len({":" in h for h in hosts}) != 1 or a_local[0] in ("0.0.0.0", "::") or b_local[0] in ("0.0.0.0", "::"):
            continue
        flows.append(KernelFlow(a_st.remote, a_local, b_st.remote, b_local, s.call_id))
    return flows


def _sockets(host: str, port: int) -> list[tuple[str, int]]:
    """The (address, port) of a pair's RTP and RTCP sockets."""
    return [(host, port), (host, port + 1)]
