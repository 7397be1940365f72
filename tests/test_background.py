"""Deferred work of the control thread (service.background_slice / new_period): timeouts end in
bounded slices, and the sockets of ended calls are really closed once no worker can use them
(their ports free again, no descriptor left behind), without the control thread waiting."""
from __future__ import annotations

import asyncio
import os

import pytest

from conftest import port_is_free
from rtpproxy.config import Config
from rtpproxy.control.commands import Commands, Context
from rtpproxy.interfaces import parse_one
from rtpproxy.relay import open_engine
from rtpproxy.service import SLICE_EXPIRE, MediaService

CALLS = 20


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, backend):
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        cfg = Config()
        cfg.min_port, cfg.max_port = 50200, 50399
        cfg.interfaces = parse_one("127.0.0.1", "-l", 4)
        self.cfg = cfg
        self.engine = open_engine(backend, 1, cfg.max_streams)
        self.service = MediaService(cfg, self.engine, clock=self.clock)
        self.engine.start(self.loop, self.service.on_events)
        self.commands = Commands(cfg, self.service)

    def cmd(self, text: str) -> str:
        return self.commands.execute(text.encode(), Context())

    def call(self, n: int) -> list[int]:
        """Create call n (U then L, like Kamailio); its relay ports."""
        a = self.cmd(f"Uc0 call{n} 127.0.0.1 4000 ft{n}").split()[0]
        b = self.cmd(f"Lc0 call{n} 127.0.0.1 4002 ft{n} tt{n}").split()[0]
        return [int(a), int(b)]

    def run_periods(self, limit: int = 50) -> int:
        """Run the daemon's 0.1 s periods (each slice to the end) until no retired pair is left."""
        for i in range(limit):
            self.service.new_period()
            while self.service.background_slice():
                pass
            if not (self.service._limbo or self.service._grace or self.service._closable):
                return i + 1
            self.loop.run_until_complete(asyncio.sleep(0.02))    # the worker runs meanwhile
        raise AssertionError("retired sockets were never closed")

    def close(self):
        self.service.destroy_all("test over")
        self.engine.close()
        self.loop.close()


@pytest.fixture
def rig(backend):
    r = Rig(backend)
    yield r
    r.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_timeouts_end_a_bounded_number_of_calls_per_slice(rig):
    for n in range(CALLS):
        rig.call(n)
    assert len(rig.service.sessions) == CALLS
    rig.clock.now += rig.cfg.ttl + 5                     # every call silent past its TTL
    assert rig.service.background_slice()
    assert len(rig.service.sessions) == CALLS - SLICE_EXPIRE   # one slice, not all of them at once
    slices = 1
    while rig.service.background_slice():
        slices += 1
    assert len(rig.service.sessions) == 0
    assert slices >= CALLS // SLICE_EXPIRE
    assert rig.service.stats.nsess_timeout == CALLS


def test_ended_calls_free_their_ports_and_descriptors(rig):
    before = open_fds()
    ports = [p for n in range(CALLS) for p in rig.call(n)]
    assert open_fds() == before + 4 * CALLS               # RTP + RTCP on each side
    assert not any(port_is_free(p) for p in ports)
    for n in range(CALLS):
        assert rig.cmd(f"D call{n} ft{n} tt{n}") == "0"
    periods = rig.run_periods()
    assert periods <= 5                                   # a grace period is a worker batch, not seconds
    assert open_fds() == before
    assert all(port_is_free(p) and port_is_free(p + 1) for p in ports)

