"""What each legacy command does (reference rtpp-protocol.md §2, §5): Request in, reply body out.

Domain errors become E<n> codes here and nowhere else.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Optional

from rtpproxy.config import Bind, Config, NotifyTarget
from rtpproxy import interfaces
from rtpproxy.control import rtpp
from rtpproxy.control.modifiers import ULOptions, parse_ul
from rtpproxy.engine_api import Address
from rtpproxy.errors import NftError, PortsExhausted, ProtocolError
from rtpproxy.service import MediaService
from rtpproxy.sessions import Session
from rtpproxy.stats import EXTRA_G_NAMES, G_NAMES, NFT_G_NAMES

log = logging.getLogger("rtpproxy.control")

PROTOCOL_VERSION = "20040107"

# Capability dates (§4) this relay really implements. 20081224 and 20150617 need -n.
CAPABILITIES = {
    "20040107",   # basic functionality
    "20050322",   # multiple streams, MOH
    "20080403",   # Q
    "20081102",   # c codec lists
    "20090810",   # automatic bridging (E/I with 6)
    "20141004",   # G
    "20150330",   # n: new port
}
NOTIFY_CAPABILITIES = {"20081224", "20150617"}

Q_DEFAULT = ("ttl", "npkts_ina", "npkts_ino", "nrelayed", "ndropped")
Q_NAMES = set(Q_DEFAULT) | {"longest_ipi", "rtpa_jlast", "rtpa_jmax", "rtpa_javg", "rtpa_nsent",
                            "rtpa_nrcvd", "rtpa_ndups", "rtpa_nlost", "rtpa_perrs"}
Q_FLOATS = {"longest_ipi", "rtpa_jlast", "rtpa_jmax", "rtpa_javg"}


@dataclass(frozen=True)
class Context:
    """Where a command came from: the client's IP (for %%CC_SELF%%) and the UDP cookie length."""

    peer_ip: str = "127.0.0.1"
    cookie_len: int = 0


class Commands:
    def __init__(self, cfg: Config, service: MediaService):
        self.cfg = cfg
        self.svc = service
        self._started = time.monotonic()
        self._cpu_mark = (time.monotonic(), time.process_time())

    # ---- entry point ------------------------------------------------------
    def execute(self, body: bytes, ctx: Context) -> str:
        """Parse and run one command; always returns a reply body (E<n> on any error)."""
        self.svc.stats.ncmds_rcvd += 1
        try:
            req = rtpp.parse(body)
            reply = self._run(req, ctx)
        except ProtocolError as exc:
            self.svc.stats.ncmds_errs += 1
            if exc.reason:
                log.debug("command refused with E%d: %s", exc.code, exc.reason)
            return rtpp.error_body(exc.code)
        self.svc.stats.ncmds_succd += 1
        return reply

    def _run(self, req: rtpp.Request, ctx: Context) -> str:
        if req.subcommands:
            # && sub-commands (20191015) are not implemented; VF 20191015 answers 0 so clients never send them.
            raise ProtocolError(rtpp.E_SUBC, "sub-commands are not supported")
        handler = getattr(self, "_cmd_" + req.op)
        return handler(req, ctx)

    # ---- V, VF, X, I, G ---------------------------------------------------
    def _cmd_V(self, req, ctx) -> str:
        return PROTOCOL_VERSION

    def _cmd_VF(self, req, ctx) -> str:
        date = req.args[0]
        if date in CAPABILITIES or (self.cfg.notify and date in NOTIFY_CAPABILITIES):
            return "1"
        return "0"

    def _cmd_X(self, req, ctx) -> str:
        self.svc.destroy_all("deleted by X")
        return "0"

    def _cmd_I(self, req, ctx) -> str:
        if any(m not in "bBlL" for m in req.modifiers):
            raise ProtocolError(rtpp.E_PARSE_I, "I takes only b and l")
        st = self.svc.stats
        live = [c for _rtcp, c in self.svc.live_counters()]
        lines = [
            f"sessions created: {st.nsess_created}",
            f"active sessions: {len(self.svc.sessions)}",
            f"active streams: {self.svc.active_streams()}",
            f"packets received: {st.done_rcvd + sum(c.packets for c in live)}",
            f"packets transmitted: {st.done_relayed + sum(c.relayed for c in live)}",
            f"kernel: {self.svc.kernel_state}",
        ]
        if "l" in req.modifiers.lower():
            lines.append(f"average load: {self._load():f}")
        return "\n".join(lines)

    def _load(self) -> float:
        """CPU share of this process since the previous Il (0..1 per core)."""
        wall, cpu = time.monotonic(), time.process_time()
        w0, c0 = self._cpu_mark
        self._cpu_mark = (wall, cpu)
        return (cpu - c0) / (wall - w0) if wall > w0 else 0.0

    def _cmd_G(self, req, ctx) -> str:
        verbose = self._verbose(req.modifiers, rtpp.E_PARSE_G)
        names = req.args
        unknown = [n for n in names if n not in G_NAMES and n not in NFT_G_NAMES and n not in EXTRA_G_NAMES]
        if unknown:
            raise ProtocolError(rtpp.E_STATS, f"unknown counter {unknown[0]!r}")
        if not names:
            return ""
        values = self.svc.stats.values([c for _r, c in self.svc.live_counters()], self._pps())
        if any(n in NFT_G_NAMES for n in names):
            values.update(self._nft_values())
        body = " ".join(_fmt(n, values[n], verbose) for n in names)
        if len(body) + ctx.cookie_len + 2 > rtpp.REPLY_MAX:
            raise ProtocolError(rtpp.E_G_TOOBIG, "reply too long")
        return body

    def _nft_values(self) -> dict[str, int]:
        """Our G extension: how the nft sets compare with the session table (nft_live, nft_missing
        and nft_stale list the kernel's sets, so they cost a netlink dump)."""
        fw = self.svc.firewall
        if fw is None:
            return dict.fromkeys(NFT_G_NAMES, 0)
        try:
            live, missing, stale = fw.drift()
        except NftError as exc:
            log.error("nft: cannot list the sets: %s", exc)
            live = missing = stale = -1
        return {"nft_open": fw.expected(), "nft_failures": fw.failures, "nft_live": live,
                "nft_missing": missing, "nft_stale": stale}

    def _pps(self) -> int:
        total = sum(c.packets for _r, c in self.svc.live_counters()) + self.svc.stats.done_rcvd
        elapsed = max(1e-9, time.monotonic() - self._started)
        return int(total / elapsed)

    @staticmethod
    def _verbose(mods: str, code: int) -> bool:
        if mods.lower() not in ("", "v"):
            raise ProtocolError(code, f"bad modifier {mods!r}")
        return bool(mods)

    # ---- U and L ------------------------------------------------------------
    def _cmd_U(self, req, ctx) -> str:
        return self._update(req, ctx, is_offer=True)

    def _cmd_L(self, req, ctx) -> str:
        return self._update(req, ctx, is_offer=False)

    def _update(self, req: rtpp.Request, ctx: Context, is_offer: bool) -> str:
        args = req.args
        call_id, rip, rport, from_tag = args[:4]
        to_tag: Optional[str] = None
        notify_args: Optional[tuple[str, str]] = None
        if len(args) in (5, 7):
            to_tag = args[4]
        if is_offer and len(args) == 6:
            notify_args = (args[4], args[5])
        elif is_offer and len(args) == 7:
            notify_args = (args[5], args[6])
        opts = parse_ul(req.modifiers, self.cfg.bridge)
        notify = self._notify_target(notify_args, ctx) if notify_args else None
        addr = _remote_address(rip, rport, opts.ipv6)

        s, i = self.svc.sessions.lookup(call_id, from_tag, to_tag)
        created = s is None
        if created:
            if not is_offer:
                return "0"                     # L on an unknown session: 0, not an error
            if self.svc.draining:
                raise ProtocolError(rtpp.E_DRAINING, "draining: no new sessions")
            s, sidx = self.svc.new_session(call_id, from_tag, to_tag), 0
        else:
            sidx = i if is_offer else 1 - i
        side = s.sides[sidx]
        # The side's own party decides the family when it is known (v4/v6 bridging), else the
        # command's '6' (the offer's family is the best guess for the party yet to answer).
        known = side.rtp.signalled
        bind = self._bind_for(opts, sidx, ":" in known[0] if known else opts.ipv6)
        if side.pair is None or opts.new_port:
            try:
                self.svc.open_side(s, sidx, bind)
            except PortsExhausted as exc:
                log.error("[%s] %s", call_id, exc)
                raise ProtocolError(rtpp.E_PORTS_NEW if created else rtpp.E_PORTS_EXISTING, str(exc)) from None
            except OSError as exc:
                log.error("[%s] cannot bind media ports on %s: %s", call_id, bind.host, exc)
                raise ProtocolError(rtpp.E_PORTS_NEW if created else rtpp.E_PORTS_EXISTING, str(exc)) from None
            except NftError as exc:                  # only raised with --nft-required
                raise ProtocolError(rtpp.E_PORTS_NEW if created else rtpp.E_PORTS_EXISTING, str(exc)) from None
        if created:
            self.svc.register(s)
        if to_tag is not None and s.to_tag is None:
            s.to_tag = to_tag
        if opts.weak:
            side.weak = True
        else:
            s.strong = True
        remote = s.sides[1 - sidx]
        asymmetric = opts.asymmetric if opts.asymmetric is not None else False
        self.svc.signal(s, 1 - sidx, addr, asymmetric, opts.latching, opts.ssrc_lock or None)
        remote.codecs = opts.codecs
        if is_offer:
            s.notify = notify                  # a U without notify arguments drops an earlier registration
        self.svc.touch(s)
        self.svc.push(s)
        return _port_reply(side.port, side.advertised)

    def _bind_for(self, opts: ULOptions, sidx: int, want_v6: bool) -> Bind:
        ifaces = self.cfg.interfaces
        if opts.local_addr is not None:
            return self._named_bind(opts.local_addr, rtpp.E_LADDR_INV)
        if opts.route_to is not None:
            try:
                probe = socket.socket(socket.AF_INET6 if ":" in opts.route_to else socket.AF_INET,
                                      socket.SOCK_DGRAM)
                with probe:
                    probe.connect((opts.route_to, 9))
                    local = probe.getsockname()[0]
            except OSError:
                raise ProtocolError(rtpp.E_RADDR_INV, f"no route to {opts.route_to}") from None
            return self._named_bind(local, rtpp.E_RADDR_INV)
        # The 1st bridge letter picks the interface of the from side (stream[1]), the 2nd the to
        # side (stream[0]); I = internal, E = external.
        pos = 0 if sidx == 1 else 1
        letter = opts.bridge[pos] if len(opts.bridge) > pos else None
        bind = interfaces.select(ifaces, want_v6, letter)
        if bind is None:
            raise ProtocolError(rtpp.E_NOAF, f"no local IPv{6 if want_v6 else 4} address (-l / -6)")
        return bind

    def _named_bind(self, value: str, code: int) -> Bind:
        bind = interfaces.by_name_or_address(self.cfg.interfaces, value)
        if bind is None:
            raise ProtocolError(code, f"{value} is not one of the relay's addresses or labels")
        return bind

    def _notify_target(self, notify_args: tuple[str, str], ctx: Context) -> Optional[tuple[NotifyTarget, str]]:
        if not self.cfg.notify:
            raise ProtocolError(rtpp.E_NOTIFY_OFF, "notification requested but no -n was given")
        spec, raw_tag = notify_args
        tag = _url_decode(raw_tag)
        wanted = f"unix:{spec}" if spec.startswith("/") else spec
        for t in self.cfg.notify:
            if t.spec == wanted:
                if t.host == "%%CC_SELF%%":
                    t = NotifyTarget(t.spec, "tcp", host=ctx.peer_ip, port=t.port)
                return t, tag
        log.warning("notify target %r is not allowed by any -n; no notification will be sent", spec)
        return None

    # ---- D ----------------------------------------------------------------
    def _cmd_D(self, req, ctx) -> str:
        mods = req.modifiers.lower()
        if mods not in ("", "w"):
            raise ProtocolError(rtpp.E_PARSE_D, f"bad modifier {req.modifiers!r}")
        call_id, from_tag = req.args[:2]
        to_tag = req.args[2] if len(req.args) > 2 else None
        matches = self.svc.sessions.matching(call_id, from_tag, to_tag)
        if not matches:
            raise ProtocolError(rtpp.E_SESUNKN, "no such session")
        for s, side in matches:
            if mods == "w":
                s.sides[side].weak = False
            else:
                s.strong = False
            if not s.alive():
                self.svc.destroy(s, "deleted")
        return "0"

    # ---- Q ----------------------------------------------------------------
    def _cmd_Q(self, req, ctx) -> str:
        verbose = self._verbose(req.modifiers, rtpp.E_PARSE_Q)
        call_id, from_tag = req.args[:2]
        to_tag = req.args[2] if len(req.args) > 2 else None
        names = tuple(req.args[3:]) or Q_DEFAULT
        s, i = self._find(call_id, from_tag, to_tag)
        unknown = [n for n in names if n not in Q_NAMES]
        if unknown:
            raise ProtocolError(rtpp.E_QUERY, f"unknown counter {unknown[0]!r}")
        idx = 1 - i
        ina, ino = self.svc.counters(s, idx), self.svc.counters(s, 1 - idx)
        values = {
            "ttl": max(0, int(self.svc.remaining(s))),
            "npkts_ina": ina.packets,
            "npkts_ino": ino.packets,
            "nrelayed": ina.relayed + ino.relayed,
            "ndropped": ina.dropped + ino.dropped,
        }
        body = " ".join(_fmt(n, float(values.get(n, 0)) if n in Q_FLOATS else values.get(n, 0), verbose)
                        for n in names)
        if len(body) + ctx.cookie_len + 2 > rtpp.REPLY_MAX:
            raise ProtocolError(rtpp.E_Q_TOOBIG, "reply too long")
        return body

    def _find(self, call_id: str, from_tag: str, to_tag: Optional[str]) -> tuple[Session, int]:
        s, i = self.svc.sessions.lookup(call_id, from_tag, to_tag)
        if s is None:
            raise ProtocolError(rtpp.E_SESUNKN, "no such session")
        return s, i

    # ---- P, S, R, C, N: no player or recorder is configured -----------------
    def _cmd_P(self, req, ctx) -> str:
        count = req.modifiers
        if count and not count.isdigit():
            raise ProtocolError(rtpp.E_PLAYCOUNT, "play count must be decimal")
        call_id, _prompt, codecs, from_tag = req.args[:4]
        to_tag = req.args[4] if len(req.args) > 4 else None
        s, i = self._find(call_id, from_tag, to_tag)
        if count and int(count) == 0:
            return "0"                         # "stop only": nothing is playing
        if codecs == "session":
            if s.sides[1 - i].codecs is None:
                raise ProtocolError(rtpp.E_BADMOD, "no codec list saved for this session")
        elif not codecs.replace(",", "").isdigit():
            raise ProtocolError(rtpp.E_BADMOD, "codecs must be a payload type list or 'session'")
        raise ProtocolError(rtpp.E_PLAYFAIL, "playback is not available")

    def _cmd_S(self, req, ctx) -> str:
        call_id, from_tag = req.args[:2]
        self._find(call_id, from_tag, req.args[2] if len(req.args) > 2 else None)
        return "0"

    def _cmd_R(self, req, ctx) -> str:
        mods = req.modifiers.lower()
        if "p" in mods:
            raise ProtocolError(rtpp.E_PARSE_R, "p is not valid for R")
        if mods not in ("", "s"):
            raise ProtocolError(rtpp.E_PARSE_RC, f"bad modifier {req.modifiers!r}")
        # No recording directory (-r) exists, so no stream starts recording: rtpproxy answers E50.
        raise ProtocolError(rtpp.E_SESUNKN, "recording is not configured")

    def _cmd_C(self, req, ctx) -> str:
        if any(m not in "sp" for m in req.modifiers.lower()):
            raise ProtocolError(rtpp.E_PARSE_RC, f"bad modifier {req.modifiers!r}")
        call_id, _target, from_tag = req.args[:3]
        self._find(call_id, from_tag, req.args[3] if len(req.args) > 3 else None)
        raise ProtocolError(rtpp.E_COPYFAIL, "copying is not available")

    def _cmd_N(self, req, ctx) -> str:
        mods = req.modifiers.lower()
        if mods.startswith("a") and len(mods) > 1:
            raise ProtocolError(rtpp.E_PARSE_R, "junk after Na")
        if mods not in ("", "a"):
            raise ProtocolError(rtpp.E_PARSE_RC, f"bad modifier {req.modifiers!r}")
        raise ProtocolError(rtpp.E_SESUNKN, "nothing is being recorded")


def _fmt(name: str, value, verbose: bool) -> str:
    text = f"{value:f}" if isinstance(value, float) else str(value)
    return f"{name}={text}" if verbose else text


def _port_reply(port: int, shown: Optional[str]) -> str:
    if shown is None:
        return str(port)
    return f"{port} {shown} 6" if ":" in shown else f"{port} {shown}"


def _remote_address(host: str, port: str, ipv6: bool) -> Optional[Address]:
    """The SDP address of a U/L, or None for hold / an address rtpproxy silently ignores."""
    lo, hi = (2, 45) if ipv6 else (7, 15)
    if not port.isdigit() or int(port) > 65535:
        raise ProtocolError(rtpp.E_BADREMOTE, f"bad port {port!r}")
    if not lo <= len(host) <= hi:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(rtpp.E_BADREMOTE, f"bad address {host!r}") from None
    if (ip.version == 6) != ipv6:
        raise ProtocolError(rtpp.E_BADREMOTE, f"{host!r} is not an IPv{6 if ipv6 else 4} address")
    if ip.is_unspecified or int(port) == 0:
        return None                            # on hold, or a disabled m= line
    return str(ip), int(port)


def _url_decode(tag: str) -> str:
    """notify_tag is URL-encoded; a malformed escape is E10."""
    i = 0
    raw = tag.encode("latin-1")
    buf = bytearray()
    while i < len(raw):
        if raw[i] == 0x25:                     # '%'
            hexpart = raw[i + 1:i + 3]
            if len(hexpart) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in hexpart):
                raise ProtocolError(rtpp.E_NOTIFY_TAG, "bad %XX escape in notify tag")
            buf.append(int(hexpart, 16))
            i += 3
        else:
            buf.append(raw[i])
            i += 1
    return buf.decode("latin-1")

