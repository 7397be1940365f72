"""What our two raw nfnetlink writers (conntrack.py, nftnl.py) share: the socket, the attribute
encoding and reading the kernel's acknowledgements."""
from __future__ import annotations

import socket
import struct
from typing import Container, Iterable

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute: length, type, payload, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket (changes need CAP_NET_ADMIN), answers awaited at most 2 s."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    sock.settimeout(2.0)
    return sock


def read_acks(sock: socket.socket, pending: Iterable[int], fatal: Container[int] = ()) -> dict[int, int]:
    """Read NLMSG_ERROR answers until every sequence number in pending has one, or an error
    arrives for a number in fatal (a refused batch message: nothing else will be answered).
    Returns errno per answered number (0: done). Answers to other numbers, late ones of an
    earlier request, are skipped."""
    waiting, answers = set(pending), {}
    while waiting:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, off + 16)[0]
                if seq in waiting:
                    answers[seq] = err
                    waiting.discard(seq)
                elif err and seq in fatal:
                    answers[seq] = err
                    waiting.clear()
            off += (length + 3) & ~3 if length else len(data)
    return answers
