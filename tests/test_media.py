"""Media through a real daemon on loopback, both backends: relaying both ways, latching as
rtpproxy does it, timeouts and timeout notifications."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import Peer, Talker, port_is_free, rtp_packet, ssrc_of, wait_for

WINDOW = "1"        # --update-window for latching tests; rtpproxy's 10 s would only make them slow


def call(relay, a, b, cid="call1", mods=""):
    """Set up a call as Kamailio does: U with the caller's SDP address, L with the callee's.
    Returns (port the callee sends to, port the caller sends to)."""
    p0 = int(relay.cmd(f"U{mods} {cid} {a.addr[0]} {a.port} ft;1").split()[0])
    p1 = int(relay.cmd(f"L{mods} {cid} {b.addr[0]} {b.port} ft;1 tt;1").split()[0])
    return p0, p1


def stream(src, dst_port, n, ssrc=0x1234, start=0, host="127.0.0.1", ptime=0.0):
    for i in range(n):
        src.send(rtp_packet(start + i, ssrc), (host, dst_port))
        if ptime:
            time.sleep(ptime)


def test_relays_both_ways_from_the_relay_ports(make_relay, backend, peers):
    relay = make_relay(backend=backend)
    a, b = peers(), peers()
    p0, p1 = call(relay, a, b)
    stream(a, p1, 20)
    got_b = b.drain()
    stream(b, p0, 20, ssrc=0x5678)
    got_a = a.drain()
    assert len(got_b) == 20 and len(got_a) == 20
    assert {src for _, src in got_b} == {("127.0.0.1", p0)}       # callee sees the relay's P0
    assert {src for _, src in got_a} == {("127.0.0.1", p1)}       # caller sees the relay's P1
    assert [d for d, _ in got_b] == [rtp_packet(i, 0x1234) for i in range(20)]
    q = relay.cmd("Q call1 ft;1 tt").split()
    assert q[1:] == ["20", "20", "40", "0"]


def test_rtcp_on_the_next_port(make_relay, backend, peers):
    """RTCP goes to SDP port + 1 and leaves from the relay's RTP port + 1."""
    relay = make_relay(backend=backend)
    a_rtp, a_rtcp = _peer_pair()
    b_rtp, b_rtcp = _peer_pair()
    try:
        p0, p1 = call(relay, a_rtp, b_rtp)
        a_rtcp.send(b"\x81\xc8\x00\x06" + b"\0" * 24, ("127.0.0.1", p1 + 1))
        got = b_rtcp.drain()
        assert len(got) == 1 and got[0][1] == ("127.0.0.1", p0 + 1)
    finally:
        for p in (a_rtp, a_rtcp, b_rtp, b_rtcp):
            p.close()


def _peer_pair():
    """Two peers on consecutive ports (RTP even, RTCP odd), as an SDP endpoint has them."""
    for _ in range(100):
        rtp = Peer()
        if rtp.port % 2 == 0:
            try:
                return rtp, Peer("127.0.0.1", rtp.port + 1)
            except OSError:
                pass
        rtp.close()
    raise RuntimeError("no consecutive free ports")


def test_late_first_packet_and_nat_source(make_relay, backend, peers):
    """The caller's SDP says one port, its packets come from another (NAT): the relay latches
    to the real source and sends the callee's media there, not to the SDP address."""
    relay = make_relay(backend=backend)
    sdp_only, natted, b = peers(), peers(), peers()
    p0, p1 = call(relay, sdp_only, b)
    time.sleep(0.5)                                   # the caller starts late
    stream(natted, p1, 5)
    assert len(b.drain()) == 5
    stream(b, p0, 5, ssrc=0x9999)
    assert len(natted.drain()) == 5
    assert sdp_only.drain(0.1) == []
    assert f"latched rtp 127.0.0.1:{natted.port}" in relay.log()


def test_latched_stream_refuses_other_sources_after_the_window(make_relay, backend, peers):
    relay = make_relay("--update-window", WINDOW, backend=backend)
    a, b, attacker = peers(), peers(), peers()
    p0, p1 = call(relay, a, b)
    stream(a, p1, 3)
    assert len(b.drain()) == 3
    stream(b, p0, 3, ssrc=0x5555)
    assert len(a.drain()) == 3
    # Inside the update window a new source may take over (re-INVITE case); after it, not while
    # the latched party keeps talking.
    _age_window(relay)
    talker = Talker(a, ("127.0.0.1", p1), 0x1234, start_seq=3).start()
    try:
        time.sleep(0.1)
        stream(attacker, p1, 10, ssrc=0xBAD, ptime=0.01)
        time.sleep(0.1)
    finally:
        talker.stop()
    assert {ssrc_of(d) for d, _ in b.drain()} == {0x1234}
    stream(b, p0, 3, ssrc=0x5555, start=3)
    assert len(a.drain()) == 3 and attacker.drain(0.1) == []
    assert f"refused media from 127.0.0.1:{attacker.port}" in relay.log()
    assert int(relay.cmd("G latch_refused")) >= 1
    q = relay.cmd("Q call1 ft;1 tt").split()
    assert int(q[4]) >= 10                             # the attacker's packets were dropped and counted


def _age_window(relay):
    """Wait until the update window after the last U/L has closed and the relay has applied it
    (it does so on its 1 s tick)."""
    time.sleep(float(WINDOW) + 1.2)


def test_nat_rebinding_same_ssrc_relatches(make_relay, backend, peers):
    relay = make_relay("--update-window", WINDOW, backend=backend)
    a, b, rebound = peers(), peers(), peers()
    p0, p1 = call(relay, a, b)
    stream(a, p1, 5, ssrc=0xAAAA)
    assert len(b.drain()) == 5
    _age_window(relay)
    # Same SSRC, sequence continuing, from a new port: a NAT rebinding, not an attacker. The
    # relay takes it after 3 consecutive packets, the old port having gone silent.
    stream(rebound, p1, 10, ssrc=0xAAAA, start=5, ptime=0.02)       # paced like real 20 ms RTP
    got = b.drain()
    assert len(got) == 7                               # the 3 that proved the new source were dropped
    stream(b, p0, 3, ssrc=0xBBBB)
    assert len(rebound.drain()) == 3 and a.drain(0.1) == []
    assert f"re-latched rtp 127.0.0.1:{rebound.port}" in relay.log()


def test_reinvite_moves_media_to_the_new_address(make_relay, backend, peers):
    relay = make_relay("--update-window", WINDOW, backend=backend)
    a, b, b2 = peers(), peers(), peers()
    p0, p1 = call(relay, a, b)
    stream(b, p0, 3, ssrc=0x1)
    stream(a, p1, 3, ssrc=0x2)
    assert len(a.drain()) == 3 and len(b.drain()) == 3
    _age_window(relay)
    # The callee moves: re-INVITE from the callee, SDP with its new address.
    assert int(relay.cmd(f"U call1 {b2.addr[0]} {b2.port} tt;1 ft;1").split()[0]) == p1
    stream(b2, p0, 3, ssrc=0x3)
    assert len(a.drain()) == 3
    stream(a, p1, 3, ssrc=0x2, start=3)
    assert len(b2.drain()) == 3 and b.drain(0.1) == []


def test_asymmetric_pins_the_signalled_address(make_relay, backend, peers):
    relay = make_relay(backend=backend)
    a, b, other_port_same_ip = peers(), peers(), peers()
    p0, p1 = call(relay, a, b, mods="A")
    # Packets from a's IP but another port are accepted (asymmetric checks the IP only) ...
    stream(other_port_same_ip, p1, 4)
    assert len(b.drain()) == 4
    # ... and media towards a still goes to its signalled address, never to the packet source.
    stream(b, p0, 4, ssrc=0x77)
    assert len(a.drain()) == 4 and other_port_same_ip.drain(0.1) == []


def test_setup_and_established_timeouts(make_relay, backend, peers):
    relay = make_relay("-T", "5", "-W", "2", backend=backend)
    a, b = peers(), peers()
    relay.cmd(f"U half {a.addr[0]} {a.port} ft;1")
    p0, p1 = call(relay, a, b, cid="full")
    t0 = time.monotonic()
    assert wait_for(lambda: relay.cmd("Q half ft;1") == "E50", timeout=6)
    assert time.monotonic() - t0 < 4.5                          # -W 2 (+1 s tick), well before -T 5
    assert relay.cmd("Q full ft;1") != "E50"
    # media keeps the complete session alive past -T
    for i in range(25):
        a.send(rtp_packet(i, 0x42), ("127.0.0.1", p1))
        time.sleep(0.2)
    assert relay.cmd("Q full ft;1") != "E50"
    assert wait_for(lambda: relay.cmd("Q full ft;1") == "E50", timeout=9)
    assert relay.cmd(f"L full {b.addr[0]} {b.port} ft;1 tt;1") == "0"
    assert "timed out" in relay.log()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_timeout_notification(make_relay, backend, tmp_path, kind):
    received: list[bytes] = []
    if kind == "unix":
        path = str(tmp_path / "notify.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        target, arg = f"unix:{path}", path                     # a bare path in U matches unix:
    else:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        target = f"tcp:127.0.0.1:{srv.getsockname()[1]}"
        arg = target
    srv.listen(1)
    srv.settimeout(10)

    def accept():
        conn, _ = srv.accept()
        conn.settimeout(10)
        received.append(conn.recv(100))
        conn.close()

    t = threading.Thread(target=accept)
    t.start()
    relay = make_relay("-T", "2", "-W", "2", "-n", target, backend=backend)
    assert relay.cmd("VF 20081224") == "1"
    assert relay.cmd(f"U ncall 127.0.0.1 4000 ft;1 {arg} my%20tag") .split()[0].isdigit()
    assert relay.cmd("U other 127.0.0.1 4000 ft;1 /not/allowed tag").split()[0].isdigit()   # ignored
    assert relay.cmd("U ncall2 127.0.0.1 4000 ft;1 sock bad%zz") == "E10"
    t.join(12)
    srv.close()
    assert received == [b"my tag\n"]


def test_deleted_session_releases_ports_and_streams(make_relay, backend, peers):
    relay = make_relay(backend=backend)
    a, b = peers(), peers()
    p0, p1 = call(relay, a, b)
    assert relay.cmd("D call1 ft tt") == "0"
    stream(a, p1, 3)
    assert b.drain(0.2) == []
    assert "active streams: 0" in relay.cmd("I")
    # The relay lets go of the sockets within a fraction of a second (D answers without waiting
    # for the engine's workers; they close once a grace period shows no worker can use them).
    assert wait_for(lambda: all(port_is_free(p) for p in (p0, p0 + 1, p1, p1 + 1)), timeout=2.5)
