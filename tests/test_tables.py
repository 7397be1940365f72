"""The forwarding tables behind the files, without a mount: the tree, ownership, entries that
really forward (real engine, real loopback sockets), and the errno of every refusal."""
from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from conftest import free_port, rtp_packet
from rtpproxy.config import Config
from rtpproxy.relay import open_engine
from rtpproxy.service import MediaService
from rtpproxy.tablefmt import TableError
from rtpproxy.tables import DIR, READ, WRITE, Tables, claim, owner_pid

TABLE = 41          # far from the default 0, which a running service may own


class Rig:
    def __init__(self, backend):
        self.loop = asyncio.new_event_loop()
        cfg = Config()
        cfg.min_port, cfg.max_port = 50000, 50100
        self.engine = open_engine(backend, 1, cfg.max_streams)
        self.service = MediaService(cfg, self.engine)
        self.engine.start(self.loop, self.service.on_events)
        self.tables = Tables(TABLE, self.service, lock=claim(TABLE))

    def run(self, seconds=0.3):
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def write(self, path, text):
        self.tables.write(path, text.encode())

    def errno_of(self, path, text):
        with pytest.raises(TableError) as exc:
            self.write(path, text)
        return exc.value.errno

    def close(self):
        self.tables.close()
        self.engine.close()
        self.loop.close()


@pytest.fixture
def rig(backend):
    r = Rig(backend)
    yield r
    r.close()


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(1.0)
    return s


def test_tree(rig):
    t = rig.tables
    assert t.kind("/") == DIR and t.kind("/control") == WRITE and t.kind("/list") == READ
    assert t.kind(f"/{TABLE}") == DIR and t.kind(f"/{TABLE}/status") == READ
    assert t.kind(f"/{TABLE}/control") == WRITE and t.kind("/3") is None and t.kind(f"/{TABLE}/x") is None
    assert t.listdir("/") == ["control", "list", str(TABLE)]
    assert t.read("/list") == f"{TABLE}\n".encode()
    status = t.read(f"/{TABLE}/status").decode()
    assert f"Owner PID:   {os.getpid()}" in status and "Streams:     0" in status
    with pytest.raises(TableError) as exc:
        t.read("/control")
    assert exc.value.errno == errno.EACCES


def test_table_add_del_errnos(rig):
    assert rig.errno_of("/control", f"add {TABLE}") == errno.EEXIST
    assert rig.errno_of("/control", f"del {TABLE}") == errno.EBUSY          # the daemon's own
    assert rig.errno_of("/control", "del 42") == errno.ENOENT
    assert rig.errno_of("/control", "hello") == errno.EINVAL
    rig.write("/control", "add 42\n")
    assert rig.tables.read("/list") == f"{TABLE}\n42\n".encode()
    assert owner_pid(42) == os.getpid()
    port = free_port()
    rig.write("/42/control", f"add 127.0.0.1:{port} dst 127.0.0.1:9")
    assert rig.errno_of("/control", "del 42") == errno.EBUSY               # has entries
    rig.write("/42/control", f"del 127.0.0.1:{port}")
    rig.write("/control", "del 42")
    assert owner_pid(42) is None and rig.tables.kind("/42") is None


def test_a_table_has_one_owner(rig):
    with pytest.raises(TableError) as exc:
        claim(TABLE)
    assert exc.value.errno == errno.EEXIST and f"pid {os.getpid()}" in str(exc.value)


def test_entries_forward_both_ways_and_count(rig):
    a, b = udp(), udp()
    pa, pb = free_port(), free_port()
    ctl = f"/{TABLE}/control"
    # a -> 127.0.0.1:pa -> (from pb) -> b, and back: b -> pb -> (from pa) -> a
    rig.write(ctl, f"add 127.0.0.1:{pb} dst 127.0.0.1:{a.getsockname()[1]}")
    rig.write(ctl, f"add 127.0.0.1:{pa} dst 127.0.0.1:{b.getsockname()[1]} via 127.0.0.1:{pb} "
                   f"expect 127.0.0.1:{a.getsockname()[1]}")
    rig.write(ctl, f"update 127.0.0.1:{pb} via 127.0.0.1:{pa}")
    for seq in range(5):
        a.sendto(rtp_packet(seq), ("127.0.0.1", pa))
        b.sendto(rtp_packet(seq, ssrc=7), ("127.0.0.1", pb))
    rig.run()
    got_b = [b.recvfrom(2048) for _ in range(5)]
    got_a = [a.recvfrom(2048) for _ in range(5)]
    assert {src[1] for _, src in got_b} == {pb} and {src[1] for _, src in got_a} == {pa}
    listing = rig.tables.read(f"/{TABLE}/list").decode()
    block = next(b for b in listing.split("\n\n") if f"local inet4 127.0.0.1:{pa}" in b)
    assert "owner: manual" in block and f"expect inet4 127.0.0.1:{a.getsockname()[1]}" in block
    assert "860 bytes, 5 packets, 5 relayed, 0 drops" in block
    # Another source is refused by the `expect`: dropped and counted, nothing reaches b.
    c = udp()
    c.sendto(rtp_packet(9), ("127.0.0.1", pa))
    rig.run()
    with pytest.raises(TimeoutError):
        b.settimeout(0.2)
        b.recvfrom(2048)
    block = next(b for b in rig.tables.read(f"/{TABLE}/list").decode().split("\n\n") if f":{pa}\n" in b)
    assert "5 relayed, 1 drops, 1 mismatched" in block
    # Redirect: the destination moves at once.
    rig.write(ctl, f"update 127.0.0.1:{pa} dst 127.0.0.1:{c.getsockname()[1]}")
    a.sendto(rtp_packet(6), ("127.0.0.1", pa))
    rig.run()
    assert c.recvfrom(2048)[1] == ("127.0.0.1", pb)
    for s in (a, b, c):
        s.close()


def test_entry_errnos(rig):
    ctl = f"/{TABLE}/control"
    p, q = free_port(), free_port()
    rig.write(ctl, f"add 127.0.0.1:{p} dst 127.0.0.1:9")
    assert rig.errno_of(ctl, f"add 127.0.0.1:{p} dst 127.0.0.1:9") == errno.EEXIST
    assert rig.errno_of(ctl, f"update 127.0.0.1:{q} dst 127.0.0.1:9") == errno.ENOENT
    assert rig.errno_of(ctl, f"del 127.0.0.1:{q}") == errno.ENOENT
    assert rig.errno_of(ctl, f"add 127.0.0.1:{q} dst 127.0.0.1:9 via 127.0.0.1:1") == errno.ENOENT
    assert rig.errno_of(ctl, "add 192.0.2.1:4000 dst 127.0.0.1:9") == errno.EADDRNOTAVAIL
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", q))
        assert rig.errno_of(ctl, f"add 127.0.0.1:{q} dst 127.0.0.1:9") == errno.EADDRINUSE
    rig.write(ctl, f"add 127.0.0.1:{q} dst 127.0.0.1:9 via 127.0.0.1:{p}")
    assert rig.errno_of(ctl, f"del 127.0.0.1:{p}") == errno.EBUSY             # q sends through it
    assert rig.errno_of(ctl, "add 127.0.0.1 dst x") == errno.EINVAL
    # Nothing half-applied: the refused commands left exactly the two entries.
    assert rig.tables.read(f"/{TABLE}/list").decode().count("local inet4") == 2
