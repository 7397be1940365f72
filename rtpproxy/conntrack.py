"""Deleting conntrack entries by tuple, over ctnetlink, with no library and no process.

The kernel tier (kernel.py) must delete the entries the userspace phase left for a stream
before its NAT map elements take effect (media-relay-notes §3.2: a stale entry wins over the
map, and a stale entry on either leg makes the NAT'ed one fail to insert). That is two to
four deletions per call: one netlink message each, all sent in one sendmsg, acknowledged
together. Why not the alternatives: `conntrack -D` costs a process per tuple on the event
loop; pyroute2 would be a large dependency for one message type. The message layout is the
stable ctnetlink UAPI (linux/netfilter/nfnetlink_conntrack.h).

A tuple is looked up in both directions (the conntrack hash holds each entry's original and
reply tuples), so deleting (peer -> relay port) removes the entry whichever side sent first.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Iterable

from rtpproxy.netlink import NLA_F_NESTED, nla, open_socket, read_acks

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
CTA_TUPLE_ORIG = 1
CTA_MARK, CTA_MARK_MASK = 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

Address = tuple[str, int]


def delete_message(src: Address, dst: Address, seq: int) -> bytes:
    """One IPCTNL_MSG_CT_DELETE request for the UDP tuple src -> dst."""
    s_ip, d_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s_ip.version != d_ip.version:
        raise ValueError(f"{src} and {dst} are of different families")
    v6 = s_ip.version == 6
    ips = nla(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, s_ip.packed) + \
        nla(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, d_ip.packed)
    proto = nla(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP])) + \
        nla(CTA_PROTO_SRC_PORT, struct.pack("!H", src[1])) + \
        nla(CTA_PROTO_DST_PORT, struct.pack("!H", dst[1]))
    tuple_ = nla(CTA_TUPLE_ORIG | NLA_F_NESTED,
                   nla(CTA_TUPLE_IP | NLA_F_NESTED, ips) + nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))
    nfgen = struct.pack("!BBH", socket.AF_INET6 if v6 else socket.AF_INET, 0, 0)
    body = nfgen + tuple_
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                         NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return header + body


def flush_mark_message(mark: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE without a tuple but with a mark: deletes every entry (all families)
    carrying that mark."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, 0) + nla(CTA_MARK, struct.pack("!I", mark)) + \
        nla(CTA_MARK_MASK, struct.pack("!I", 0xFFFFFFFF))
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                         NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return header + body


class Conntrack:
    """A ctnetlink socket (needs CAP_NET_ADMIN), opened once and kept."""

    def __init__(self):
        self.sock = open_socket()
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def delete(self, tuples: Iterable[tuple[Address, Address]]) -> int:
        """Delete the entries holding these (src, dst) UDP tuples; returns how many existed.
        A missing entry is not an error (nothing was relayed yet on that leg)."""
        return self._run([lambda seq, s=src, d=dst: delete_message(s, d, seq) for src, dst in tuples])

    def flush_mark(self, mark: int) -> None:
        """Delete every entry carrying this conntrack mark."""
        self._run([lambda seq: flush_mark_message(mark, seq)])

    def _run(self, builders) -> int:
        msgs, pending = [], set()
        for build in builders:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            msgs.append(build(self._seq))
            pending.add(self._seq)
        if not msgs:
            return 0
        self.sock.send(b"".join(msgs))
        answers = read_acks(self.sock, pending)
        for err in answers.values():
            if err not in (0, errno.ENOENT):
                raise OSError(err, f"conntrack delete: {os.strerror(err)}")
        return sum(1 for err in answers.values() if err == 0)
