"""The forwarding tables behind the table files: which exist, who owns them, their entries.

Runs on the asyncio thread (the FUSE layer, tablectl.py, hands every file operation
over to it), so it reads the service's state without locks. No FUSE here: the file
tree is modelled by kind()/listdir()/read()/write() on paths, tested without a mount.

Table N is the daemon's own (--table N): its entries are every engine entry of every
call plus the manual ones written to N/control. `add M` on the top-level control
creates another, empty, table for manual entries. Ownership is host-wide (per network
namespace): each table is an abstract unix socket `@rtpproxy-table-N` the owner listens
on, so a second daemon cannot take it, the owner's pid is known (SO_PEERCRED), and a
crash frees it with no file to clean.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Optional

from rtpproxy.engine_api import MISMATCH_DROP, MISMATCH_FORWARD, MISMATCH_FORWARD_UNHEARD, StreamConfig
from rtpproxy.errors import NftError
from rtpproxy.ports import family_of
from rtpproxy.tablefmt import (
    ANY,
    Address,
    EntryCommand,
    EntryView,
    StatusView,
    TableError,
    format_address,
    parse_entry_command,
    parse_table_command,
    parse_table_id,
    render_list,
    render_status,
    render_table_list,
)

log = logging.getLogger("rtpproxy.tables")

DIR, READ, WRITE = "dir", "read", "write"


# ---- ownership --------------------------------------------------------------------------------

def _lock_name(n: int) -> bytes:
    return f"\0rtpproxy-table-{n}".encode()


def owner_pid(n: int) -> Optional[int]:
    """The pid of the process owning table n, or None if nobody does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(_lock_name(n))
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
    except OSError:
        return None
    finally:
        s.close()


def claim(n: int) -> socket.socket:
    """Own table n until the returned socket is closed (or the process dies)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(_lock_name(n))
        s.listen(64)
    except OSError as exc:
        s.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        pid = owner_pid(n)
        raise TableError(errno.EEXIST, f"table {n} is owned by another rtpproxy"
                                       + (f" (pid {pid})" if pid else "")) from None
    return s


# ---- manual entries ---------------------------------------------------------------------------

@dataclass
class ManualEntry:
    table: int
    local: Address
    sock: socket.socket
    sid: int
    dst: Address
    via: Address
    expect: Optional[Address]            # None: from anyone

    def config(self, via_fd: int) -> StreamConfig:
        return StreamConfig(fd=self.sock.fileno(), out_fd=via_fd, latched=self.expect, dst=self.dst,
                            on_mismatch=MISMATCH_FORWARD if self.expect is None else MISMATCH_DROP)


def _bind(local: Address) -> socket.socket:
    s = socket.socket(family_of(local[0]), socket.SOCK_DGRAM)
    try:
        if s.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setblocking(False)
        s.bind(local)
    except OSError as exc:
        s.close()
        raise TableError(exc.errno or errno.EINVAL, f"cannot bind {format_address(local)}: {exc.strerror}") from None
    return s


class Tables:
    def __init__(self, bound: int, service, lock: Optional[socket.socket] = None):
        self.bound = bound
        self.service = service
        self._locks: dict[int, Optional[socket.socket]] = {bound: lock}
        self._entries: dict[Address, ManualEntry] = {}

    # ---- the file tree --------------------------------------------------------------------
    def _table_of(self, part: str) -> Optional[int]:
        try:
            n = parse_table_id(part)
        except TableError:
            return None
        return n if n in self._locks else None

    def kind(self, path: str) -> Optional[str]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return DIR
        if len(parts) == 1:
            if parts[0] == "control":
                return WRITE
            if parts[0] == "list":
                return READ
            return DIR if self._table_of(parts[0]) is not None else None
        if len(parts) == 2 and self._table_of(parts[0]) is not None:
            return {"status": READ, "list": READ, "control": WRITE}.get(parts[1])
        return None

    def listdir(self, path: str) -> list[str]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return ["control", "list", *(str(n) for n in sorted(self._locks))]
        if len(parts) == 1 and self._table_of(parts[0]) is not None:
            return ["control", "list", "status"]
        raise TableError(errno.ENOTDIR if self.kind(path) else errno.ENOENT, path)

    def read(self, path: str) -> bytes:
        parts = [p for p in path.split("/") if p]
        if parts == ["list"]:
            return render_table_list(self._locks)
        if len(parts) == 2 and (n := self._table_of(parts[0])) is not None:
            if parts[1] == "status":
                return render_status(self.status(n))
            if parts[1] == "list":
                return render_list(self.entries(n))
        raise TableError(errno.EACCES if self.kind(path) else errno.ENOENT, path)

    def write(self, path: str, data: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        if parts == ["control"]:
            op, n = parse_table_command(data)
            self.add_table(n) if op == "add" else self.del_table(n)
            return
        if len(parts) == 2 and parts[1] == "control" and (n := self._table_of(parts[0])) is not None:
            self.apply(n, parse_entry_command(data))
            return
        raise TableError(errno.EACCES if self.kind(path) else errno.ENOENT, path)

    # ---- tables ---------------------------------------------------------------------------
    def add_table(self, n: int) -> None:
        if n in self._locks:
            raise TableError(errno.EEXIST, f"table {n} exists")
        self._locks[n] = claim(n)            # EEXIST when another daemon owns it
        log.info("table %d added", n)

    def del_table(self, n: int) -> None:
        if n not in self._locks:
            raise TableError(errno.ENOENT, f"no table {n}")
        if n == self.bound:
            raise TableError(errno.EBUSY, f"table {n} is this daemon's own (--table)")
        if any(e.table == n for e in self._entries.values()):
            raise TableError(errno.EBUSY, f"table {n} has entries; delete them first")
        lock = self._locks.pop(n)
        if lock is not None:
            lock.close()
        log.info("table %d deleted", n)

    def close(self) -> None:
        for local in list(self._entries):
            self._delete(self._entries[local])
        for lock in self._locks.values():
            if lock is not None:
                lock.close()
        self._locks.clear()

    # ---- entries --------------------------------------------------------------------------
    def apply(self, n: int, cmd: EntryCommand) -> None:
        entry = self._entries.get(cmd.local)
        if cmd.op == "add":
            if entry is not None or self._session_entry(cmd.local):
                raise TableError(errno.EEXIST, f"{format_address(cmd.local)} already has an entry")
            self._add(n, cmd)
            return
        if entry is None or entry.table != n:
            if self._session_entry(cmd.local) and n == self.bound:
                raise TableError(errno.EBUSY, f"{format_address(cmd.local)} belongs to a call: "
                                              "change it through the control protocol")
            raise TableError(errno.ENOENT, f"no entry for {format_address(cmd.local)} in table {n}")
        if cmd.op == "del":
            users = [e for e in self._entries.values() if e.via == entry.local and e is not entry]
            if users:
                raise TableError(errno.EBUSY, f"{format_address(entry.local)} is the output of "
                                              f"{format_address(users[0].local)}")
            self._delete(entry)
            return
        via = self._via(n, cmd.via, entry.local) if cmd.via else entry.via
        entry.dst = cmd.dst or entry.dst
        entry.via = via
        if cmd.expect is not None:
            entry.expect = None if cmd.expect == ANY else cmd.expect
        self._push(entry)
        log.info("table %d: entry %s updated", n, format_address(entry.local))

    def _via(self, n: int, via: Optional[Address], local: Address) -> Address:
        if via is None or via == local:
            return local
        other = self._entries.get(via)
        if other is None or other.table != n:
            raise TableError(errno.ENOENT, f"via {format_address(via)}: not an entry of table {n}")
        return via

    def _add(self, n: int, cmd: EntryCommand) -> None:
        via = self._via(n, cmd.via, cmd.local)
        sock = _bind(cmd.local)
        fw = self.service.firewall
        label = f"table {n}"
        if fw is not None:
            try:
                fw.open(label, [cmd.local])
            except NftError as exc:
                sock.close()
                raise TableError(errno.EIO, f"nft: {exc}") from None
        entry = ManualEntry(n, cmd.local, sock, self.service.take_stream_id(), cmd.dst, via,
                            None if cmd.expect in (None, ANY) else cmd.expect)
        self._entries[cmd.local] = entry
        self._push(entry)
        log.info("table %d: entry %s -> %s added", n, format_address(cmd.local), format_address(cmd.dst))

    def _push(self, entry: ManualEntry) -> None:
        via_fd = entry.sock.fileno() if entry.via == entry.local else self._entries[entry.via].sock.fileno()
        self.service.engine.stream_set(entry.sid, entry.config(via_fd))

    def _delete(self, entry: ManualEntry) -> None:
        self.service.engine.stream_del(entry.sid)
        self.service.give_stream_id(entry.sid)
        if self.service.firewall is not None:
            try:
                self.service.firewall.close([entry.local])
            except NftError as exc:
                log.warning("nft: closing %s: %s", format_address(entry.local), exc)
        entry.sock.close()
        del self._entries[entry.local]
        log.info("table %d: entry %s deleted", entry.table, format_address(entry.local))

    def _session_entry(self, local: Address) -> bool:
        return any(self.service.socket_of(sid) == local for sid, _, _ in self.service.engine_entries())

    # ---- views ----------------------------------------------------------------------------
    def _counters_view(self, sid: int, now_ns: int, session: bool = False) -> dict:
        c = self.service.stream_counters(sid) if session else self.service.engine.counters(sid)
        last_ns = int(self.service.last_activity(sid) * 1e9) if session else c.last_rx_ns
        return dict(packets=c.packets, bytes=c.bytes, relayed=c.relayed, drops=c.dropped,
                    mismatched=c.mismatched, last_packet_age=(now_ns - last_ns) / 1e9 if last_ns else None)

    def _session_views(self, now_ns: int) -> list[EntryView]:
        views = []
        for sid, ref, cfg in self.service.engine_entries():
            local = self.service.socket_of(sid)
            if local is None:
                continue
            s, other = ref.session, ref.session.sides[1 - ref.side]
            off = 1 if ref.rtcp else 0
            forwarding = cfg.on_mismatch != MISMATCH_DROP and (not cfg.forward_until_ns
                                                                 or cfg.forward_until_ns > now_ns)
            views.append(EntryView(
                local=local,
                owner=f"call {s.call_id} tag {s.from_tag} side {ref.side} {'rtcp' if ref.rtcp else 'rtp'}",
                expect=cfg.latched, mismatch=("forward until heard" if cfg.on_mismatch == MISMATCH_FORWARD_UNHEARD
                                              else "forward") if forwarding else "drop",
                via=(other.local_host, other.port + off) if cfg.out_fd >= 0 and other.pair else None,
                dst=cfg.dst, path="kernel" if self.service.in_kernel(sid) else "userspace",
                **self._counters_view(sid, now_ns, session=True)))
        return views

    def entries(self, n: int) -> list[EntryView]:
        now_ns = time.monotonic_ns()
        views = self._session_views(now_ns) if n == self.bound else []
        for e in self._entries.values():
            if e.table == n:
                views.append(EntryView(local=e.local, owner="manual", expect=e.expect,
                                       mismatch="forward" if e.expect is None else "drop",
                                       via=e.via, dst=e.dst, **self._counters_view(e.sid, now_ns)))
        return views

    def status(self, n: int) -> StatusView:
        engine = self.service.engine
        workers = tuple(engine.worker_stats()) if n == self.bound else ()
        nworkers = getattr(engine, "workers", 1)
        return StatusView(table=n, owner_pid=os.getpid(),
                          engine=f"{engine.name}, {nworkers} worker{'s' if nworkers > 1 else ''}",
                          kernel=self.service.kernel_state, entries=tuple(self.entries(n)), workers=workers)
