"""The table files' language: parsing what is written to them, rendering what is read.

Pure functions, no I/O and no FUSE, so every rule is tested without a mount
(tests/test_tablefmt.py). Shapes follow rtpengine's /proc/rtpengine (media-relay-notes
§1): `control` takes `add N` / `del N`; `N/list` prints one block per forwarding entry
keyed by its local address; `N/status` is `Name: value` lines.

Errors are TableError(errno): the FUSE layer returns the errno to the writer, so
`echo ... > control` fails with the matching message (EINVAL, EEXIST, ENOENT, EBUSY).
"""
from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Optional

from rtpproxy.engine_api import WorkerStats

Address = tuple[str, int]

MAX_TABLE = 63                 # rtpengine's limit: table ids 0..63
MAX_COMMAND = 512              # one command per write; anything longer is not a command


class TableError(Exception):
    """A refused file operation; errno goes back to the caller of write()/read()."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


# ---- top-level control ------------------------------------------------------------------------

def parse_table_id(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise TableError(errno.EINVAL, f"{text!r} is not a table number") from None
    if not 0 <= n <= MAX_TABLE:
        raise TableError(errno.EINVAL, f"table {n} is out of range 0..{MAX_TABLE}")
    return n


def _one_command(data: bytes) -> list[str]:
    """The words of the single command in a write (one trailing newline allowed)."""
    if len(data) > MAX_COMMAND:
        raise TableError(errno.EINVAL, "one command per write, at most 512 bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TableError(errno.EINVAL, "commands are ASCII text") from None
    text = text[:-1] if text.endswith("\n") else text
    if "\n" in text or "\r" in text or "\0" in text:
        raise TableError(errno.EINVAL, "one command per write")
    words = text.split()
    if not words:
        raise TableError(errno.EINVAL, "empty command")
    return words


def parse_table_command(data: bytes) -> tuple[str, int]:
    """`add N` or `del N` (what the top-level control file takes)."""
    words = _one_command(data)
    if len(words) != 2 or words[0] not in ("add", "del"):
        raise TableError(errno.EINVAL, "use `add N` or `del N`")
    return words[0], parse_table_id(words[1])


# ---- per-table control ------------------------------------------------------------------------

ANY = ("any", 0)               # `expect any`: forward from whichever source (learning)


@dataclass(frozen=True)
class EntryCommand:
    """A change to one forwarding entry, keyed by the local address packets arrive on.

    add LOCAL dst DST [via LOCAL2] [expect SRC|any]
    update LOCAL [dst DST] [via LOCAL2] [expect SRC|any]
    del LOCAL
    Packets arriving on LOCAL from SRC (from anyone with `any`, the default) leave the
    entry's `via` socket (LOCAL itself unless given; another entry's local address for
    symmetric relaying) towards DST.
    """

    op: str
    local: Address
    dst: Optional[Address] = None
    via: Optional[Address] = None
    expect: Optional[Address] = None     # None: not given; ANY: anyone


def parse_address(text: str) -> Address:
    """`1.2.3.4:5000` or `[2001:db8::1]:5000` (numeric hosts only: this is a data path)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise TableError(errno.EINVAL, f"{text!r} is not ADDRESS:PORT")
    try:
        ip = ipaddress.ip_address(host)
        p = int(port, 10)
    except ValueError:
        raise TableError(errno.EINVAL, f"{text!r} is not a numeric ADDRESS:PORT") from None
    if text.startswith("[") != (ip.version == 6):
        raise TableError(errno.EINVAL, f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not 0 < p < 65536:
        raise TableError(errno.EINVAL, f"{text!r}: port out of range")
    return str(ip), p


_OPTIONS = {"add": ("dst", "via", "expect"), "update": ("dst", "via", "expect"), "del": ()}


def parse_entry_command(data: bytes) -> EntryCommand:
    words = _one_command(data)
    op = words[0]
    if op not in _OPTIONS or len(words) < 2:
        raise TableError(errno.EINVAL, "use `add LOCAL dst DST [via LOCAL] [expect SRC|any]`, "
                                       "`update LOCAL ...` or `del LOCAL`")
    local = parse_address(words[1])
    rest = words[2:]
    if len(rest) % 2:
        raise TableError(errno.EINVAL, f"{rest[-1]!r} needs a value")
    opts: dict[str, Address] = {}
    for key, value in zip(rest[::2], rest[1::2], strict=True):
        if key not in _OPTIONS[op]:
            raise TableError(errno.EINVAL, f"{op} takes no {key!r}")
        if key in opts:
            raise TableError(errno.EINVAL, f"{key!r} given twice")
        opts[key] = ANY if key == "expect" and value == "any" else parse_address(value)
    if op == "add" and "dst" not in opts:
        raise TableError(errno.EINVAL, "add needs `dst ADDRESS:PORT`")
    if op == "update" and not opts:
        raise TableError(errno.EINVAL, "update needs dst, via or expect")
    cmd = EntryCommand(op, local, opts.get("dst"), opts.get("via"), opts.get("expect"))
    for other in (cmd.dst, cmd.via, cmd.expect):
        if other not in (None, ANY) and _family(other) != _family(local):
            raise TableError(errno.EAFNOSUPPORT, f"{format_address(other)} and {format_address(local)} "
                                                 "are of different address families")
    return cmd


def _family(addr: Address) -> int:
    return 6 if ":" in addr[0] else 4


def format_address(addr: Optional[Address]) -> str:
    """rtpengine's form: `inet4 1.2.3.4:5000`, `inet6 [::1]:5000`."""
    if addr is None:
        return "none"
    host, port = addr
    return f"inet6 [{host}]:{port}" if _family(addr) == 6 else f"inet4 {host}:{port}"


# ---- rendering --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EntryView:
    """One forwarding entry as the list file shows it."""

    local: Address
    owner: str                          # "call <call-id> tag <tag> side N rtp|rtcp" or "manual"
    expect: Optional[Address]           # latched / expected source; None: anyone (learning)
    mismatch: str                       # what happens to other sources: drop | forward
    via: Optional[Address]              # the socket packets leave from; None: not forwarding
    dst: Optional[Address]
    packets: int = 0
    bytes: int = 0
    relayed: int = 0
    drops: int = 0
    mismatched: int = 0
    last_packet_age: Optional[float] = None   # seconds; None: nothing received yet
    path: str = "userspace"             # userspace | kernel


def render_list(entries: Iterable[EntryView]) -> bytes:
    out = []
    for e in sorted(entries, key=lambda e: (_family(e.local), e.local)):
        age = "never" if e.last_packet_age is None else f"{e.last_packet_age:.1f} s ago"
        out.append(
            f"local {format_address(e.local)}\n"
            f"    owner: {e.owner}\n"
            f"    expect {'any' if e.expect is None else format_address(e.expect)}\n"
            f"    src mismatch action: {e.mismatch}\n"
            f"    output src {format_address(e.via)} dst {format_address(e.dst)}\n"
            f"    path: {e.path}\n"
            f"    stats: {e.bytes} bytes, {e.packets} packets, {e.relayed} relayed, {e.drops} drops, "
            f"{e.mismatched} mismatched\n"
            f"    last packet: {age}\n\n")
    return "".join(out).encode()


@dataclass(frozen=True)
class StatusView:
    table: int
    owner_pid: int
    engine: str
    kernel: str                         # "on" or "off (reason)"
    entries: tuple[EntryView, ...] = ()
    workers: tuple[WorkerStats, ...] = field(default_factory=tuple)   # the bound table's workers


def render_status(st: StatusView) -> bytes:
    total = lambda name: sum(getattr(e, name) for e in st.entries)  # noqa: E731
    lines = [
        ("Table", st.table),
        ("Owner PID", st.owner_pid),
        ("Engine", st.engine),
        ("Kernel", st.kernel),
        ("Streams", len(st.entries)),
        ("Packets", total("packets")),
        ("Bytes", total("bytes")),
        ("Relayed", total("relayed")),
        ("Drops", total("drops")),
        ("Mismatched", total("mismatched")),
        ("Errors", sum(w.events_lost for w in st.workers)),                # events lost (ring full)
    ]
    text = "".join(f"{name + ':':<12} {value}\n" for name, value in lines)
    for i, w in enumerate(st.workers):
        text += (f"Worker {i}:    streams {w.streams}, packets {w.packets}, relayed {w.relayed}, "
                 f"drops {w.dropped}, errors {w.events_lost}\n")
    return text.encode()


def render_table_list(tables: Iterable[int]) -> bytes:
    return "".join(f"{n}\n" for n in sorted(tables)).encode()
