"""Table-driven tests of every transition of the latching policy (rtpproxy's rules)."""
from __future__ import annotations

import pytest

from rtpproxy import latch
from rtpproxy.engine_api import MATCH_ADDR, MATCH_IP, MISMATCH_DROP, MISMATCH_FORWARD
from rtpproxy.latch import LatchState, Verdict

SDP = ("198.51.100.7", 4000)
NAT = ("203.0.113.5", 61000)
OTHER = ("192.0.2.66", 5555)
T0 = 100.0
W = latch.UPDATE_WINDOW_S


def signalled(addr=SDP, asym=False, now=T0):
    return latch.signal(LatchState(), addr, now, asym)


def latched_to(src, ssrc=0xAA, now=T0):
    st, v = latch.on_packet(signalled(now=now), src, True, ssrc, 1, now, 0, 0)
    assert v is Verdict.LATCHED
    return st


# (name, state, packet source, rtp_valid, ssrc, seq, now, last_ssrc, last_seq) -> (verdict, remote, latched)
CASES = [
    ("first valid RTP from the SDP address latches", signalled(), SDP, True, 0xAA, 1, T0 + 1, 0, 0,
     Verdict.LATCHED, SDP, True),
    ("first valid RTP from a NAT address latches there", signalled(), NAT, True, 0xAA, 1, T0 + 1, 0, 0,
     Verdict.LATCHED, NAT, True),
    ("late first packet (after the window) still latches", signalled(), NAT, True, 0xAA, 1, T0 + W + 50, 0, 0,
     Verdict.LATCHED, NAT, True),
    ("non-RTP first packet only fills", signalled(), NAT, False, 0, 0, T0 + 1, 0, 0,
     Verdict.FILLED, NAT, False),
    ("SSRC 0 is not valid RTP: fills only", signalled(), NAT, False, 0, 5, T0 + 1, 0, 0,
     Verdict.FILLED, NAT, False),
    ("no SDP address (hold): first RTP latches", signalled(None), NAT, True, 0xAA, 1, T0 + 1, 0, 0,
     Verdict.LATCHED, NAT, True),
    ("latched: same source changes nothing", latched_to(NAT), NAT, True, 0xAA, 2, T0 + W + 1, 0xAA, 1,
     Verdict.UNCHANGED, NAT, True),
    ("latched: other source inside the update window re-latches", latched_to(NAT), OTHER, True, 0xBB, 9,
     T0 + 1, 0xAA, 1, Verdict.RELATCHED, OTHER, True),
    ("latched: other source after the window is refused", latched_to(NAT), OTHER, True, 0xBB, 9,
     T0 + W + 1, 0xAA, 1, Verdict.REFUSED, NAT, True),
    ("latched: same SSRC, close seq after the window: NAT rebinding re-latches", latched_to(NAT), OTHER,
     True, 0xAA, 30, T0 + W + 1, 0xAA, 20, Verdict.RELATCHED, OTHER, True),
    ("seq distance 536 is still the same stream", latched_to(NAT), OTHER, True, 0xAA, 556, T0 + W + 1,
     0xAA, 20, Verdict.RELATCHED, OTHER, True),
    ("seq distance 537 is refused", latched_to(NAT), OTHER, True, 0xAA, 557, T0 + W + 1, 0xAA, 20,
     Verdict.REFUSED, NAT, True),
    ("seq wrap-around counts as close", latched_to(NAT), OTHER, True, 0xAA, 3, T0 + W + 1, 0xAA, 65530,
     Verdict.RELATCHED, OTHER, True),
    ("copied SSRC but the stream has moved on (counters differ) is refused", latched_to(NAT), OTHER, True,
     0xAA, 30, T0 + W + 1, 0xCC, 20, Verdict.REFUSED, NAT, True),
    ("non-RTP from another source after the window is refused", latched_to(NAT), OTHER, False, 0, 0,
     T0 + W + 1, 0xAA, 1, Verdict.REFUSED, NAT, True),
    ("asymmetric never learns", signalled(asym=True), NAT, True, 0xAA, 1, T0 + 1, 0, 0,
     Verdict.UNCHANGED, SDP, True),
]


@pytest.mark.parametrize("name,st,src,valid,ssrc,seq,now,lssrc,lseq,verdict,remote,is_latched", CASES,
                         ids=[c[0] for c in CASES])
def test_on_packet(name, st, src, valid, ssrc, seq, now, lssrc, lseq, verdict, remote, is_latched):
    new, v = latch.on_packet(st, src, valid, ssrc, seq, now, lssrc, lseq)
    assert v is verdict
    assert new.remote == remote
    assert new.latched is is_latched
    if v is Verdict.REFUSED or v is Verdict.UNCHANGED:
        assert new == st


def test_rtcp_latches_on_first_packet_without_ssrc():
    st = latch.signal(LatchState(is_rtp=False), (SDP[0], SDP[1] + 1), T0, False)
    new, v = latch.on_packet(st, NAT, False, 0, 0, T0 + 1, 0, 0)
    assert v is Verdict.LATCHED and new.remote == NAT and new.latched


def test_signalling_prefills_until_packets_teach_better():
    st = signalled()
    assert st.remote == SDP and not st.learned
    st = latch.signal(st, OTHER, T0 + 1, False)            # a new SDP address moves an unlearned stream
    assert st.remote == OTHER
    learned = latched_to(NAT)
    moved = latch.signal(learned, OTHER, T0 + 30, False)    # a learned address is kept ...
    assert moved.remote == NAT and moved.signalled == OTHER
    assert moved.in_window(T0 + 31) and not moved.in_window(T0 + 30 + W)   # ... but the window reopens


def test_hold_does_not_prefill():
    assert signalled(None).remote is None


def test_rtcp_guess_follows_rtp_unless_learned():
    rtcp = latch.signal(LatchState(is_rtp=False), (SDP[0], SDP[1] + 1), T0, False)
    assert latch.guess_rtcp(rtcp, NAT).remote == (NAT[0], NAT[1] + 1)
    learned, _ = latch.on_packet(rtcp, OTHER, False, 0, 0, T0, 0, 0)
    assert latch.guess_rtcp(learned, NAT) == learned


@pytest.mark.parametrize("st,now,expected", [
    (signalled(), T0, (None, MISMATCH_FORWARD, MATCH_ADDR)),                  # not latched: learn
    (latched_to(NAT), T0 + 1, (NAT, MISMATCH_FORWARD, MATCH_ADDR)),           # window open
    (latched_to(NAT), T0 + W, (NAT, MISMATCH_DROP, MATCH_ADDR)),              # window closed
    (signalled(asym=True), T0 + 1, (SDP, MISMATCH_DROP, MATCH_IP)),           # asymmetric: pinned IP
])
def test_engine_view(st, now, expected):
    v = latch.engine_view(st, now)
    assert (v.latched, v.on_mismatch, v.match) == expected
