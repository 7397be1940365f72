"""ctnetlink messages built by hand: their layout against the UAPI (the kernel-tier namespace tests
send them for real)."""
import socket
import struct

import pytest

from rtpproxy.conntrack import delete_message, flush_mark_message


def attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x7FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def test_delete_message_ipv4():
    msg = delete_message(("10.0.1.2", 5000), ("10.0.1.1", 40000), 7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and kind == 0x0102 and flags == 0x5 and seq == 7
    family, version, _ = struct.unpack_from("!BBH", msg, 16)
    assert (family, version) == (socket.AF_INET, 0)
    tuple_ = attrs(attrs(msg[20:])[1])
    ips, proto = attrs(tuple_[1]), attrs(tuple_[2])
    assert ips == {1: socket.inet_aton("10.0.1.2"), 2: socket.inet_aton("10.0.1.1")}
    assert proto[1] == b"\x11" and proto[2] == struct.pack("!H", 5000) and proto[3] == struct.pack("!H", 40000)


def test_delete_message_ipv6_and_families():
    msg = delete_message(("2001:db8::2", 5000), ("2001:db8::1", 40000), 1)
    assert struct.unpack_from("!B", msg, 16)[0] == socket.AF_INET6
    ips = attrs(attrs(attrs(msg[20:])[1])[1])
    assert ips[3] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    with pytest.raises(ValueError):
        delete_message(("10.0.0.1", 1), ("::1", 2), 1)


def test_flush_by_mark():
    msg = flush_mark_message(0x72747070, 3)
    assert struct.unpack_from("=I", msg)[0] == len(msg)
    assert struct.unpack_from("!B", msg, 16)[0] == socket.AF_UNSPEC           # every family
    a = attrs(msg[20:])
    assert a == {8: struct.pack("!I", 0x72747070), 21: b"\xff\xff\xff\xff"}
