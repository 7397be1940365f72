"""RTP Bleed and friends, with real packets on loopback, for every latching mode and backend.

The parties (caller A, callee B) live on 127.0.0.1 and talk continuously at 50 packets/s, as
phones do; the attacker M sends from 127.0.0.66. Each case asserts who gets media. In strict and
dynamic-strict modes the attacker never receives a single media packet, in any case."""
from __future__ import annotations

import itertools
import time

import pytest

from conftest import Peer, Relay, Talker, rtp_packet, ssrc_of

ATTACKER_IP = "127.0.0.66"
SSRC_A, SSRC_B, SSRC_M = 0xA0A0A0A0, 0xB0B0B0B0, 0x0BAD0BAD
WINDOW = 1.0
_calls = itertools.count()


@pytest.fixture(scope="module", params=[(b, m) for b in ("c", "py") for m in ("strict", "dynamic", "dynamic-strict")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def relay(request, tmp_path_factory):
    backend, mode = request.param
    r = Relay(["--latching", mode, "--update-window", str(WINDOW), "--relatch-silence", "0.2"], backend,
              tmp_path_factory.mktemp("atk"))
    r.mode = mode
    r.start()
    yield r
    r.stop()


class Call:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.cid = f"atk{next(_calls)}"
        self.a, self.b, self.m = Peer(), Peer(), Peer(ATTACKER_IP)
        self.p0 = int(relay.cmd(f"U {self.cid} 127.0.0.1 {self.a.port} ft;1").split()[0])
        self.p1 = int(relay.cmd(f"L {self.cid} 127.0.0.1 {self.b.port} ft;1 tt;1").split()[0])
        self.talkers: list[Talker] = []

    def talk(self, peer: Peer, dst_port: int, ssrc: int, start_seq: int = 0) -> Talker:
        t = Talker(peer, ("127.0.0.1", dst_port), ssrc, start_seq).start()
        self.talkers.append(t)
        return t

    def both_talk(self) -> None:
        self.talk(self.a, self.p1, SSRC_A)
        self.talk(self.b, self.p0, SSRC_B)

    def settle(self) -> None:
        """Let the update window after the U/L close (the relay applies it on its 1 s tick)."""
        time.sleep(WINDOW + 1.2)

    def stop(self) -> None:
        for t in self.talkers:
            t.stop()
        self.talkers.clear()

    def received(self, peer: Peer) -> list[int]:
        return [ssrc_of(d) for d, _ in peer.drain(0.2) if len(d) >= 12]

    def close(self) -> None:
        self.stop()
        self.relay.cmd(f"D {self.cid} ft tt")
        for p in (self.a, self.b, self.m):
            p.close()


@pytest.fixture
def call(relay):
    c = Call(relay)
    yield c
    c.close()


def spray(m: Peer, ports, ssrc: int, rounds: int = 4) -> None:
    """Consecutive-sequence RTP to every port, as a port-range scanner would send it."""
    for r in range(rounds):
        for port in ports:
            m.send(rtp_packet(r, ssrc), ("127.0.0.1", port))
        time.sleep(0.02)


def test_attacker_sends_before_the_parties(relay, call):
    for seq in range(10):                                   # M is first, right after U/L
        call.m.send(rtp_packet(seq, SSRC_M), ("127.0.0.1", call.p1))
        time.sleep(0.005)
    call.both_talk()
    time.sleep(0.5)
    early_m = call.received(call.m)
    time.sleep(1.0)
    call.stop()
    got_a, got_b, late_m = call.received(call.a), call.received(call.b), call.received(call.m)
    assert set(got_a) == {SSRC_B} and len(got_a) >= 60            # A gets B's media
    assert SSRC_A in got_b and len(got_b) >= 60                     # B gets A's media
    assert late_m == []                                             # once A speaks, M gets nothing
    if relay.mode == "dynamic":
        # dynamic latches M's first packet (rtpproxy does too); the SDP address wins back at once
        assert len(early_m) <= 5
        assert set(got_b) <= {SSRC_A, SSRC_M}
    else:
        assert early_m == []                                        # never a single packet
        assert set(got_b) == {SSRC_A}                               # and nothing injected


def test_attacker_sprays_the_port_range_during_a_call(relay, call):
    call.both_talk()
    call.settle()
    spray(call.m, range(relay.min_port, relay.max_port + 1), SSRC_M)
    time.sleep(0.3)
    call.stop()
    assert call.received(call.m) == []
    assert set(call.received(call.b)) == {SSRC_A}
    assert set(call.received(call.a)) == {SSRC_B}


def test_attacker_copies_the_ssrc_and_sequence(relay, call):
    ta = call.talk(call.a, call.p1, SSRC_A)
    call.talk(call.b, call.p0, SSRC_B)
    call.settle()
    for i in range(20):                                     # the stream's own SSRC, sequence just ahead
        call.m.send(rtp_packet(ta.seq + 1 + i, SSRC_A, payload=b"\x00" * 160), ("127.0.0.1", call.p1))
        time.sleep(0.01)
    time.sleep(0.3)
    call.stop()
    assert call.received(call.m) == []
    forged = [d for d, _ in call.b.drain(0.2) if d.endswith(b"\x00" * 160)]
    assert forged == []


def test_nat_rebinding_of_the_caller(relay, call):
    ta = call.talk(call.a, call.p1, SSRC_A)
    call.talk(call.b, call.p0, SSRC_B)
    call.settle()
    ta.stop()                                               # the NAT gives A a new port ...
    a2 = Peer("127.0.0.1")
    try:
        call.talk(a2, call.p1, SSRC_A, start_seq=ta.seq)    # ... and the stream continues from it
        call.b.flush()
        time.sleep(1.0)
        call.stop()
        from_a2_at_b = call.received(call.b)
        at_a2 = call.received(a2)
        if relay.mode == "strict":
            assert from_a2_at_b == [] and at_a2 == []          # strict follows no one
        else:
            # 50 packets in the second; up to ~13 are lost proving the move (0.2 s silence + 3 in a row)
            assert len(from_a2_at_b) >= 32 and len(at_a2) >= 32
        assert call.received(call.m) == []
    finally:
        a2.close()


def test_reinvite_moves_the_callee(relay, call):
    call.talk(call.a, call.p1, SSRC_A)
    tb = call.talk(call.b, call.p0, SSRC_B)
    call.settle()
    b2 = Peer("127.0.0.2")                                  # the callee moves to a new address
    try:
        assert int(relay.cmd(f"U {call.cid} 127.0.0.2 {b2.port} tt;1 ft;1").split()[0]) == call.p1
        tb.stop()
        call.talk(b2, call.p0, SSRC_B, start_seq=tb.seq)
        time.sleep(0.3)                                     # B2's first packets move the stream
        for p in (call.a, call.b, b2):
            p.flush()
        time.sleep(1.0)
        call.stop()
        assert len(call.received(b2)) >= 40                 # A's media now goes to the new address
        assert len(call.received(call.a)) >= 40             # and B's new address reaches A
        assert call.received(call.b) == []                  # the old address gets nothing more
    finally:
        b2.close()
