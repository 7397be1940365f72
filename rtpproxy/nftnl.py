"""Adding our set elements over nfnetlink, with no library: the firewall's per-call path.

Every U/L opens its two sockets in nftables before the reply leaves. Through libnftables that
is ~100-130 µs of CPU per call (JSON, a cache fetch of the table's definitions, then the
transaction), on the control thread, on a core it may share with a media worker; building
the one NFT_MSG_NEWSETELEM ourselves costs a few µs plus the kernel's own work. Everything
else (the skeleton, deletes, refreshes, listings) stays with libnftables (nftmgr.Nft).

The layout is the stable nf_tables UAPI (linux/netfilter/nf_tables.h, nfnetlink.h): a batch
(BATCH_BEGIN, NEWSETELEM per set, BATCH_END) is one transaction. An element's key is the
concatenation of its fields, each padded to 4 bytes (address, then port in network order;
a single-field key is not padded);
the call-id travels as the element's comment in libnftnl's userdata TLV, as `nft` writes it,
so `nft list` and `rtpproxy nft show` read it back.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Iterable

from rtpproxy.errors import NftError
from rtpproxy.netlink import NLA_F_NESTED, nla, open_socket, read_acks
from rtpproxy.nftmgr import COMMENT_MAX, Element, NftLayout


NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWSETELEM = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_USERDATA = 1, 4, 5, 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0
FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}       # NFPROTO_*



def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def element_key(e: Element) -> bytes:
    """The set key of an open socket: address . port (each field padded to 4 bytes, as in every
    concatenation), or the bare 2-byte port for a wildcard bind (an inet_service set)."""
    ip = ipaddress.ip_address(e.host)
    port = struct.pack("!H", e.port)
    return port if ip.is_unspecified else _pad4(ip.packed) + _pad4(port)


def _message(kind: int, family: int, flags: int, seq: int, body: bytes, res_id: int = 0) -> bytes:
    nfgen = struct.pack("!BBH", family, 0, res_id)
    return struct.pack("=IHHII", 16 + len(nfgen) + len(body), kind, flags, seq, 0) + nfgen + body


def add_batch(layout: NftLayout, elements: Iterable[Element], first_seq: int) -> tuple[bytes, list[int]]:
    """One transaction adding (or, for an existing element, refreshing) these elements with the
    layout's timeout and their call-id as comment. Returns the batch and the sequence numbers
    that will be acknowledged."""
    family = FAMILIES[layout.family]
    timeout = struct.pack("!Q", layout.element_timeout * 1000)
    by_set: dict[str, list[bytes]] = {}
    for e in elements:
        name, _value = e.target(layout)
        comment = e.call_id[:COMMENT_MAX].encode() + b"\0"
        item = (nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, nla(NFTA_DATA_VALUE, element_key(e)))
                + nla(NFTA_SET_ELEM_TIMEOUT, timeout) + nla(NFTA_SET_ELEM_EXPIRATION, timeout)
                + nla(NFTA_SET_ELEM_USERDATA, bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(comment)]) + comment))
        by_set.setdefault(name, []).append(nla(NFTA_LIST_ELEM | NLA_F_NESTED, item))
    seq = first_seq
    parts = [_message(NFNL_MSG_BATCH_BEGIN, socket.AF_UNSPEC, NLM_F_REQUEST, seq, b"", NFNL_SUBSYS_NFTABLES)]
    acked = []
    for name, items in sorted(by_set.items()):
        seq += 1
        body = (nla(NFTA_SET_ELEM_LIST_TABLE, layout.table_name.encode() + b"\0")
                + nla(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
                + nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(items)))
        parts.append(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM, family,
                              NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, seq, body))
        acked.append(seq)
    seq += 1
    parts.append(_message(NFNL_MSG_BATCH_END, socket.AF_UNSPEC, NLM_F_REQUEST, seq, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), acked


class ElementWriter:
    """An nfnetlink socket (needs CAP_NET_ADMIN), opened once and kept."""

    def __init__(self, layout: NftLayout):
        self.layout = layout
        try:
            self.sock = open_socket()
        except OSError as exc:
            raise NftError(f"cannot open an nfnetlink socket: {exc}") from None
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def add(self, elements: list[Element]) -> None:
        """Add these elements in one transaction; NftError names what the kernel refused."""
        first = self._seq + 1
        batch, pending = add_batch(self.layout, elements, first)
        if not pending:
            return
        last = pending[-1] + 1                           # BATCH_END
        self._seq = last & 0x3FFFFFFF
        try:
            self.sock.send(batch)
            answers = read_acks(self.sock, pending, fatal=(first, last))   # BATCH_BEGIN/END refused
        except OSError as exc:
            raise NftError(f"adding set elements: {exc}") from None
        error = next((err for _seq, err in sorted(answers.items()) if err), 0)
        if error:
            raise NftError(f"adding set elements to {self.layout.family} {self.layout.table_name}: "
                           f"{os.strerror(error)}")
