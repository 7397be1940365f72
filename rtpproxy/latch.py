"""Symmetric-RTP latching policy, sans-I/O.

rtpproxy's rules (reference rtpp-protocol.md §5.3), one LatchState per local
socket (RTP and RTCP of each side):

1. Signalling pre-fills the remote (RTP port, RTCP port+1), except for hold or
   an unusable address, and except when the address was already learned from
   packets: then only the update window lets it move.
2. Until latched, any source is adopted as the remote ("filled"). An RTP packet
   with a valid SSRC latches the stream; RTCP latches on its first packet.
3. Once latched, another source is refused, except (a) inside the update window
   after a U/L that touched the stream, or (b) with the latched SSRC and a
   sequence number within 536 of the last one (a NAT rebinding the same stream).
4. Asymmetric streams never learn: the signalled address is pinned and packets
   are accepted from its IP, any port.

The C engine enforces the outcome per packet (see engine_view); this module only
decides.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

from rtpproxy.engine_api import MATCH_ADDR, MATCH_IP, MISMATCH_DROP, MISMATCH_FORWARD, Address

UPDATE_WINDOW_S = 10.0       # rtpproxy's UPDATE_WINDOW
SEQ_CONTINUITY = 536         # rtpproxy: same SSRC and |seq delta| <= 536 is the same stream


class Verdict(enum.Enum):
    FILLED = "filled"            # source adopted, not latched yet (no valid RTP seen)
    LATCHED = "latched"
    RELATCHED = "re-latched"
    REFUSED = "refused"
    UNCHANGED = "unchanged"      # nothing to do (already the remote, or asymmetric)


@dataclass(frozen=True)
class LatchState:
    is_rtp: bool = True
    remote: Optional[Address] = None       # where this party's media goes, and whom we expect it from
    signalled: Optional[Address] = None
    learned: bool = False                  # remote came from packets: signalling no longer moves it
    latched: bool = False
    ssrc: int = 0
    asymmetric: bool = False
    window_until: float = 0.0              # monotonic seconds; update window end

    def in_window(self, now: float) -> bool:
        return now < self.window_until


def signal(st: LatchState, addr: Optional[Address], now: float, asymmetric: bool,
           window: float = UPDATE_WINDOW_S) -> LatchState:
    """A U/L gave this party's SDP address (None: hold or unusable)."""
    st = replace(st, signalled=addr, asymmetric=asymmetric, window_until=now + window)
    if asymmetric:
        return replace(st, remote=addr, learned=False, latched=addr is not None)
    if addr is not None and not st.learned:
        return replace(st, remote=addr)
    return st


def on_packet(st: LatchState, src: Address, rtp_valid: bool, ssrc: int, seq: int, now: float,
              last_ssrc: int, last_seq: int) -> tuple[LatchState, Verdict]:
    """A packet from src reached a stream (reported by the engine). last_* are the stream's
    counters: the SSRC and sequence number of the last packet it accepted."""
    if st.asymmetric:
        return st, Verdict.UNCHANGED
    confirms = rtp_valid or not st.is_rtp
    if not st.latched:
        if src == st.remote and st.learned and not confirms:
            return st, Verdict.UNCHANGED
        new = replace(st, remote=src, learned=True, latched=confirms, ssrc=ssrc if rtp_valid else 0)
        return new, Verdict.LATCHED if confirms else Verdict.FILLED
    if src == st.remote:
        return st, Verdict.UNCHANGED
    if st.in_window(now):
        return replace(st, remote=src, learned=True, latched=confirms,
                       ssrc=ssrc if rtp_valid else st.ssrc), Verdict.RELATCHED
    if st.is_rtp and rtp_valid and ssrc == st.ssrc == last_ssrc and _seq_close(seq, last_seq):
        return replace(st, remote=src, learned=True), Verdict.RELATCHED
    return st, Verdict.REFUSED


def guess_rtcp(rtcp: LatchState, rtp_src: Address) -> LatchState:
    """When RTP learns its source, RTCP is expected from the next port (rtpp_stream_guess_addr),
    unless RTCP packets already told us better."""
    if rtcp.learned or rtcp.asymmetric:
        return rtcp
    return replace(rtcp, remote=(rtp_src[0], rtp_src[1] + 1))


def _seq_close(a: int, b: int) -> bool:
    d = (a - b) & 0xFFFF
    return min(d, 0x10000 - d) <= SEQ_CONTINUITY


@dataclass(frozen=True)
class EngineView:
    latched: Optional[Address]
    on_mismatch: int
    match: int


def engine_view(st: LatchState, now: float) -> EngineView:
    """How the engine must treat sources for this stream right now."""
    if st.asymmetric:
        return EngineView(st.remote, MISMATCH_DROP, MATCH_IP)
    if not st.latched:
        return EngineView(None, MISMATCH_FORWARD, MATCH_ADDR)
    return EngineView(st.remote, MISMATCH_FORWARD if st.in_window(now) else MISMATCH_DROP, MATCH_ADDR)
