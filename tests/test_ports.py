"""Port allocation: rtpproxy's range rounding, randomness, quarantine, exhaustion, busy ports."""
from __future__ import annotations

import random
import socket

import pytest

from rtpproxy.errors import PortsExhausted
from rtpproxy.ports import PortPool, bind_pair, port_range
from conftest import free_port_range


@pytest.mark.parametrize("lo,hi,expected", [
    (35000, 65000, (35000, 64998)),       # even -M: minus 2
    (35001, 65001, (35002, 65000)),       # odd -m rounds up, odd -M: minus 1
    (2000, 2003, (2000, 2002)),
])
def test_port_range(lo, hi, expected):
    assert port_range(lo, hi) == expected


def test_sequential_pairs_are_even_and_skip_control_ports():
    pool = PortPool(35000, 35010, sequential=True, skip=[35003])
    ports = [pool.take(0) for _ in range(len(pool))]
    assert ports == [35000, 35004, 35006, 35008]   # 35002 skipped: its RTCP port is the control port
    assert pool.take(0) is None


def test_random_order_and_quarantine():
    pool = PortPool(30000, 30100, rng=random.Random(7), quarantine=10)
    taken = [pool.take(0) for _ in range(20)]
    assert taken != sorted(taken) and all(p % 2 == 0 for p in taken) and len(set(taken)) == 20
    first = taken[0]
    pool.release(first, now=100)
    # while other ports are free, a released port is not reused within the quarantine
    again = {pool.take(105) for _ in range(len(pool) - 1)}
    assert first not in again
    assert pool.take(105) == first                  # last resort: the quarantined one


def test_quarantine_expires():
    pool = PortPool(30000, 30002, sequential=True, quarantine=10)
    p = pool.take(0)
    pool.release(p, 0)
    assert pool.take(11) == p


def test_bind_pair_skips_ports_in_use_and_reports_exhaustion():
    base = free_port_range(8)
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", base + 1))              # someone holds the RTCP port of the first pair
    pool = PortPool(base, base + 5, sequential=True)
    try:
        pair = bind_pair(pool, "127.0.0.1", 0)
        assert pair.port == base + 2
        assert pair.rtp.getsockname()[1] == base + 2 and pair.rtcp.getsockname()[1] == base + 3
        pair2 = bind_pair(pool, "127.0.0.1", 0)
        assert pair2.port == base + 4
        with pytest.raises(PortsExhausted):
            bind_pair(pool, "127.0.0.1", 0)
    finally:
        busy.close()
        for p in (pair, pair2):
            p.close()
