"""The relay engines directly, both backends on the same cases: forwarding, the latched-source
check, counters, events and their rate limit, and safe deletion."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from conftest import rtp_packet
from rtpproxy.engine_api import (
    EV_CANDIDATE,
    EV_MISMATCH,
    EV_SILENT,
    EV_UNLATCHED,
    MATCH_IP,
    MISMATCH_FORWARD,
    StreamConfig,
)
from rtpproxy.errors import EngineError
from rtpproxy.relay import EVENT_BURST, EVENTS_PER_SEC, open_engine


def udp(host="127.0.0.1"):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


class Rig:
    def __init__(self, backend, silence_ms=0):
        self.loop = asyncio.new_event_loop()
        self.engine = open_engine(backend, 2, 64, silence_ms=silence_ms)
        self.events = []
        self.engine.start(self.loop, self.events.extend)
        self.socks = []

    def sock(self, host="127.0.0.1"):
        s = udp(host)
        self.socks.append(s)
        return s

    def run(self, seconds=0.2):
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def recv_all(self, s):
        out = []
        while True:
            try:
                data, src = s.recvfrom(4096)
                out.append((data, src[:2]))
            except BlockingIOError:
                return out

    def close(self):
        self.engine.close()
        self.loop.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def rig(backend):
    r = Rig(backend)
    yield r
    r.close()


def test_forwards_accepted_packets_and_counts(rig):
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(3, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                          dst=callee.getsockname(), gen=7))
    for i in range(50):
        caller.sendto(rtp_packet(i, 0xCAFE), relay_in.getsockname())
    rig.run()
    got = rig.recv_all(callee)
    assert [d for d, _ in got] == [rtp_packet(i, 0xCAFE) for i in range(50)]
    assert {src for _, src in got} == {relay_out.getsockname()}
    c = rig.engine.counters(3)
    assert (c.packets, c.relayed, c.dropped, c.mismatched) == (50, 50, 0, 0)
    assert c.bytes == 50 * 172 and c.last_ssrc == 0xCAFE and c.last_seq == 49
    assert abs(c.last_rx_ns - time.monotonic_ns()) < 5e9
    assert rig.events == []                          # nothing to decide for a latched stream


def test_unlatched_stream_forwards_and_reports_source(rig):
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(1, StreamConfig(relay_in.fileno(), relay_out.fileno(), dst=callee.getsockname(), gen=9,
                                          on_mismatch=MISMATCH_FORWARD))
    caller.sendto(rtp_packet(5, 0xBEEF), relay_in.getsockname())
    rig.run()
    assert len(rig.recv_all(callee)) == 1
    (ev,) = rig.events
    assert (ev.kind, ev.stream_id, ev.gen, ev.src, ev.rtp_valid, ev.ssrc, ev.seq) == \
        (EV_UNLATCHED, 1, 9, caller.getsockname(), True, 0xBEEF, 5)


def test_mismatch_is_dropped_or_forwarded_as_configured(rig):
    relay_in, relay_out, caller, callee, attacker = (rig.sock() for _ in range(5))
    cfg = StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                       dst=callee.getsockname())
    rig.engine.stream_set(2, cfg)
    attacker.sendto(rtp_packet(1, 0xBAD), relay_in.getsockname())
    rig.run()
    assert rig.recv_all(callee) == []
    assert [e.kind for e in rig.events] == [EV_MISMATCH] and rig.events[0].src == attacker.getsockname()
    c = rig.engine.counters(2)
    assert (c.packets, c.relayed, c.dropped, c.mismatched) == (1, 0, 1, 1)
    rig.engine.stream_set(2, StreamConfig(cfg.fd, cfg.out_fd, cfg.latched, cfg.dst,
                                          on_mismatch=MISMATCH_FORWARD))
    attacker.sendto(rtp_packet(2, 0xBAD), relay_in.getsockname())
    rig.run()
    assert len(rig.recv_all(callee)) == 1


def test_ip_only_match_accepts_any_port_of_the_address(rig):
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(4, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=("127.0.0.1", 9),
                                          dst=callee.getsockname(), match=MATCH_IP))
    caller.sendto(b"x" * 20, relay_in.getsockname())
    rig.run()
    assert len(rig.recv_all(callee)) == 1


def test_no_destination_counts_a_drop(rig):
    relay_in, caller = rig.sock(), rig.sock()
    rig.engine.stream_set(5, StreamConfig(relay_in.fileno(), -1))
    caller.sendto(b"x" * 20, relay_in.getsockname())
    rig.run()
    c = rig.engine.counters(5)
    assert (c.packets, c.relayed, c.dropped) == (1, 0, 1)


def test_events_are_rate_limited_per_stream(rig):
    """A flood of spoofed sources raises at most burst + rate * time events."""
    relay_in, relay_out, callee = rig.sock(), rig.sock(), rig.sock()
    spoofers = [rig.sock() for _ in range(20)]
    rig.engine.stream_set(6, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=("127.0.0.1", 9),
                                          dst=callee.getsockname()))
    t0 = time.monotonic()
    for round_ in range(50):
        for s in spoofers:
            s.sendto(rtp_packet(round_, 0xBAD), relay_in.getsockname())
        rig.run(0.005)
    rig.run(0.2)
    elapsed = time.monotonic() - t0
    assert rig.engine.counters(6).mismatched == 1000
    assert 1 <= len(rig.events) <= EVENT_BURST + EVENTS_PER_SEC * elapsed + 1


def test_silence_event_once(backend):
    rig = Rig(backend, silence_ms=300)
    try:
        relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
        rig.engine.stream_set(7, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                              dst=callee.getsockname()))
        caller.sendto(rtp_packet(1), relay_in.getsockname())
        rig.run(1.2)
        assert [(e.kind, e.stream_id) for e in rig.events] == [(EV_SILENT, 7)]
    finally:
        rig.close()


def test_delete_then_fd_reuse_goes_to_the_new_stream(rig):
    """After stream_del returns, the old fd may be closed and its number reused at once."""
    a_in, a_out, caller, dest_a, dest_b = (rig.sock() for _ in range(5))
    rig.engine.stream_set(8, StreamConfig(a_in.fileno(), a_out.fileno(), latched=caller.getsockname(),
                                          dst=dest_a.getsockname()))
    rig.engine.stream_del(8)
    fd = a_in.fileno()
    rig.socks.remove(a_in)
    a_in.close()
    b_in = rig.sock()
    assert b_in.fileno() == fd                       # the kernel hands the same number out again
    rig.engine.stream_set(9, StreamConfig(b_in.fileno(), a_out.fileno(), latched=caller.getsockname(),
                                          dst=dest_b.getsockname()))
    caller.sendto(b"y" * 30, b_in.getsockname())
    rig.run()
    assert rig.recv_all(dest_a) == [] and len(rig.recv_all(dest_b)) == 1
    with pytest.raises(EngineError):
        rig.engine.stream_del(8)


def test_retired_fd_reuse_after_the_grace_period(rig):
    """retire + grace_begin/grace_passed, the control thread's path: nothing waits, and once
    the grace period has passed the old fd may be closed and its number reused at once."""
    a_in, a_out, caller, dest_a, dest_b = (rig.sock() for _ in range(5))
    rig.engine.stream_set(8, StreamConfig(a_in.fileno(), a_out.fileno(), latched=caller.getsockname(),
                                          dst=dest_a.getsockname()))
    rig.engine.stream_retire(8)
    rig.engine.grace_begin()
    deadline = time.monotonic() + 5
    while not rig.engine.grace_passed():
        assert time.monotonic() < deadline, "the grace period never passed"
        time.sleep(0.001)
    fd = a_in.fileno()
    rig.socks.remove(a_in)
    a_in.close()
    b_in = rig.sock()
    assert b_in.fileno() == fd
    rig.engine.stream_set(9, StreamConfig(b_in.fileno(), a_out.fileno(), latched=caller.getsockname(),
                                          dst=dest_b.getsockname()))
    caller.sendto(b"y" * 30, b_in.getsockname())
    rig.run()
    assert rig.recv_all(dest_a) == [] and len(rig.recv_all(dest_b)) == 1


def test_a_watched_control_socket_keeps_every_command(rig):
    """engine.watch(control socket): workers yield their core when a command arrives, and never
    take it: the control thread still reads every datagram, media keeps flowing."""
    control, client = rig.sock(), rig.sock()
    rig.engine.watch(control.fileno())
    a_in, a_out, caller, dest = (rig.sock() for _ in range(4))
    rig.engine.stream_set(3, StreamConfig(a_in.fileno(), a_out.fileno(), latched=caller.getsockname(),
                                          dst=dest.getsockname()))
    for i in range(3):
        client.sendto(b"cookie%d V" % i, control.getsockname())
        caller.sendto(rtp_packet(i), a_in.getsockname())
        rig.run(0.05)
    assert [d for d, _src in rig.recv_all(control)] == [b"cookie0 V", b"cookie1 V", b"cookie2 V"]
    assert len(rig.recv_all(dest)) == 3
    if rig.engine.name == "c":
        assert sum(w.control_yields for w in rig.engine.worker_stats()) >= 3   # both workers watch


def test_invalid_entries_are_refused(rig):
    with pytest.raises(EngineError):
        rig.engine.stream_set(10_000, StreamConfig(rig.sock().fileno()))
    with pytest.raises(EngineError):
        rig.engine.stream_set(1, StreamConfig(-1))


def test_ipv6_streams(rig):
    relay_in, relay_out, caller, callee = (rig.sock("::1") for _ in range(4))
    rig.engine.stream_set(11, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname()[:2],
                                           dst=callee.getsockname()[:2]))
    caller.sendto(rtp_packet(1), relay_in.getsockname())
    rig.run()
    assert [src for _, src in rig.recv_all(callee)] == [relay_out.getsockname()[:2]]


def test_worker_stats_cover_traffic(rig):
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(12, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                           dst=callee.getsockname()))
    for i in range(10):
        caller.sendto(rtp_packet(i), relay_in.getsockname())
    rig.run()
    st = rig.engine.worker_stats()
    assert sum(w.packets for w in st) == 10 and sum(w.relayed for w in st) == 10
    assert sum(w.streams for w in st) == 1


def test_unlatched_with_drop_drops_everything_and_reports(rig):
    """strict mode on hold, or guarded learning: nothing passes until Python decides."""
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(13, StreamConfig(relay_in.fileno(), relay_out.fileno(), dst=callee.getsockname()))
    caller.sendto(rtp_packet(1, 0x99), relay_in.getsockname())
    rig.run()
    assert rig.recv_all(callee) == []
    assert [(e.kind, e.ssrc) for e in rig.events] == [(EV_UNLATCHED, 0x99)]
    c = rig.engine.counters(13)
    assert (c.packets, c.dropped, c.mismatched, c.last_rx_ns) == (1, 1, 0, 0)


def test_ssrc_lock_drops_other_ssrcs_from_the_latched_address(rig):
    relay_in, relay_out, caller, callee = rig.sock(), rig.sock(), rig.sock(), rig.sock()
    rig.engine.stream_set(14, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                           dst=callee.getsockname(), lock_ssrc=0xAAAA))
    caller.sendto(rtp_packet(1, 0xAAAA), relay_in.getsockname())
    caller.sendto(rtp_packet(2, 0xBBBB), relay_in.getsockname())           # injected SSRC: dropped
    rtcp_mux = b"\x81\xc8\x00\x06" + b"\x00\x00\xbb\xbb" + b"\0" * 20   # RTCP on the RTP port: passes
    caller.sendto(rtcp_mux, relay_in.getsockname())
    rig.run()
    assert [d for d, _ in rig.recv_all(callee)] == [rtp_packet(1, 0xAAAA), rtcp_mux]
    c = rig.engine.counters(14)
    assert (c.relayed, c.dropped, c.mismatched, c.last_ssrc) == (2, 1, 1, 0xAAAA)
    assert [(e.kind, e.src, e.ssrc) for e in rig.events] == [(EV_MISMATCH, caller.getsockname(), 0xBBBB)]


def test_candidate_after_n_consecutive_packets_from_one_source(rig):
    relay_in, relay_out, caller, callee, other = (rig.sock() for _ in range(5))
    rig.engine.stream_set(15, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                           dst=callee.getsockname(), relatch_packets=3))
    for seq in (10, 11, 13, 14):                    # a gap restarts the count
        other.sendto(rtp_packet(seq, 0x77), relay_in.getsockname())
    rig.run()
    assert [e.kind for e in rig.events if e.kind == EV_CANDIDATE] == []
    other.sendto(rtp_packet(15, 0x77), relay_in.getsockname())             # 13, 14, 15: three in a row
    rig.run()
    cands = [e for e in rig.events if e.kind == EV_CANDIDATE]
    assert [(e.src, e.ssrc, e.seq) for e in cands] == [(other.getsockname(), 0x77, 15)]
    assert rig.recv_all(callee) == []               # still the engine's rule: dropped until Python decides


def test_events_keep_waking_the_loop_after_a_storm(rig):
    """Regression: a producer racing the consumer's re-arm once swallowed the wake-up, and every
    later event sat in the ring unannounced."""
    import random
    senders = [rig.sock() for _ in range(4)]
    ins = [rig.sock() for _ in range(40)]
    for i, s in enumerate(ins):
        rig.engine.stream_set(20 + i, StreamConfig(s.fileno(), -1))          # unlatched, DROP: all reported
    rng = random.Random(5)
    for _ in range(300):
        for s in rng.sample(ins, 6):
            rng.choice(senders).sendto(rtp_packet(1), s.getsockname())
        rig.run(0.002)
    rig.run(0.3)
    rig.events.clear()
    last_in = rig.sock()
    rig.engine.stream_set(60, StreamConfig(last_in.fileno(), -1))
    senders[0].sendto(rtp_packet(2), last_in.getsockname())
    rig.run(0.3)
    assert [(e.kind, e.stream_id) for e in rig.events] == [(EV_UNLATCHED, 60)]


def test_forward_window_closes_by_itself(rig):
    """A latched stream forwards other sources until its deadline, then drops them, with no call."""
    relay_in, relay_out, caller, callee, other = (rig.sock() for _ in range(5))
    until = time.monotonic_ns() + 300_000_000
    rig.engine.stream_set(61, StreamConfig(relay_in.fileno(), relay_out.fileno(), latched=caller.getsockname(),
                                           dst=callee.getsockname(), on_mismatch=MISMATCH_FORWARD,
                                           forward_until_ns=until))
    other.sendto(rtp_packet(1), relay_in.getsockname())
    rig.run(0.1)
    assert len(rig.recv_all(callee)) == 1                  # inside the window: forwarded
    rig.run(0.4)
    other.sendto(rtp_packet(2), relay_in.getsockname())
    rig.run(0.1)
    assert rig.recv_all(callee) == []                      # after it: dropped
    assert rig.engine.counters(61).dropped == 1
