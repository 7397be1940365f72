"""Keeps the nft sets equal to the media sockets of live sessions (issue: per-call holes).

Every socket pair a session binds is opened before the U/L reply leaves and closed when the
session ends (in nft at the next flush_closes(), one transaction for all closes of a 0.1 s
period, so D itself does no nft work); elements are refreshed while the call lives so that only a dead daemon's
leftovers expire. Failures are logged with the call-id and counted; with `required` they are
raised so the command is refused.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

from rtpproxy import nftmgr
from rtpproxy.errors import NftError
from rtpproxy.nftmgr import Element, NftLayout
from rtpproxy.nftnl import ElementWriter

log = logging.getLogger("rtpproxy.nft")

MARGIN_S = 30          # element timeout = the longest session TTL + this


class MediaFirewall:
    def __init__(self, layout: NftLayout, required: bool = False, nft: Optional[nftmgr.Nft] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.layout = layout
        self.required = required
        self.nft = nft or nftmgr.Nft()
        self.clock = clock
        self._open: dict[tuple[str, int], tuple[str, float]] = {}   # (host, port) -> (call-id, refreshed)
        self._closing: dict[tuple[str, int], str] = {}              # closed, still in nft -> call-id
        self._writer: Optional[ElementWriter] = None                # opens: raw netlink, ~25 µs not ~110
        self.failures = 0
        self._last_pass = 0.0

    # ---- lifecycle --------------------------------------------------------
    def _jumps(self) -> Optional[list[int]]:
        """Handles of our jump rules in the admin's chain ([] standalone; None: no such table)."""
        if not self.layout.admin_chain:
            return []
        fam, table, _ = self.layout.admin_chain
        listing = self.nft.list_table(fam, table)
        return None if listing is None else nftmgr.jump_handles(listing, self.layout)

    def setup(self) -> None:
        """Remove what a previous instance left, then load the skeleton (one transaction)."""
        handles = self._jumps()
        if handles is None:
            fam, table, _ = self.layout.admin_chain
            raise NftError(f"--nft-chain: table {fam} {table} does not exist; create it or use the "
                           "standalone table (no --nft-chain)")
        self.nft.text(nftmgr.setup_text(self.layout, handles))
        self._open.clear()
        self._closing.clear()
        log.info("nft: %s %s ready (elements expire after %ds)", self.layout.family, self.layout.table_name,
                 self.layout.element_timeout)

    def teardown(self) -> None:
        handles = self._jumps()
        if handles is None:
            return                           # the admin's table is gone, and ours with it
        self.nft.text(nftmgr.removal_text(self.layout, handles))
        self._open.clear()
        self._closing.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---- per call ---------------------------------------------------------------
    def open(self, call_id: str, sockets: Iterable[tuple[str, int]]) -> None:
        elements = [Element(h, p, call_id) for h, p in sockets]
        try:
            if self._writer is None:
                self._writer = ElementWriter(self.layout)
            self._writer.add(elements)
        except NftError as exc:
            self.failures += 1
            log.error("[%s] nft: cannot open %s: %s", call_id,
                      ", ".join(f"{e.host}:{e.port}" for e in elements), exc)
            if self.required:
                raise
            return
        now = self.clock()
        for e in elements:
            self._open[(e.host, e.port)] = (call_id, now)
            self._closing.pop((e.host, e.port), None)      # open again before its delete went out

    def close(self, sockets: Iterable[tuple[str, int]]) -> None:
        """Forget these holes now; flush_closes() deletes them from nft. (A delete transaction,
        ~0.1 ms alone, sometimes sleeps in the kernel under media load, and a control thread
        that sleeps on a core shared with a worker gets it back only after the worker's slice.)"""
        for k in sockets:
            entry = self._open.pop(k, None)
            if entry is not None:
                self._closing[k] = entry[0]

    def flush_closes(self) -> bool:
        """Delete every hole closed since the last call, in one transaction. True if there were any."""
        if not self._closing:
            return False
        closing, self._closing = self._closing, {}
        try:
            self.nft.json(nftmgr.element_commands(self.layout, "delete", [Element(h, p) for h, p in closing]))
        except NftError:
            # One missing element (expired, or deleted by hand) fails the whole transaction, and
            # nft 1.0.6 has no `destroy element`: delete them one by one, naming the failures.
            for (h, p), call_id in closing.items():
                try:
                    self.nft.json(nftmgr.element_commands(self.layout, "delete", [Element(h, p)]))
                except NftError as exc:
                    self.failures += 1
                    log.error("[%s] nft: cannot close %s:%s (it expires within %ds): %s", call_id, h, p,
                              self.layout.element_timeout, exc)
        return True

    def close_all(self) -> None:
        """Close every open media socket in one transaction (X, shutdown)."""
        if not self._open and not self._closing:
            return
        count = len(self._open)
        self._open.clear()
        self._closing.clear()                # the flush takes them too
        try:
            self.nft.json(nftmgr.flush_commands(self.layout))
        except NftError as exc:
            self.failures += 1
            log.error("nft: cannot close %d media sockets (they expire within %ds): %s", count,
                      self.layout.element_timeout, exc)

    def refresh(self) -> int:
        """Re-add (which restarts the timeout) every element refreshed more than a third of the
        timeout ago. Called once a second; returns how many were refreshed."""
        now = self.clock()
        if now - self._last_pass < self.layout.element_timeout / 6:
            return 0                         # a pass every sixth of the timeout keeps every element alive
        self._last_pass = now
        due = [(k, cid) for k, (cid, t) in self._open.items() if now - t >= self.layout.element_timeout / 3]
        if not due:
            return 0
        try:
            self.nft.json(nftmgr.element_commands(self.layout, "add", [Element(h, p, cid) for (h, p), cid in due]))
        except NftError as exc:
            self.failures += 1
            log.error("nft: refreshing %d elements failed: %s", len(due), exc)
            return 0
        for k, cid in due:
            self._open[k] = (cid, now)
        return len(due)

    # ---- status ---------------------------------------------------------------------
    def expected(self) -> int:
        return len(self._open)

    def drift(self) -> tuple[int, int, int]:
        """(live elements, missing from nft, stale in nft) against what the sessions hold."""
        self.flush_closes()
        listing = self.nft.list_table(self.layout.family, self.layout.table_name) or {}
        live = {(_canon(e.host), e.port) for e in nftmgr.parse_elements(listing, self.layout)}
        want = {(_canon(h), p) for h, p in self._open}
        return len(live), len(want - live), len(live - want)


def _canon(host: str) -> str:
    import ipaddress  # noqa: PLC0415

    return str(ipaddress.ip_address(host))
