"""The raw nfnetlink element writer's encoding (no kernel needed; test_nft_live reads real
writes back through nft)."""
from __future__ import annotations

import struct

from rtpproxy.nftmgr import Element, NftLayout
from rtpproxy.nftnl import NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, add_batch, element_key


def test_keys_pad_each_concatenated_field_to_four_bytes():
    assert element_key(Element("10.0.0.1", 40000)) == bytes([10, 0, 0, 1]) + struct.pack("!H", 40000) + b"\0\0"
    assert len(element_key(Element("2001:db8::1", 40000))) == 20
    assert element_key(Element("0.0.0.0", 40000)) == struct.pack("!H", 40000)    # inet_service set: 2 bytes
    assert element_key(Element("::", 40002)) == struct.pack("!H", 40002)


def messages(batch: bytes) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < len(batch):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", batch, off)
        out.append((kind, seq))
        off += (length + 3) & ~3
    return out


def test_one_transaction_one_message_per_set():
    layout = NftLayout()
    batch, acked = add_batch(layout, [Element("10.0.0.1", 40000, "a"), Element("10.0.0.1", 40001, "a"),
                                      Element("::1", 40002, "b")], first_seq=7)
    kinds = messages(batch)
    assert kinds[0] == (NFNL_MSG_BATCH_BEGIN, 7) and kinds[-1][0] == NFNL_MSG_BATCH_END
    assert [seq for _k, seq in kinds[1:-1]] == acked == [8, 9]      # media4 and media6
    assert add_batch(layout, [], first_seq=1)[1] == []
