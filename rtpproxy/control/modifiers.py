"""U/L modifier strings (rpcpv1_ul.c semantics), parsed into ULOptions. Pure."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from rtpproxy.control import rtpp
from rtpproxy.errors import ProtocolError


@dataclass
class ULOptions:
    asymmetric: Optional[bool] = None    # A / S; None: the daemon default
    ipv6: bool = False                   # 6
    weak: bool = False                   # W
    bridge: list[str] = field(default_factory=list)   # E / I letters, in order
    repacketize_ms: Optional[int] = None # Z<ms>: accepted, not performed (VF 20071116 answers 0)
    codecs: Optional[str] = None         # C<pt,pt,...>
    local_addr: Optional[str] = None     # L<addr> / L[v6] / L{label}
    route_to: Optional[str] = None       # R<addr>
    new_port: bool = False               # N
    latching: Optional[str] = None       # J<s|d|x>: strict, dynamic, dynamic-strict (our extension)
    ssrc_lock: bool = False              # K: SSRC lock (our extension)


def _take(mods: str, i: int, allowed: str) -> tuple[str, int]:
    j = i
    while j < len(mods) and mods[j] in allowed:
        j += 1
    return mods[i:j], j


def _take_address(mods: str, i: int, code: int) -> tuple[str, int]:
    """An address after L or R: digits and dots, [IPv6], or {label} (L only)."""
    if i < len(mods) and mods[i] in "[{":
        close = "]" if mods[i] == "[" else "}"
        end = mods.find(close, i + 1)
        if end < 0 or end == i + 1:
            raise ProtocolError(code, "unterminated address")
        value = mods[i + 1:end]
        if close == "}":
            return "{" + value + "}", end + 1
        return value, end + 1
    value, j = _take(mods, i, "0123456789.")
    if not value:
        raise ProtocolError(code, "address expected")
    return value, j


def parse_ul(mods: str, bridge_configured: bool) -> ULOptions:
    o = ULOptions()
    i = 0
    while i < len(mods):
        ch = mods[i].upper()
        i += 1
        if ch == "A":
            o.asymmetric = True
        elif ch == "S":
            o.asymmetric = False
        elif ch in "EI":
            code = rtpp.E_BRIDGE_E if ch == "E" else rtpp.E_BRIDGE_I
            if not bridge_configured or len(o.bridge) >= 2:
                raise ProtocolError(code, "bridge interface selection without bridge mode, or more than two")
            o.bridge.append(ch)
        elif ch == "6":
            o.ipv6 = True
        elif ch == "W":
            o.weak = True
        elif ch == "Z":
            digits, i = _take(mods, i, "0123456789")
            if not digits or not 0 < int(digits) < 1000:
                raise ProtocolError(rtpp.E_Z, "Z needs 1..999 ms")
            o.repacketize_ms = int(digits)
        elif ch == "C":
            codecs, i = _take(mods, i, "0123456789,")
            if not codecs or o.codecs is not None or not all(codecs.split(",")):
                raise ProtocolError(rtpp.E_CODECS, "bad or repeated codec list")
            o.codecs = codecs
        elif ch == "L":
            o.local_addr, i = _take_address(mods, i, rtpp.E_LADDR)
            if not o.local_addr.startswith("{"):
                _must_be_ip(o.local_addr, rtpp.E_LADDR)
        elif ch == "R":
            o.route_to, i = _take_address(mods, i, rtpp.E_RADDR)
            if o.route_to.startswith("{"):
                raise ProtocolError(rtpp.E_RADDR, "R takes an address, not a label")
            _must_be_ip(o.route_to, rtpp.E_RADDR)
        elif ch == "N":
            o.new_port = True
        elif ch == "J":
            modes = {"S": "strict", "D": "dynamic", "X": "dynamic-strict"}
            if i >= len(mods) or mods[i].upper() not in modes:
                raise ProtocolError(rtpp.E_BADMOD, "J needs s (strict), d (dynamic) or x (dynamic-strict)")
            o.latching = modes[mods[i].upper()]
            i += 1
        elif ch == "K":
            o.ssrc_lock = True
        else:
            raise ProtocolError(rtpp.E_BADMOD, f"unknown modifier {mods[i - 1]!r}")
    return o


def _must_be_ip(value: str, code: int) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError(code, f"{value!r} is not an address") from None
