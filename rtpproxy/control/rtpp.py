"""The legacy rtpproxy control protocol: bytes in, Request out; reply bodies to bytes.

Pure functions, byte-exact to reference/rtpp-protocol.md §1-§3. Bytes are
decoded as latin-1 so call-ids and tags survive unchanged whatever they hold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from rtpproxy.errors import ProtocolError

MAX_TOKENS = 23          # per group, command word included (RTPC_MAX_ARGC - 1)
MAX_GROUPS = 16          # MAX_SUBC_NUM
SEPARATORS = b" \t\r\n"
_SPLIT = re.compile(rb"[ \t\r\n]+")
REPLY_MAX = 1024         # rtpproxy's reply buffer, cookie included

# Error codes (rtpp_command_ecodes.h).
E_CMDUNKN, E_NARGS, E_MODS, E_SUBC, E_PARSE1 = 0, 1, 2, 3, 5
E_PARSE_R, E_PARSE_RC, E_PARSE_D, E_PARSE_G, E_NOTIFY_TAG = 6, 7, 8, 9, 10
E_BRIDGE_E, E_BRIDGE_I, E_Z, E_CODECS, E_LADDR, E_RADDR = 11, 12, 13, 14, 15, 16
E_PLAYCOUNT, E_PARSE_I, E_PARSE_Q, E_G_TOOBIG, E_Q_TOOBIG = 17, 18, 19, 25, 26
E_LADDR_INV, E_RADDR_INV, E_BADMOD, E_NOAF, E_BADREMOTE = 31, 32, 35, 36, 37
E_SESUNKN, E_PLAYFAIL, E_QUERY, E_COPYFAIL, E_STATS = 50, 60, 62, 65, 68
E_PORTS_EXISTING, E_PORTS_NEW, E_NOTIFY_OFF, E_OVERLOAD, E_DRAINING = 71, 72, 75, 98, 99
E_NOMEM = 81

N_STATS = 30             # names G accepts (rtpp_stats.c); bounds G's argc


@dataclass(frozen=True)
class Shape:
    min_args: int
    max_args: int
    modifiers: bool
    subcommands: bool


SHAPES = {
    "U": Shape(5, 8, True, True),
    "L": Shape(5, 6, True, True),
    "D": Shape(3, 4, True, False),
    "P": Shape(5, 6, True, False),
    "S": Shape(3, 4, False, False),
    "R": Shape(3, 4, True, False),
    "C": Shape(4, 5, True, False),
    "N": Shape(3, 4, True, False),
    "Q": Shape(3, 15, True, True),
    "V": Shape(1, 1, False, False),
    "VF": Shape(2, 2, False, False),
    "I": Shape(1, 1, True, False),
    "G": Shape(1, N_STATS + 1, True, False),
    "X": Shape(1, 1, False, False),
}


@dataclass
class Request:
    op: str                          # key of SHAPES
    modifiers: str                   # the rest of the command word (after the F for VF)
    args: list[str]                  # arguments after the command word
    subcommands: list[list[str]] = field(default_factory=list)


def tokenize(data: bytes) -> list[list[str]]:
    """Split on runs of SP/HTAB/CR/LF; '&&' starts a new group. Raises E5 on NUL or limits."""
    groups: list[list[str]] = [[]]
    for raw in _SPLIT.split(data):
        if not raw:
            continue
        if b"\0" in raw:
            raise ProtocolError(E_PARSE1, "NUL byte in a token")
        tok = raw.decode("latin-1")
        if tok == "&&":
            groups.append([])
            if len(groups) > MAX_GROUPS:
                raise ProtocolError(E_PARSE1, "too many sub-commands")
            continue
        if len(groups[-1]) >= MAX_TOKENS:
            raise ProtocolError(E_PARSE1, "too many tokens")
        groups[-1].append(tok)
    return groups


def split_cookie(data: bytes) -> tuple[Optional[str], bytes]:
    """UDP framing: the first blank-delimited token is the cookie."""
    stripped = data.lstrip(SEPARATORS)
    end = len(stripped)
    for i, b in enumerate(stripped):
        if b in SEPARATORS:
            end = i
            break
    if end == 0:
        return None, b""
    return stripped[:end].decode("latin-1"), stripped[end:]


def parse(body: bytes) -> Request:
    """Parse one command (without cookie). Applies the generic checks in rtpproxy's order:
    unknown command E0, argument count E1, modifiers E2, sub-commands E3."""
    groups = tokenize(body)
    main = groups[0]
    if not main:
        raise ProtocolError(E_PARSE1, "empty command")
    word = main[0]
    letter = word[0].upper()
    mods = word[1:]
    op = letter
    if letter == "V" and mods[:1].upper() == "F":
        op, mods = "VF", mods[1:]
    shape = SHAPES.get(op)
    if shape is None:
        raise ProtocolError(E_CMDUNKN, f"unknown command {word[:1]!r}")
    if not shape.min_args <= len(main) <= shape.max_args:
        raise ProtocolError(E_NARGS, f"{op} takes {shape.min_args - 1}..{shape.max_args - 1} arguments")
    if mods and not shape.modifiers:
        raise ProtocolError(E_MODS, f"{op} takes no modifiers")
    if len(groups) > 1 and not shape.subcommands:
        raise ProtocolError(E_SUBC, f"{op} takes no sub-commands")
    if any(not g for g in groups[1:]):
        raise ProtocolError(E_SUBC, "empty sub-command")
    return Request(op, mods, main[1:], groups[1:])


def error_body(code: int) -> str:
    return f"E{code}"


def frame_reply(cookie: Optional[str], body: str, stream: bool = False) -> bytes:
    """UDP replies are '<cookie> <body>\\n'; stream transports carry the body and LF."""
    text = body if stream or cookie is None else f"{cookie} {body}"
    return (text + "\n").encode("latin-1")
