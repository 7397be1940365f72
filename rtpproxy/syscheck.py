"""Host checks that catch silent media loss: `rtpproxy doctor`, also run at daemon start.

gather() reads the host (sysctls under /proc/sys, `ip -j route get`, `ip -j addr`, limits, the
live nft counter); evaluate() turns those facts into findings, one line each: what, why it
breaks media, and the exact command that fixes it. evaluate() is pure and tested on its own.
"""
from __future__ import annotations

import ipaddress
import json
import resource
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rtpproxy.config import Bind

SYSCTL = Path("/proc/sys")
RCVBUF_WANTED = 256 * 1024          # what ports.py asks for per media socket
LEVELS = ("ok", "info", "warn", "error")


@dataclass(frozen=True)
class Finding:
    level: str                       # ok | info | warn | error
    check: str                       # rp_filter, route, ports, nofile, buffers, forwarding, live-rpf
    what: str
    why: str = ""
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level.upper():5} {self.what}"
        if self.why:
            text += f": {self.why}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text


@dataclass(frozen=True)
class RouteProbe:
    peer: str                        # a host in the peer network
    local: str                       # our media address
    iface: str                       # the interface holding it
    out_dev: Optional[str]           # `ip route get PEER from LOCAL`: where replies leave (None: no route)
    out_error: str = ""
    in_ok: bool = True               # `ip route get LOCAL from PEER iif IFACE` accepted
    in_error: str = ""


@dataclass
class Facts:
    interfaces: dict[str, str] = field(default_factory=dict)      # media address -> interface name
    rp_filter: dict[str, int] = field(default_factory=dict)       # "all" and each interface
    ip_forward: int = 0
    local_port_range: tuple[int, int] = (32768, 60999)
    reserved_ports: list[tuple[int, int]] = field(default_factory=list)
    nofile: int = 1024
    rmem_max: int = 212992
    routes: list[RouteProbe] = field(default_factory=list)
    rpf_fails: Optional[int] = None                               # live nft counter; None: not loaded
    ip6_forward: int = 0
    conntrack_max: Optional[int] = None                           # None: conntrack not loaded (yet)
    udp_timeouts: tuple[int, int] = (30, 120)                     # unreplied, stream (seconds)
    has_v6: bool = False                                          # IPv6 media addresses configured


# ---- evaluation (pure) -------------------------------------------------------

def evaluate(f: Facts, min_port: int, max_port: int, n_addresses: int,
             kernel_tier: Optional[bool] = None) -> list[Finding]:
    out: list[Finding] = []
    rp_all = f.rp_filter.get("all", 0)
    for addr, ifname in sorted(f.interfaces.items()):
        eff = max(rp_all, f.rp_filter.get(ifname, 0))
        probes = [r for r in f.routes if r.iface == ifname]
        failing = [r for r in probes if not r.in_ok]
        if eff == 1:
            level = "error" if failing else "warn"
            why = ("RTP from " + ", ".join(r.peer for r in failing) + " arriving here is dropped by the kernel"
                   if failing else "RTP from a peer whose route back leaves by another interface is dropped "
                   "silently (one-way or no audio)")
            out.append(Finding(level, "rp_filter",
                               f"{ifname} ({addr}): strict reverse-path filtering "
                               f"(all={rp_all}, {ifname}={f.rp_filter.get(ifname, 0)}, effective 1)", why,
                               f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{ifname}.rp_filter=2"))
        else:
            mode = {0: "off", 2: "loose"}.get(eff, str(eff))
            out.append(Finding("ok", "rp_filter", f"{ifname} ({addr}): reverse-path filtering {mode}"))
        for r in probes:
            if r.out_dev is None:
                out.append(Finding("error", "route", f"no route from {r.local} to peer {r.peer}",
                                   f"media to {r.peer} cannot be sent ({r.out_error})",
                                   f"ip route add {r.peer} via <gateway> dev {ifname}"))
            elif r.out_dev != ifname:
                out.append(Finding("warn", "route", f"replies to {r.peer} leave by {r.out_dev}, "
                                   f"media for {r.peer} arrives on {ifname} ({r.local})",
                                   "asymmetric path: the peer's own reverse-path filter or a stateful "
                                   "firewall on the way may drop the relay's media",
                                   f"ip rule add from {r.local} table 100 && ip route add default dev {ifname} "
                                   "table 100 (a policy route so replies leave where requests came in)"))
            if r.out_dev is not None and not r.in_ok and eff != 1:
                out.append(Finding("error", "route", f"packets from {r.peer} to {r.local} on {ifname} are "
                                   "refused by routing", r.in_error, f"ip route get {r.local} from {r.peer} "
                                   f"iif {ifname} must succeed: add a route back to {r.peer}"))
    if f.rpf_fails:
        strict = [i for i in f.interfaces.values() if max(rp_all, f.rp_filter.get(i, 0)) == 1]
        out.append(Finding("error" if strict else "warn", "live-rpf",
                           f"{f.rpf_fails} packets to media ports failed the reverse-path check",
                           "they arrived on an interface their source is not routed through"
                           + (f"; rp_filter is strict on {', '.join(strict)}, so they were dropped" if strict
                              else "; loose filtering let them through"),
                           "sysctl -w net.ipv4.conf.all.rp_filter=2 "
                           + " ".join(f"net.ipv4.conf.{i}.rp_filter=2" for i in strict) if strict
                           else "fix the routes above, or keep rp_filter loose"))
    lo, hi = f.local_port_range
    clash = [(a, b) for a, b in port_ranges_minus((lo, hi), f.reserved_ports) if a <= max_port and min_port <= b]
    if clash:
        out.append(Finding("warn", "ports", f"media ports {min_port}-{max_port} overlap the kernel's ephemeral "
                           f"range {lo}-{hi}", "outgoing connections of any program can take media ports (calls "
                           "then fail with E72), and the firewall cannot drop strays to those ports",
                           f"sysctl -w net.ipv4.ip_local_reserved_ports={max(lo, min_port)}-{min(hi, max_port)}"))
    else:
        out.append(Finding("ok", "ports", f"media ports {min_port}-{max_port} are outside the ephemeral range"))
    need = (max_port - min_port + 1) * max(1, n_addresses) + 64
    if f.nofile < need:
        out.append(Finding("warn", "nofile", f"open-file limit {f.nofile} is below the {need} sockets the port "
                           "range can need", "calls fail (E72) once the limit is reached, long before the "
                           "ports run out", f"-L {need} (or LimitNOFILE={need} in the unit)"))
    else:
        out.append(Finding("ok", "nofile", f"open-file limit {f.nofile} covers the port range ({need})"))
    if f.rmem_max < RCVBUF_WANTED:
        level = "warn" if f.rmem_max < RCVBUF_WANTED // 2 else "info"
        out.append(Finding(level, "buffers", f"net.core.rmem_max is {f.rmem_max}, media sockets ask for "
                           f"{RCVBUF_WANTED}", "the kernel caps each socket's receive buffer there; bursts "
                           "beyond it are lost", f"sysctl -w net.core.rmem_max={RCVBUF_WANTED}"))
    else:
        out.append(Finding("ok", "buffers", f"net.core.rmem_max {f.rmem_max} allows the media sockets' buffers"))
    out += _kernel_findings(f, min_port, max_port, kernel_tier)
    return out


def _kernel_findings(f: Facts, min_port: int, max_port: int, kernel_tier: Optional[bool]) -> list[Finding]:
    """The kernel tier (kernel_tier: True = --kernel, None = the default, on where possible, False = off)."""
    if kernel_tier is False:
        return [Finding("info", "kernel", "kernel tier: off (--no-kernel)", "media is relayed in userspace")]
    if not f.ip_forward:
        level = "error" if kernel_tier else "info"
        return [Finding(level, "kernel", "kernel tier: off (net.ipv4.ip_forward is 0)",
                        "the kernel tier forwards latched streams with NAT, which needs forwarding on; until then "
                        "every packet is relayed in userspace" + ("" if kernel_tier else " (that works, at more CPU)"),
                        "sysctl -w net.ipv4.ip_forward=1 (the daemon's table then drops forwarded traffic other "
                        "than relayed streams, so the host does not become a router; --kernel-forward-policy "
                        "accept if it routes on purpose)")]
    out = [Finding("ok", "kernel", "kernel tier: available (net.ipv4.ip_forward is 1)",
                   "latched streams are forwarded by nftables NAT; the daemon's forward chain drops other forwarded "
                   "traffic unless --kernel-forward-policy accept")]
    if f.has_v6 and not f.ip6_forward:
        out.append(Finding("warn", "kernel", "IPv6 forwarding is off: IPv6 streams stay in userspace",
                           "the kernel tier needs forwarding per family", "sysctl -w net.ipv6.conf.all.forwarding=1"))
    need = (max_port - min_port + 1) // 2 + 1024          # one entry per relayed stream pair, plus room
    if f.conntrack_max is None:
        out.append(Finding("info", "conntrack", "conntrack is not loaded yet",
                           "it loads with the daemon's table; check again while the daemon runs"))
    elif f.conntrack_max < need:
        out.append(Finding("warn", "conntrack", f"net.netfilter.nf_conntrack_max is {f.conntrack_max}, the port "
                           f"range can need {need} entries", "each kernel-forwarded stream pair holds one entry; "
                           "when the table is full new streams are dropped (kernel log: table full, dropping "
                           "packet)", f"sysctl -w net.netfilter.nf_conntrack_max={need}"))
    else:
        out.append(Finding("ok", "conntrack", f"nf_conntrack_max {f.conntrack_max} covers the port range ({need})"))
    unreplied, stream = f.udp_timeouts
    if stream < 30:
        out.append(Finding("warn", "conntrack", f"net.netfilter.nf_conntrack_udp_timeout_stream is {stream} s",
                           "a relayed stream silent that long (hold, silence suppression) loses its entry; the next "
                           "packet re-creates it through the maps, but only if it comes from the latched address",
                           "sysctl -w net.netfilter.nf_conntrack_udp_timeout_stream=120"))
    else:
        out.append(Finding("ok", "conntrack", f"UDP conntrack timeouts {unreplied} s / {stream} s (unreplied / "
                           "stream)"))
    return out


def exit_code(findings: Sequence[Finding]) -> int:
    levels = {x.level for x in findings}
    return 2 if "error" in levels else 1 if "warn" in levels else 0


def to_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"status": ("clean", "warnings", "errors")[exit_code(findings)],
                       "findings": [asdict(x) for x in findings]}, indent=1)


# ---- gathering (I/O) -----------------------------------------------------------

def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def forwarding() -> dict[str, int]:
    """IP forwarding per family ("4", "6"): what the kernel tier needs (doctor, daemon start)."""
    return {"4": _read_int(SYSCTL / "net/ipv4/ip_forward"), "6": _read_int(SYSCTL / "net/ipv6/conf/all/forwarding")}


def effective_capabilities() -> int:
    """This process's effective capability mask (CapEff); 0 if it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), 0)
    except OSError:
        return 0


def _ip_json(*args: str) -> tuple[Optional[list], str]:
    r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    if r.returncode != 0:
        return None, (r.stderr.strip() or f"ip {' '.join(args)} failed").replace("RTNETLINK answers: ", "")
    try:
        return json.loads(r.stdout or "[]"), ""
    except json.JSONDecodeError:
        return None, "unreadable output of ip -j"


def _address_map() -> dict[str, str]:
    data, _ = _ip_json("addr", "show")
    out = {}
    for link in data or []:
        for a in link.get("addr_info", []):
            out[str(ipaddress.ip_address(a["local"]))] = link["ifname"]
    return out


def _peer_host(net: str) -> str:
    n = ipaddress.ip_network(net, strict=False)
    return str(n.network_address if n.num_addresses == 1 else next(n.hosts()))


def gather(binds: Sequence[Bind], peers: Sequence[str], rpf_fails: Optional[int] = None) -> Facts:
    f = Facts(rpf_fails=rpf_fails)
    addrs = _address_map()
    for b in binds:
        if b.is_v6:
            continue                 # IPv6 has no rp_filter; its routes are probed below all the same
        if b.wildcard:
            for a, ifname in addrs.items():
                if ":" not in a and ifname != "lo":
                    f.interfaces[a] = ifname
        elif b.host in addrs:
            f.interfaces[b.host] = addrs[b.host]
    conf = SYSCTL / "net/ipv4/conf"
    f.rp_filter["all"] = _read_int(conf / "all/rp_filter")
    for ifname in set(f.interfaces.values()):
        f.rp_filter[ifname] = _read_int(conf / ifname / "rp_filter")
    fwd = forwarding()
    f.ip_forward, f.ip6_forward = fwd["4"], fwd["6"]
    f.has_v6 = any(b.is_v6 for b in binds)
    nf = SYSCTL / "net/netfilter"
    if (nf / "nf_conntrack_max").exists():
        f.conntrack_max = _read_int(nf / "nf_conntrack_max")
        f.udp_timeouts = (_read_int(nf / "nf_conntrack_udp_timeout", 30), _read_int(nf / "nf_conntrack_udp_timeout_stream", 120))
    rng = (SYSCTL / "net/ipv4/ip_local_port_range").read_text().split()
    f.local_port_range = (int(rng[0]), int(rng[1]))
    try:
        f.reserved_ports = parse_port_list((SYSCTL / "net/ipv4/ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        pass
    f.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    f.rmem_max = _read_int(SYSCTL / "net/core/rmem_max", 212992)
    for net in peers:
        peer = _peer_host(net)
        v6 = ":" in peer
        for local, ifname in sorted(f.interfaces.items()) if not v6 else []:
            out, out_err = _ip_json("route", "get", peer, "from", local)
            dev = out[0].get("dev") if out else None
            _in, in_err = _ip_json("route", "get", local, "from", peer, "iif", ifname)
            f.routes.append(RouteProbe(peer, local, ifname, dev, out_err, _in is not None, in_err))
    return f


def port_ranges_minus(base: tuple[int, int], holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """base with the holes cut out (pure)."""
    out = [base]
    for lo, hi in sorted(holes):
        nxt = []
        for a, b in out:
            if hi < a or lo > b:
                nxt.append((a, b))
                continue
            if a < lo:
                nxt.append((a, lo - 1))
            if hi < b:
                nxt.append((hi + 1, b))
        out = nxt
    return out


def parse_port_list(text: str) -> list[tuple[int, int]]:
    """ip_local_reserved_ports syntax: '35000-65000,22222' (pure)."""
    out = []
    for part in text.replace("\n", "").split(","):
        part = part.strip()
        if part:
            lo, _, hi = part.partition("-")
            out.append((int(lo), int(hi or lo)))
    return out


def unreserved_ephemeral() -> tuple[tuple[int, int], ...]:
    """Ports the kernel may pick as ephemeral: ip_local_port_range minus ip_local_reserved_ports."""
    try:
        lo, hi = (int(x) for x in (SYSCTL / "net/ipv4/ip_local_port_range").read_text().split())
        reserved = parse_port_list((SYSCTL / "net/ipv4/ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        return ()
    return tuple(port_ranges_minus((lo, hi), reserved))


def validate_peers(values: Sequence[str]) -> list[str]:
    """--peer NET values, normalised; raises ValueError naming the bad one."""
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            raise ValueError(f"{v!r} is not a network (e.g. 198.51.100.0/24 or 203.0.113.7)") from None
    return out
