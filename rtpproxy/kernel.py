"""The kernel tier: established streams forwarded by stock nftables NAT and conntrack.

Once both parties of a stream are latched, the session's flows (KernelFlow: caller, the relay
socket it sends to, callee, the relay socket the callee sends to) go into our table's NAT maps
in one transaction, then the conntrack entries the userspace phase left on both legs are
deleted (media-relay-notes §3.2: they would win over the maps, or make the NAT'ed entry fail
to insert). From then on the kernel forwards the stream and the daemon sees none of it; any
other source still reaches the daemon's socket (the DNAT key holds the latched remote), so
latching keeps working. A change of flows (re-latch, re-INVITE, end of call) deletes the old
elements and entries in the same way, which moves the stream back to userspace at once.

Counters: one nft set element per relay socket counts what the kernel forwarded for it (by the
socket the packet arrived at); they are polled every few seconds and merged into the stream's
userspace counters. A counter that grew marks the socket active, for timeouts and re-latching.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from rtpproxy import nftmgr, syscheck
from rtpproxy.errors import NftError
from rtpproxy.nftmgr import KernelFlow, NftLayout

log = logging.getLogger("rtpproxy.kernel")

POLL_S = 2.0                   # counter polling period; also the resolution of kernel activity
FRESH_S = 0.2                  # a decision that needs kernel activity polls if older than this
HEADERS = {"4": 28, "6": 48}   # IP + UDP header bytes: nft counts whole packets, we count payload

Address = tuple[str, int]


@dataclass
class SocketCount:
    packets: int = 0             # forwarded in the kernel, for elements alive now (last poll)
    bytes: int = 0               # payload bytes
    retired_packets: int = 0     # from elements already removed (flows that ended or moved)
    retired_bytes: int = 0
    active_at: float = 0.0       # monotonic time of the poll that saw the counter grow


def _canon(addr: Address) -> Address:
    return str(ipaddress.ip_address(addr[0])), addr[1]


def kernel_reason(ip_forward: dict[str, int], nft_on: bool) -> Optional[str]:
    """Why the kernel tier cannot run on this host (None: it can). Pure, for doctor and start."""
    if not nft_on:
        return "--no-nft: the kernel tier lives in the daemon's nftables table"
    if ip_forward.get("4") != 1:
        return "net.ipv4.ip_forward is 0: sysctl -w net.ipv4.ip_forward=1 (see doctor for what else that opens)"
    return None


class KernelTier:
    def __init__(self, layout: NftLayout, nft: nftmgr.Nft, conntrack, clock: Callable[[], float] = time.monotonic):
        self.layout = layout
        self.nft = nft
        self.conntrack = conntrack
        self.clock = clock
        self._flows: dict[int, tuple[KernelFlow, ...]] = {}     # session key -> installed flows
        self._sockets: set[Address] = set()                     # relay sockets of installed flows
        self._counts: dict[Address, SocketCount] = {}
        self._last_poll = 0.0
        self.failures = 0
        # Forwarding is per family: streams of a family the host does not forward stay in userspace.
        self.families = {v for v, on in syscheck.forwarding().items() if on == 1}

    # ---- per session -------------------------------------------------------------------------
    def sync(self, key: int, flows: Iterable[KernelFlow]) -> bool:
        """Make the installed flows of session `key` exactly `flows`; True if they changed."""
        new = tuple(f for f in flows if f.v in self.families)
        old = self._flows.get(key, ())
        if new == old:
            return False
        cmds = []
        if old:
            cmds += nftmgr.kernel_commands(self.layout, "delete", old)
        if new:
            cmds += nftmgr.kernel_commands(self.layout, "add", new)
        try:
            self.nft.json(cmds)                 # one transaction: the call moves at once
        except NftError as exc:
            self.failures += 1
            log.error("[%s] kernel: cannot %s flows, media stays in userspace: %s",
                      (new or old)[0].call_id, "update" if old and new else "add" if new else "remove", exc)
            if old:                             # unknown state: drop ours, the next change retries
                self._flows.pop(key, None)
                self._sockets.difference_update(_canon(sock) for f in old for sock in (f.a_local, f.b_local))
            return False
        for f in old:
            for sock in (f.a_local, f.b_local):
                self._retire(sock)
                self._sockets.discard(_canon(sock))
        self._sockets.update(_canon(sock) for f in new for sock in (f.a_local, f.b_local))
        if new:
            self._flows[key] = new
        else:
            self._flows.pop(key, None)
        # Elements first, then the entries: a packet in between only creates the NAT'ed entry.
        tuples = _tuples(old + new)
        try:
            self.conntrack.delete(tuples)
        except OSError as exc:
            self.failures += 1
            log.error("[%s] kernel: conntrack delete failed (%s): forwarding may stay where it was until the "
                      "entries expire", (new or old)[0].call_id, exc)
        verb = "in the kernel" if new else "back in userspace"
        log.info("[%s] media %s%s", (new or old)[0].call_id, verb,
                 "".join(f"; {f.a[0]}:{f.a[1]} <-> {f.b[0]}:{f.b[1]}" for f in new))
        return True

    def remove(self, key: int) -> None:
        self.sync(key, ())

    def holds(self, key: int) -> bool:
        """Session `key` has flows in the kernel."""
        return key in self._flows

    def in_kernel(self, sock: Address) -> bool:
        return _canon(sock) in self._sockets

    def close_all(self) -> None:
        """Shutdown, X: every flow back to userspace in one transaction, entries deleted."""
        if not self._flows:
            return
        count = self.flows
        self._flows.clear()
        self._sockets.clear()
        try:
            self.nft.json(nftmgr.kernel_flush_commands(self.layout))
        except NftError as exc:
            self.failures += 1
            log.error("kernel: flushing %d flows failed: %s", count, exc)
        self.flush_entries()

    def flush_entries(self) -> None:
        """Delete every NAT'ed entry of ours (they carry CT_MARK): at start, a crashed daemon's
        streams would otherwise go on being forwarded until their entries time out."""
        try:
            self.conntrack.flush_mark(nftmgr.CT_MARK)
        except OSError as exc:
            self.failures += 1
            log.error("kernel: deleting the conntrack entries of kernel streams failed: %s", exc)

    # ---- counters ----------------------------------------------------------------------------
    def _retire(self, sock: Address) -> None:
        c = self._counts.get(_canon(sock))
        if c is not None:
            c.retired_packets += c.packets
            c.retired_bytes += c.bytes
            c.packets = c.bytes = 0

    def poll(self, force: bool = False) -> None:
        """Read the per-socket counters (every POLL_S from tick(); sooner when forced)."""
        now = self.clock()
        if not self._flows or (not force and now - self._last_poll < POLL_S) or \
                (force and now - self._last_poll < FRESH_S):
            return
        self._last_poll = now
        counts: dict = {}
        for v in sorted({f.v for flows in self._flows.values() for f in flows}):
            # one set per command: nft 1.0.6 refuses two `list set` in one batch
            cmd = [{"list": {"set": {"family": self.layout.family, "table": self.layout.table_name,
                                     "name": f"{self.layout.prefix}kcount{v}"}}}]
            try:
                counts.update(nftmgr.parse_kernel_counters(self.nft.json(cmd)))
            except NftError as exc:
                self.failures += 1
                log.warning("kernel: reading counters failed: %s", exc)
                return
        for sock, (packets, raw) in counts.items():
            c = self._counts.setdefault(sock, SocketCount())
            payload = raw - packets * HEADERS["6" if ":" in sock[0] else "4"]
            if packets > c.packets:
                c.active_at = now
            c.packets, c.bytes = packets, max(0, payload)

    def counts(self, sock: Address) -> tuple[int, int]:
        """(packets, payload bytes) the kernel forwarded for this relay socket."""
        c = self._counts.get(_canon(sock))
        return (c.packets + c.retired_packets, c.bytes + c.retired_bytes) if c else (0, 0)

    def last_active(self, sock: Address, fresh: bool = False) -> float:
        """When the kernel last forwarded for this socket (monotonic s, 0: never); with fresh,
        the counters are read again first unless the last read is very recent."""
        if fresh and self.in_kernel(sock):
            self.poll(force=True)
        c = self._counts.get(_canon(sock))
        return c.active_at if c else 0.0

    def forget(self, socks: Iterable[Address]) -> None:
        """The sockets were released: their counts belong to a session that ended."""
        for s in socks:
            self._counts.pop(_canon(s), None)

    @property
    def flows(self) -> int:
        return sum(len(f) for f in self._flows.values())


def _tuples(flows) -> list[tuple[Address, Address]]:
    """Every conntrack tuple a flow's legs can have left: each party towards its relay socket
    (its packets reached the daemon) and the socket towards the party (the daemon sent first)."""
    out = []
    for f in flows:
        out += [(f.a, f.a_local), (f.b, f.b_local), (f.a_local, f.a), (f.b_local, f.b)]
    return out


def open_tier(layout: NftLayout, nft: nftmgr.Nft) -> KernelTier:
    """The tier, with its conntrack socket (raises OSError when conntrack is not usable)."""
    from rtpproxy.conntrack import Conntrack  # noqa: PLC0415

    if not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        raise OSError("conntrack is not available (modprobe nf_conntrack)")
    tier = KernelTier(layout, nft, Conntrack())
    tier.flush_entries()
    return tier
