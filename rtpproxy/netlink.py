"""The netlink attribute encoding shared by our two raw nfnetlink writers (conntrack.py, nftnl.py)."""
from __future__ import annotations

import struct

NLA_F_NESTED = 0x8000


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute: length, type, payload, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)
