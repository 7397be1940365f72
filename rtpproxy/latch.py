"""Latching policy, sans-I/O: which source a stream accepts media from, and where media to
that party goes. One LatchState per local socket (RTP and RTCP of each side).

Modes (reference media-relay-notes.md §5; README "Latching"):

strict          only the address signalled in SDP; nothing is ever learned.
dynamic         (default, rtpproxy-compatible) the first packet latches (an RTP packet with a
                valid SSRC; RTCP on its first packet). A new source takes over (a) inside the
                update window after a U/L (re-INVITE), unless the stream is already latched to
                the exact SDP address, which then stays confirmed; or (b) after N consecutive
                packets from it with one SSRC and sequence numbers +1 each (counted by the
                engine), once the latched source has been silent for `relatch_silence`.
dynamic-strict  like dynamic, but a source must have the signalled IP address (only the port
                may change, as NAT rebinding does); a re-negotiation brings a new signalled IP.
asymmetric      (rtpproxy's `A`, any mode) the signalled address is pinned; packets are
                accepted from its IP, any port; nothing is learned.

Optional SSRC lock: once latched, RTP with another SSRC from the latched address is dropped
until a re-negotiation (inside its window the new SSRC is adopted).

RTCP follows RTP: when RTP (re-)latches to IP X, RTCP is expected from X, port+1 first, and
re-learns its port from X's packets.

The engine enforces the outcome per packet (engine_view); this module only decides.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

from rtpproxy.engine_api import (
    EV_CANDIDATE,
    MATCH_ADDR,
    MATCH_IP,
    MISMATCH_DROP,
    MISMATCH_FORWARD,
    MISMATCH_FORWARD_UNHEARD,
    Address,
)

UPDATE_WINDOW_S = 10.0       # rtpproxy's UPDATE_WINDOW


class Mode(enum.Enum):
    STRICT = "strict"
    DYNAMIC = "dynamic"
    DYNAMIC_STRICT = "dynamic-strict"


@dataclass(frozen=True)
class Policy:
    """Daemon-wide latching parameters (the mode can be overridden per call)."""

    mode: Mode = Mode.DYNAMIC
    window: float = UPDATE_WINDOW_S
    relatch_packets: int = 3
    relatch_silence: float = 0.2
    ssrc_lock: bool = False


class Verdict(enum.Enum):
    FILLED = "filled"            # source adopted, not latched yet (no valid RTP seen)
    LATCHED = "latched"
    RELATCHED = "re-latched"
    REFUSED = "refused"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class LatchState:
    is_rtp: bool = True
    mode: Mode = Mode.DYNAMIC
    remote: Optional[Address] = None       # where this party's media goes, and whom we expect it from
    signalled: Optional[Address] = None
    learned: bool = False                  # remote came from packets: signalling no longer moves it
    latched: bool = False
    ssrc: int = 0
    ssrc_lock: bool = False
    asymmetric: bool = False
    expect_ip: Optional[str] = None        # RTCP: the IP RTP latched to
    window_until: float = 0.0              # monotonic seconds; update window end

    def in_window(self, now: float) -> bool:
        return now < self.window_until

    @property
    def confirmed(self) -> bool:
        """Latched to exactly the SDP address: the best evidence there is."""
        return self.latched and self.remote is not None and self.remote == self.signalled

    @property
    def allowed_ip(self) -> Optional[str]:
        """The only source IP this stream may learn from, if restricted."""
        if self.expect_ip is not None:
            return self.expect_ip
        if self.mode is Mode.DYNAMIC_STRICT:
            return self.signalled[0] if self.signalled else ""       # "": nothing is allowed
        return None


def signal(st: LatchState, addr: Optional[Address], now: float, asymmetric: bool, policy: Policy,
           mode: Optional[Mode] = None, ssrc_lock: Optional[bool] = None) -> LatchState:
    """A U/L gave this party's SDP address (None: hold or unusable). Opens the update window."""
    mode = mode or policy.mode
    lock = policy.ssrc_lock if ssrc_lock is None else ssrc_lock
    st = replace(st, signalled=addr, asymmetric=asymmetric, mode=mode, ssrc_lock=lock, expect_ip=None,
                 window_until=now + policy.window)
    if asymmetric or mode is Mode.STRICT:
        return replace(st, remote=addr, learned=False, latched=addr is not None, expect_ip=None)
    if addr is not None and not st.learned:
        return replace(st, remote=addr)
    return st


def on_packet(st: LatchState, kind: int, src: Address, rtp_valid: bool, ssrc: int, now: float,
              last_rx: float, policy: Policy) -> tuple[LatchState, Verdict]:
    """The engine reported a packet from src (kind: EV_UNLATCHED, EV_MISMATCH or EV_CANDIDATE).
    last_rx is when the stream last accepted a packet from its latched source (monotonic s)."""
    in_window = st.in_window(now)
    if st.latched and src == st.remote:
        # Only an SSRC-locked stream reports its own source: a new SSRC, adopted on re-negotiation.
        if st.ssrc_lock and rtp_valid and ssrc != st.ssrc:
            return (replace(st, ssrc=ssrc), Verdict.RELATCHED) if in_window else (st, Verdict.REFUSED)
        return st, Verdict.UNCHANGED
    if st.asymmetric or st.mode is Mode.STRICT:
        return st, Verdict.REFUSED
    allowed = st.allowed_ip
    if allowed is not None and src[0] != allowed:
        return st, Verdict.REFUSED
    confirms = rtp_valid or not st.is_rtp
    if not st.latched:
        if src == st.remote and st.learned and not confirms:
            return st, Verdict.UNCHANGED
        new = replace(st, remote=src, learned=True, latched=confirms, ssrc=ssrc if rtp_valid else 0,
                      expect_ip=None)
        return new, Verdict.LATCHED if confirms else Verdict.FILLED
    if in_window and (not st.confirmed or src == st.signalled):
        return replace(st, remote=src, learned=True, latched=confirms,
                       ssrc=ssrc if rtp_valid else st.ssrc), Verdict.RELATCHED
    if kind == EV_CANDIDATE and rtp_valid and now - last_rx >= policy.relatch_silence:
        return replace(st, remote=src, learned=True, ssrc=ssrc), Verdict.RELATCHED
    return st, Verdict.REFUSED


def pre_latched(st: LatchState) -> bool:
    """A learning stream whose engine entry already accepts its SDP address (engine_view)."""
    return (not st.latched and st.remote is not None and not st.learned and not st.asymmetric
            and st.mode is not Mode.STRICT and st.remote == st.signalled
            and (st.allowed_ip is None or st.allowed_ip == st.remote[0]))


def adopt(st: LatchState, accepted: bool, ssrc: int) -> LatchState:
    """The engine accepted packets from a pre-latched stream's SDP address (accepted: its
    counters show packets that were not mismatches): the stream is latched there, exactly as if
    the first packet had been reported from it. Python folds this in before any decision that
    depends on it (an event on the stream, the timer tick), so the order of evidence is kept."""
    if not accepted or not pre_latched(st):
        return st
    return replace(st, learned=True, latched=True, ssrc=ssrc if st.is_rtp else 0, expect_ip=None)


def follow_rtp(rtcp: LatchState, rtp_src: Address) -> LatchState:
    """RTP (re-)latched to rtp_src: expect RTCP from the same IP, port+1 until it says otherwise
    (rtpp_stream_guess_addr). Strict and asymmetric RTCP keep their signalled address."""
    if rtcp.asymmetric or rtcp.mode is Mode.STRICT:
        return rtcp
    guess = (rtp_src[0], rtp_src[1] + 1)
    if rtcp.latched and rtcp.remote is not None and rtcp.remote[0] == rtp_src[0]:
        return rtcp                          # RTCP already latched on that IP: it knows its port
    return replace(rtcp, remote=guess, learned=True, latched=False, expect_ip=rtp_src[0])


@dataclass(frozen=True)
class EngineView:
    latched: Optional[Address]
    on_mismatch: int
    match: int
    lock_ssrc: Optional[int] = None
    relatch_packets: int = 0
    forward_until: float = 0.0             # monotonic seconds: the engine stops forwarding then by itself


def engine_view(st: LatchState, now: float, policy: Policy) -> EngineView:
    """How the engine must treat sources for this stream right now."""
    if st.asymmetric:
        return EngineView(st.remote, MISMATCH_DROP, MATCH_IP)
    lock = st.ssrc if st.ssrc_lock and st.latched and st.is_rtp and st.ssrc else None
    if st.mode is Mode.STRICT:
        # No signalled address: latched None with DROP drops everything.
        return EngineView(st.signalled, MISMATCH_DROP, MATCH_ADDR, lock)
    if not st.latched:
        if pre_latched(st):
            # Learning with an SDP address: packets from exactly that address are accepted by the
            # engine without a report (Python adopts the latch from the counters, see adopt());
            # any other source is reported, and forwarded (dynamic) or dropped (dynamic-strict).
            # Until the SDP address is heard, other sources are forwarded (dynamic) as in plain
            # learning; from then on the engine drops them at once, without waiting for Python.
            return EngineView(st.remote, MISMATCH_DROP if st.allowed_ip is not None else MISMATCH_FORWARD_UNHEARD,
                              MATCH_ADDR)
        if st.allowed_ip is not None:
            # Guarded learning: port 0 never matches, so every packet is dropped and reported,
            # and Python latches the first one from the allowed IP.
            return EngineView((st.allowed_ip, 0) if st.allowed_ip else None, MISMATCH_DROP, MATCH_ADDR)
        return EngineView(None, MISMATCH_FORWARD, MATCH_ADDR)
    forward = st.mode is Mode.DYNAMIC and st.in_window(now) and not st.confirmed
    return EngineView(st.remote, MISMATCH_FORWARD if forward else MISMATCH_DROP, MATCH_ADDR, lock,
                      policy.relatch_packets if st.is_rtp else 0, st.window_until if forward else 0.0)
