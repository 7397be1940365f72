"""The daemon's configuration: one dataclass built from flags (cli.py) and parsers
for the flag values. Nothing is read at import time."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional

from rtpproxy.errors import ConfigError
from rtpproxy.tablefmt import MAX_TABLE

DEFAULT_CONTROL = "unix:/var/run/rtpproxy.sock"
DEFAULT_UDP_PORT = 22222
DEFAULT_TABLES_DIR = "/run/rtpproxy/tables"
MANUAL_ENTRIES = 256          # engine slots for entries written to the table files (tables.py)


@dataclass(frozen=True)
class Bind:
    """One local media address; advertised is what U/L replies show (None: the bind address)."""

    host: str
    advertised: Optional[str] = None
    name: str = ""                     # internal / external (bridge), or the operator's label

    @property
    def is_v6(self) -> bool:
        return ":" in self.host

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    @property
    def shown(self) -> Optional[str]:
        """Address in U/L replies; None means 'port only' (wildcard bind, as rtpproxy does)."""
        return None if self.wildcard else (self.advertised or self.host)


@dataclass(frozen=True)
class ControlSpec:
    kind: str                    # udp, udp6, unix, cunix, tcp, tcp6, stdio
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind in ("unix", "cunix"):
            return f"{self.kind}:{self.path}"
        if self.kind == "stdio":
            return "stdio:"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


@dataclass(frozen=True)
class NotifyTarget:
    spec: str                    # as given with -n, normalised (bare path -> unix:path)
    kind: str                    # unix or tcp
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass
class Config:
    interfaces: list[Bind] = field(default_factory=list)  # from -l and -6, in order (interfaces.py)
    control: list[ControlSpec] = field(default_factory=list)
    notify: list[NotifyTarget] = field(default_factory=list)
    min_port: int = 35000
    max_port: int = 65000
    ttl: int = 60
    setup_ttl: int = 60
    independent_ttl: bool = False
    update_window: float = 10.0                          # seconds after a U/L in which media may move
    latching: str = "dynamic"                            # strict | dynamic | dynamic-strict
    relatch_packets: int = 3                             # consecutive packets a new source needs
    relatch_silence: float = 0.2                         # ... while the latched one is silent this long
    ssrc_lock: bool = False
    sequential_ports: bool = False
    tos: int = 0xB8
    foreground: bool = True
    pidfile: Optional[str] = None
    user: Optional[str] = None
    group: Optional[str] = None
    force_root: bool = False
    log_level: str = "INFO"
    log_facility: str = "daemon"
    nofile: Optional[int] = None
    nft: bool = True                                      # manage per-call holes in nftables
    nft_table: str = "rtpproxy"
    nft_chain: Optional[tuple[str, str, str]] = None      # (family, table, chain) of the admin's ruleset
    nft_required: bool = False                            # refuse calls whose ports nft could not open
    nft_range_policy: str = "drop"                        # drop | none
    peers: list[str] = field(default_factory=list)       # --peer networks for the route checks
    strict_checks: bool = False
    kernel: Optional[bool] = None                         # kernel tier: None = where the host supports it
    kernel_forward_policy: str = "drop"                   # drop | accept forwarded traffic that is not ours
    table: int = 0                                        # forwarding table owned (table files); -1: none
    tables_dir: str = DEFAULT_TABLES_DIR
    backend: str = "auto"
    workers: int = 0                                      # 0: one per core

    @property
    def ipv4(self) -> list[Bind]:
        return [b for b in self.interfaces if not b.is_v6]

    @property
    def ipv6(self) -> list[Bind]:
        return [b for b in self.interfaces if b.is_v6]

    @property
    def bridge(self) -> bool:
        from rtpproxy.interfaces import has_bridge  # noqa: PLC0415

        return has_bridge(self.interfaces)

    def latch_policy(self):
        from rtpproxy.latch import Mode, Policy  # noqa: PLC0415

        return Policy(Mode(self.latching), self.update_window, self.relatch_packets, self.relatch_silence,
                      self.ssrc_lock)

    def nft_layout(self, kernel: bool = False):
        """Where the daemon's nftables objects live, derived from this config."""
        from rtpproxy.firewall import MARGIN_S  # noqa: PLC0415
        from rtpproxy.nftmgr import NftLayout  # noqa: PLC0415

        from rtpproxy.syscheck import unreserved_ephemeral  # noqa: PLC0415

        return NftLayout(table=self.nft_table, admin_chain=self.nft_chain, min_port=self.min_port,
                         max_port=self.max_port, range_policy=self.nft_range_policy,
                         element_timeout=max(self.ttl, self.setup_ttl) + MARGIN_S,
                         control_ports=tuple(c.port for c in self.control if c.kind in ("udp", "udp6")),
                         ephemeral=unreserved_ephemeral(), kernel=kernel,
                         forward_policy=self.kernel_forward_policy)

    @property
    def max_streams(self) -> int:
        """Engine stream slots: at most one media socket per port and bind address, plus room
        for the table files' manual entries."""
        return (self.max_port - self.min_port + 2) * max(1, len(self.interfaces)) + MANUAL_ENTRIES


def numeric_host(value: str, flag: str, version: Optional[int] = None) -> str:
    """A numeric address as given to a flag ('*' or empty: the wildcard of the family)."""
    if value in ("*", ""):
        return "::" if version == 6 else "0.0.0.0"
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ConfigError(flag, f"{value!r} is not a numeric IP address") from None
    if version and ip.version != version:
        raise ConfigError(flag, f"{value!r} is not an IPv{version} address")
    return str(ip)


def parse_control(value: str) -> ControlSpec:
    """-s value, in rtpproxy's forms: udp:HOST[:PORT], udp6:, tcp:, tcp6:, unix:PATH, cunix:PATH,
    a bare /path (unix), stdio:."""
    if value.startswith("/"):
        return ControlSpec("unix", path=value)
    kind, sep, rest = value.partition(":")
    if not sep:
        raise ConfigError("-s", f"{value!r}: use udp:HOST:PORT, udp6:, tcp:, unix:/PATH, cunix:/PATH or stdio:")
    kind = kind.lower()
    if kind in ("unix", "cunix"):
        if not rest:
            raise ConfigError("-s", f"{value!r}: a path is required")
        return ControlSpec(kind, path=rest)
    if kind in ("stdio", "stdioc"):
        return ControlSpec("stdio")
    if kind not in ("udp", "udp6", "tcp", "tcp6"):
        raise ConfigError("-s", f"{value!r}: unknown transport {kind!r}")
    version = 6 if kind.endswith("6") else 4
    host, port = _split_host_port(rest, version, "-s")
    return ControlSpec(kind, host=numeric_host(host, "-s", version), port=port or DEFAULT_UDP_PORT)


def _split_host_port(rest: str, version: int, flag: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif version == 6 and _is_ipv6(rest):
        host, port = rest, ""
    else:
        host, _, port = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        if not host and port and not port.isdigit():
            host, port = port, ""
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(flag, f"{rest!r}: port must be 1..65535")
    return host, int(port) if port else 0


def _is_ipv6(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).version == 6
    except ValueError:
        return False


def parse_notify(value: str) -> NotifyTarget:
    """-n value: unix:/path, a bare /path, tcp:HOST:PORT or tcp:%%CC_SELF%%:PORT."""
    if value.startswith("/"):
        return NotifyTarget(f"unix:{value}", "unix", path=value)
    kind, sep, rest = value.partition(":")
    if kind == "unix" and rest:
        return NotifyTarget(value, "unix", path=rest)
    if kind == "tcp" and rest:
        host, port = _split_host_port(rest, 4, "-n")
        if not port:
            raise ConfigError("-n", f"{value!r}: a port is required")
        if host != "%%CC_SELF%%":
            host = numeric_host(host, "-n")
        return NotifyTarget(value, "tcp", host=host, port=port)
    raise ConfigError("-n", f"{value!r}: use unix:/PATH, /PATH, tcp:HOST:PORT or tcp:%%CC_SELF%%:PORT")


def check(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the flag and the fix."""
    if not 1024 <= cfg.min_port <= 65534:
        raise ConfigError("-m", f"{cfg.min_port}: the lowest media port must be 1024..65534")
    if not cfg.min_port < cfg.max_port <= 65535:
        raise ConfigError("-M", f"{cfg.max_port}: must be above -m ({cfg.min_port}) and at most 65535")
    if cfg.max_port - cfg.min_port < 3:
        raise ConfigError("-M", "the port range must hold at least one RTP/RTCP pair")
    if cfg.ttl <= 0 or cfg.setup_ttl <= 0:
        raise ConfigError("-T" if cfg.ttl <= 0 else "-W", "timeouts must be positive seconds")
    if not cfg.control:
        raise ConfigError("-s", "at least one control socket is needed")
    if any(c.kind == "stdio" for c in cfg.control) and not cfg.foreground:
        raise ConfigError("-s", "stdio: needs -f (foreground), as in rtpproxy")
    if cfg.latching not in ("strict", "dynamic", "dynamic-strict"):
        raise ConfigError("--latching", f"{cfg.latching!r}: use strict, dynamic or dynamic-strict")
    if not 1 <= cfg.relatch_packets <= 255:
        raise ConfigError("--relatch-packets", "must be 1..255")
    if not 0 <= cfg.relatch_silence <= 60:
        raise ConfigError("--relatch-silence", "must be 0..60 seconds")
    if not 0 <= cfg.update_window <= 300:
        raise ConfigError("--update-window", "must be 0..300 seconds")
    if not -1 <= cfg.table <= MAX_TABLE:
        raise ConfigError("--table", f"{cfg.table}: use 0..{MAX_TABLE}, or -1 for no table files")
    if not os.path.isabs(cfg.tables_dir):
        raise ConfigError("--tables-dir", f"{cfg.tables_dir!r}: give an absolute path")
    if cfg.kernel_forward_policy not in ("drop", "accept"):
        raise ConfigError("--kernel-forward-policy", "use drop (default) or accept")
    if cfg.kernel and not cfg.nft:
        raise ConfigError("--kernel", "the kernel tier lives in the daemon's nftables table: drop --no-nft")
    if cfg.nft_range_policy not in ("drop", "none"):
        raise ConfigError("--nft-range-policy", "use drop (default) or none")
    if not cfg.nft_table.replace("_", "").replace("-", "").isalnum():
        raise ConfigError("--nft-table", f"{cfg.nft_table!r} is not a valid table name")
    if cfg.workers < 0 or cfg.workers > 256:
        raise ConfigError("--workers", "must be 0 (one per core) to 256")
    if cfg.nofile is not None and cfg.nofile < 64:
        raise ConfigError("-L", "the open-file limit must be at least 64")
    if cfg.pidfile and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.pidfile))):
        raise ConfigError("-p", f"{cfg.pidfile}: the directory does not exist")


def conf_to_argv(text: str, path: str = "rtpproxy.conf") -> list[str]:
    """/etc/rtpproxy/rtpproxy.conf: `option = value` lines naming the long flags (`listen = ...`
    for --listen; `option = yes|no` for switches, which are off unless said otherwise, except
    `nft`). Repeat a line for repeatable flags. The flags then go through the same checks as on
    the command line, which name the option; a line that is not `name = value` is refused here."""
    argv: list[str] = []
    on_by_default = {"nft", "kernel"}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("--config", f"{path}:{n}: expected 'option = value', got {raw.strip()!r}")
        flag = "--" + name.replace("_", "-")
        if value.lower() in ("yes", "true", "on"):
            argv.append(flag)
        elif value.lower() in ("no", "false", "off"):
            if name.replace("_", "-") in on_by_default:
                argv.append("--no-" + name.replace("_", "-"))
        else:
            argv += [flag, value]
    return argv


def conf_values(text: str, path: str = "rtpproxy.conf") -> dict[str, str]:
    """The last value of every option in a conf file (for tools that need a few of them)."""
    argv = conf_to_argv(text, path)
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a[2:]] = argv[i + 1]
    return out
