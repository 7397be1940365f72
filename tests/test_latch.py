"""Table-driven tests of every transition of the latching policy, in every mode."""
from __future__ import annotations

import pytest

from rtpproxy import latch
from rtpproxy.engine_api import (
    EV_CANDIDATE,
    EV_MISMATCH,
    EV_UNLATCHED,
    MATCH_ADDR,
    MATCH_IP,
    MISMATCH_DROP,
    MISMATCH_FORWARD,
    MISMATCH_FORWARD_UNHEARD,
)
from rtpproxy.latch import LatchState, Mode, Policy, Verdict

SDP = ("198.51.100.7", 4000)
NAT = ("203.0.113.5", 61000)
SAME_IP = ("198.51.100.7", 4444)          # the signalled IP, another port (NAT rebinding)
OTHER = ("192.0.2.66", 5555)
T0 = 100.0
P = Policy()
W = P.window
LATE = T0 + W + 1                         # after the update window
QUIET = LATE - 1.0                        # last accepted packet long enough ago (silence met)
BUSY = LATE - 0.01                        # ... or just now (the latched source is active)
D, S, X = Mode.DYNAMIC, Mode.STRICT, Mode.DYNAMIC_STRICT


def sig(addr=SDP, mode=D, asym=False, lock=False, now=T0, is_rtp=True):
    return latch.signal(LatchState(is_rtp=is_rtp), addr, now, asym, P, mode, lock)


def latched(src, mode=D, ssrc=0xAA, lock=False):
    st, v = latch.on_packet(sig(mode=mode, lock=lock), EV_UNLATCHED, src, True, ssrc, T0, 0, P)
    if mode is not D:                     # guarded modes report through mismatch, same outcome
        st, v = latch.on_packet(sig(mode=mode, lock=lock), EV_MISMATCH, src, True, ssrc, T0, 0, P)
    assert v is Verdict.LATCHED, v
    return st


# (name, state, event kind, source, rtp_valid, ssrc, now, last_rx) -> (verdict, remote, latched)
CASES = [
    # --- dynamic: first packet latches
    ("dyn: valid RTP from the SDP address latches", sig(), EV_UNLATCHED, SDP, True, 0xAA, T0 + 1, 0,
     Verdict.LATCHED, SDP, True),
    ("dyn: valid RTP from a NAT address latches there", sig(), EV_UNLATCHED, NAT, True, 0xAA, T0 + 1, 0,
     Verdict.LATCHED, NAT, True),
    ("dyn: a late first packet still latches", sig(), EV_UNLATCHED, NAT, True, 0xAA, LATE + 50, 0,
     Verdict.LATCHED, NAT, True),
    ("dyn: non-RTP first packet only fills", sig(), EV_UNLATCHED, NAT, False, 0, T0 + 1, 0,
     Verdict.FILLED, NAT, False),
    ("dyn: hold (no SDP address): first RTP latches", sig(None), EV_UNLATCHED, NAT, True, 0xAA, T0 + 1, 0,
     Verdict.LATCHED, NAT, True),
    # --- dynamic: latched
    ("dyn: in the window a new source takes over", latched(NAT), EV_MISMATCH, OTHER, True, 0xBB, T0 + 1, 0,
     Verdict.RELATCHED, OTHER, True),
    ("dyn: in the window the SDP address takes over", latched(NAT), EV_MISMATCH, SDP, True, 0xBB, T0 + 1, 0,
     Verdict.RELATCHED, SDP, True),
    ("dyn: latched to the exact SDP address, the window does not let others in", latched(SDP), EV_MISMATCH,
     OTHER, True, 0xBB, T0 + 1, 0, Verdict.REFUSED, SDP, True),
    ("dyn: after the window a new source is refused", latched(NAT), EV_MISMATCH, OTHER, True, 0xBB, LATE, QUIET,
     Verdict.REFUSED, NAT, True),
    ("dyn: N consecutive packets while the latched source is silent: re-latch", latched(NAT), EV_CANDIDATE,
     OTHER, True, 0xBB, LATE, QUIET, Verdict.RELATCHED, OTHER, True),
    ("dyn: N consecutive packets while the latched source is active: refused", latched(NAT), EV_CANDIDATE,
     OTHER, True, 0xAA, LATE, BUSY, Verdict.REFUSED, NAT, True),
    ("dyn: a candidate replaces even a confirmed SDP address once it went silent", latched(SDP), EV_CANDIDATE,
     NAT, True, 0xAA, LATE, QUIET, Verdict.RELATCHED, NAT, True),
    ("dyn: same source, nothing to do", latched(NAT), EV_MISMATCH, NAT, True, 0xAA, LATE, QUIET,
     Verdict.UNCHANGED, NAT, True),
    # --- strict
    ("strict: any other source is refused, even in the window", sig(mode=S), EV_MISMATCH, NAT, True, 0xAA,
     T0 + 1, 0, Verdict.REFUSED, SDP, True),
    ("strict: candidates are refused", sig(mode=S), EV_CANDIDATE, SAME_IP, True, 0xAA, LATE, QUIET,
     Verdict.REFUSED, SDP, True),
    ("strict: hold accepts nobody", sig(None, mode=S), EV_UNLATCHED, NAT, True, 0xAA, T0 + 1, 0,
     Verdict.REFUSED, None, False),
    # --- dynamic-strict
    ("dstrict: first packet from another IP is refused", sig(mode=X), EV_MISMATCH, NAT, True, 0xAA, T0 + 1, 0,
     Verdict.REFUSED, SDP, False),
    ("dstrict: first packet from the SDP IP, other port, latches", sig(mode=X), EV_MISMATCH, SAME_IP, True,
     0xAA, T0 + 1, 0, Verdict.LATCHED, SAME_IP, True),
    ("dstrict: in the window a new IP is refused", latched(SDP, X), EV_MISMATCH, OTHER, True, 0xBB, T0 + 1, 0,
     Verdict.REFUSED, SDP, True),
    ("dstrict: in the window a port change on the SDP IP is accepted", latched(SAME_IP, X), EV_MISMATCH, SDP,
     True, 0xBB, T0 + 1, 0, Verdict.RELATCHED, SDP, True),
    ("dstrict: NAT rebinding (same IP) after N packets and silence", latched(SDP, X), EV_CANDIDATE, SAME_IP,
     True, 0xAA, LATE, QUIET, Verdict.RELATCHED, SAME_IP, True),
    ("dstrict: a candidate from another IP is refused", latched(SDP, X), EV_CANDIDATE, OTHER, True, 0xAA,
     LATE, QUIET, Verdict.REFUSED, SDP, True),
    ("dstrict: hold (no SDP address) accepts nobody", sig(None, mode=X), EV_UNLATCHED, NAT, True, 0xAA,
     T0 + 1, 0, Verdict.REFUSED, None, False),
    # --- asymmetric
    ("asymmetric never learns", sig(asym=True), EV_MISMATCH, NAT, True, 0xAA, T0 + 1, 0,
     Verdict.REFUSED, SDP, True),
    # --- SSRC lock
    ("lock: another SSRC from the latched address after the window is refused", latched(NAT, lock=True),
     EV_MISMATCH, NAT, True, 0xBB, LATE, QUIET, Verdict.REFUSED, NAT, True),
    ("lock: inside the window a new SSRC is adopted", latched(NAT, lock=True), EV_MISMATCH, NAT, True, 0xBB,
     T0 + 1, 0, Verdict.RELATCHED, NAT, True),
]


@pytest.mark.parametrize("name,st,kind,src,valid,ssrc,now,last_rx,verdict,remote,is_latched", CASES,
                         ids=[c[0] for c in CASES])
def test_on_packet(name, st, kind, src, valid, ssrc, now, last_rx, verdict, remote, is_latched):
    new, v = latch.on_packet(st, kind, src, valid, ssrc, now, last_rx, P)
    assert v is verdict
    assert new.remote == remote
    assert new.latched is is_latched
    if v in (Verdict.REFUSED, Verdict.UNCHANGED):
        assert new == st


def test_ssrc_relock_is_remembered():
    new, _ = latch.on_packet(latched(NAT, lock=True), EV_MISMATCH, NAT, True, 0xBB, T0 + 1, 0, P)
    assert new.ssrc == 0xBB


def test_rtcp_latches_on_first_packet_and_follows_rtp():
    rtcp = sig((SDP[0], SDP[1] + 1), is_rtp=False)
    new, v = latch.on_packet(rtcp, EV_UNLATCHED, NAT, False, 0, T0 + 1, 0, P)
    assert v is Verdict.LATCHED and new.remote == NAT
    # RTP moved to another IP: RTCP is expected from that IP, port + 1 first, and re-learns its port there
    moved = latch.follow_rtp(new, OTHER)
    assert moved.remote == (OTHER[0], OTHER[1] + 1) and not moved.latched and moved.expect_ip == OTHER[0]
    assert latch.on_packet(moved, EV_MISMATCH, NAT, False, 0, LATE, 0, P)[1] is Verdict.REFUSED
    got, v = latch.on_packet(moved, EV_MISMATCH, (OTHER[0], 7000), False, 0, LATE, 0, P)
    assert v is Verdict.LATCHED and got.remote == (OTHER[0], 7000) and got.expect_ip is None
    assert latch.follow_rtp(got, (OTHER[0], 9999)) == got       # same IP: RTCP knows its own port


def test_signalling_prefills_until_packets_teach_better():
    st = sig()
    assert st.remote == SDP and not st.learned
    st = latch.signal(st, OTHER, T0 + 1, False, P)
    assert st.remote == OTHER
    learned = latched(NAT)
    moved = latch.signal(learned, OTHER, T0 + 30, False, P)
    assert moved.remote == NAT and moved.signalled == OTHER
    assert moved.in_window(T0 + 31) and not moved.in_window(T0 + 30 + W)


def test_per_call_mode_overrides_the_policy():
    assert sig(mode=None).mode is D
    assert latch.signal(LatchState(), SDP, T0, False, Policy(mode=S)).mode is S
    assert latch.signal(LatchState(), SDP, T0, False, Policy(mode=S), Mode.DYNAMIC).mode is D


@pytest.mark.parametrize("st,now,expected", [
    (sig(), T0, (SDP, MISMATCH_FORWARD_UNHEARD, MATCH_ADDR, None, 0)),                # dyn learning: SDP pre-latched
    (sig(None), T0, (None, MISMATCH_FORWARD, MATCH_ADDR, None, 0)),                   # dyn learning, no SDP address
    (latched(NAT), T0 + 1, (NAT, MISMATCH_FORWARD, MATCH_ADDR, None, 3)),             # dyn, window open
    (latched(SDP), T0 + 1, (SDP, MISMATCH_DROP, MATCH_ADDR, None, 3)),                # confirmed: no forward
    (latched(NAT), LATE, (NAT, MISMATCH_DROP, MATCH_ADDR, None, 3)),                  # window closed
    (latched(NAT, lock=True), LATE, (NAT, MISMATCH_DROP, MATCH_ADDR, 0xAA, 3)),       # SSRC lock
    (sig(mode=S), T0, (SDP, MISMATCH_DROP, MATCH_ADDR, None, 0)),                     # strict
    (sig(None, mode=S), T0, (None, MISMATCH_DROP, MATCH_ADDR, None, 0)),              # strict hold: drop all
    (sig(mode=X), T0, (SDP, MISMATCH_DROP, MATCH_ADDR, None, 0)),                     # guarded: SDP pre-latched
    (latched(SDP, X), T0 + 1, (SDP, MISMATCH_DROP, MATCH_ADDR, None, 3)),             # dstrict never forwards
    (sig(asym=True), T0 + 1, (SDP, MISMATCH_DROP, MATCH_IP, None, 0)),                # asymmetric: pinned IP
    (sig(is_rtp=False), T0, (SDP, MISMATCH_FORWARD_UNHEARD, MATCH_ADDR, None, 0)),    # RTCP: no candidates
])
def test_engine_view(st, now, expected):
    v = latch.engine_view(st, now, P)
    assert (v.latched, v.on_mismatch, v.match, v.lock_ssrc, v.relatch_packets) == expected
    # a forwarding window carries its own end, so the engine closes it without being told
    assert v.forward_until == (st.window_until if v.on_mismatch == MISMATCH_FORWARD and st.latched else 0.0)


def test_adopting_what_the_engine_accepted():
    st = sig()
    assert latch.pre_latched(st)
    assert latch.adopt(st, False, 0xAB) is st                          # nothing from the SDP address yet
    got = latch.adopt(st, True, 0xAB)
    assert got.latched and got.remote == SDP and got.confirmed and got.ssrc == 0xAB and got.learned
    assert not latch.pre_latched(got) and latch.adopt(got, True, 1) is got
    assert not latch.pre_latched(latched(NAT))                       # learned elsewhere: nothing to adopt
    assert not latch.pre_latched(sig(mode=S)) and not latch.pre_latched(sig(asym=True))
    assert not latch.pre_latched(sig(None))
    rtcp = latch.adopt(sig(is_rtp=False), True, 0xAB)
    assert rtcp.latched and rtcp.ssrc == 0
