"""Command line: `rtpproxy run` (also sippy rtpproxy's bare flags), `ctl`, `version`.

Written for typer 0.7 (Debian 12) and later: parameters use typer.Option defaults,
never Annotated. Domain errors become exit codes here: 2 for bad flags or config,
1 for runtime failures.
"""
from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import resource
import sys
from typing import List, Optional

import typer

from rtpproxy import __version__
from rtpproxy.config import (
    DEFAULT_CONTROL,
    DEFAULT_TABLES_DIR,
    Config,
    check,
    conf_to_argv,
    parse_control,
    parse_notify,
)
from rtpproxy.errors import ConfigError, RtpproxyError
from rtpproxy.interfaces import parse_all
from rtpproxy.nftmgr import parse_admin_chain
from rtpproxy.syscheck import validate_peers

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Media relay for SIP platforms, speaking the rtpproxy control protocol.")

LEVELS = {"DBUG": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
          "WARNING": logging.WARNING, "ERR": logging.ERROR, "ERROR": logging.ERROR, "CRIT": logging.CRITICAL}


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"rtpproxy: error: {message}", err=True)
    raise typer.Exit(code)


def build_config(listen, listen6, advertised, control, min_port, max_port, ttl, setup_ttl, independent_ttl,
                 notify, pidfile, user, force_root, foreground, debug, nofile, sequential, tos,
                 backend, workers, update_window=10.0, nft=True, nft_table="rtpproxy", nft_chain=None,
                 nft_required=False, nft_range_policy="drop", latching="dynamic", relatch_packets=3,
                 relatch_silence=0.2, ssrc_lock=False, peers=(), strict_checks=False, table=0,
                 tables_dir=DEFAULT_TABLES_DIR, kernel=None, kernel_forward_policy="drop") -> Config:
    cfg = Config()
    cfg.interfaces = parse_all(listen or [], "-l", 4, advertised) + \
        parse_all(listen6 or [], "-6", 6, None if listen else advertised)
    if not cfg.interfaces:
        cfg.interfaces = parse_all(["*"], "-l", 4, advertised)
    cfg.control = [parse_control(c) for c in (control or [DEFAULT_CONTROL])]
    cfg.notify = [parse_notify(n) for n in (notify or [])]
    cfg.min_port, cfg.max_port = min_port, max_port
    cfg.ttl = ttl
    cfg.setup_ttl = setup_ttl if setup_ttl is not None else ttl
    cfg.independent_ttl = independent_ttl
    cfg.update_window = update_window
    cfg.latching, cfg.relatch_packets, cfg.relatch_silence, cfg.ssrc_lock = (latching, relatch_packets,
                                                                             relatch_silence, ssrc_lock)
    cfg.pidfile = pidfile
    if user:
        cfg.user, _, grp = user.partition(":")
        cfg.group = grp or None
    cfg.force_root = force_root
    cfg.foreground = foreground
    level, _, facility = (debug or "INFO").partition(":")
    if level.upper() not in LEVELS:
        raise ConfigError("-d", f"{level!r}: use DBUG, INFO, WARN, ERR or CRIT (optionally :FACILITY)")
    cfg.log_level = level.upper()
    cfg.log_facility = facility or "daemon"
    cfg.nofile = nofile
    cfg.sequential_ports = sequential
    try:
        cfg.tos = int(tos, 0)
    except ValueError:
        raise ConfigError("-t", f"{tos!r} is not a number (e.g. 0xb8)") from None
    if not 0 <= cfg.tos <= 255:
        raise ConfigError("-t", "TOS must be 0..255")
    cfg.nft, cfg.nft_table, cfg.nft_required, cfg.nft_range_policy = nft, nft_table, nft_required, nft_range_policy
    if nft_chain:
        try:
            cfg.nft_chain = parse_admin_chain(nft_chain)
        except ValueError as exc:
            raise ConfigError("--nft-chain", f"{nft_chain!r}: {exc}") from None
    try:
        cfg.peers = validate_peers(peers or [])
    except ValueError as exc:
        raise ConfigError("--peer", str(exc)) from None
    cfg.strict_checks = strict_checks
    cfg.table, cfg.tables_dir = table, tables_dir
    cfg.kernel, cfg.kernel_forward_policy = kernel, kernel_forward_policy
    cfg.backend = backend
    cfg.workers = workers
    check(cfg)
    if os.geteuid() == 0 and not cfg.user and not cfg.force_root and \
            any(c.kind in ("udp", "udp6") for c in cfg.control):
        raise ConfigError("-u", "running as root with a UDP control socket is refused (as rtpproxy does): "
                                "give -u USER[:GROUP] to drop privileges, or -F to run as root anyway")
    return cfg


def setup_logging(cfg: Config) -> None:
    root = logging.getLogger("rtpproxy")
    root.setLevel(LEVELS[cfg.log_level])
    root.handlers.clear()
    if cfg.foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).4s %(name)s: %(message)s"))
    else:
        facility = logging.handlers.SysLogHandler.facility_names.get(cfg.log_facility.lower())
        if facility is None:
            raise ConfigError("-d", f"unknown syslog facility {cfg.log_facility!r}")
        handler = logging.handlers.SysLogHandler("/dev/log", facility=facility)
        handler.setFormatter(logging.Formatter("rtpproxy[%(process)d]: %(message)s"))
    root.addHandler(handler)


def _daemonize() -> int:
    """Fork into the background as rtpproxy does without -f. The parent waits until the child
    is serving (exit 0) or failed (exit 1), so init scripts see start-up errors. Returns the
    write end of the readiness pipe in the child."""
    rfd, wfd = os.pipe()
    if os.fork() > 0:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            status = r.read()
        if status.startswith(b"ok"):
            os._exit(0)
        sys.stderr.write(status.decode(errors="replace") or "rtpproxy: failed to start\n")
        os._exit(1)
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    return wfd


@app.command()
def run(
    listen: Optional[List[str]] = typer.Option(None, "-l", "--listen", help="Media address, repeatable: ADDR ('*' = any), INTERNAL/EXTERNAL (bridge), NAME/ADDR[!ADVERTISED], LABEL@ADDR[=ADVERTISED]."),
    listen6: Optional[List[str]] = typer.Option(None, "-6", "--listen6", help="IPv6 media address, repeatable; same forms as -l."),
    advertised: Optional[str] = typer.Option(None, "-A", "--advertise", help="Address(es) shown in U/L replies: ADV or ADV1/ADV2."),
    control: Optional[List[str]] = typer.Option(None, "-s", "--control", help=f"Control socket, repeatable: udp:HOST:PORT, udp6:, tcp:, unix:/PATH, cunix:/PATH, stdio:. Default {DEFAULT_CONTROL}."),
    min_port: int = typer.Option(35000, "-m", "--min-port", help="Lowest media port."),
    max_port: int = typer.Option(65000, "-M", "--max-port", help="Highest media port."),
    ttl: int = typer.Option(60, "-T", "--ttl", help="Seconds without media before an established session ends."),
    setup_ttl: Optional[int] = typer.Option(None, "-W", "--setup-ttl", help="Same, before the answer (L) arrived. Default: -T."),
    independent_ttl: bool = typer.Option(False, "-i", "--independent-ttl", help="Each direction needs its own media to stay alive."),
    notify: Optional[List[str]] = typer.Option(None, "-n", "--notify", help="Allowed timeout-notification target, repeatable: unix:/PATH or tcp:HOST:PORT."),
    pidfile: Optional[str] = typer.Option(None, "-p", "--pidfile", help="Write the process id here; removed on exit."),
    user: Optional[str] = typer.Option(None, "-u", "--user", help="Drop privileges to USER[:GROUP] once sockets are open."),
    force_root: bool = typer.Option(False, "-F", "--force-root", help="Allow running as root with a UDP control socket."),
    foreground: bool = typer.Option(False, "-f", "--foreground", help="Stay in the foreground (always so for 'run')."),
    debug: Optional[str] = typer.Option(None, "-d", "--debug", help="Log level DBUG|INFO|WARN|ERR|CRIT[:syslog facility]."),
    nofile: Optional[int] = typer.Option(None, "-L", "--nofile", help="Raise the open-file limit to this."),
    sequential: bool = typer.Option(False, "-b", "--sequential-ports", help="Allocate ports in order instead of at random."),
    tos: str = typer.Option("0xb8", "-t", "--tos", help="IP TOS/traffic class of media packets."),
    backend: str = typer.Option("auto", "--backend", help="Media engine: auto (C when built), c, or py."),
    workers: int = typer.Option(0, "--workers", help="C engine worker threads; 0 = one per core."),
    update_window: float = typer.Option(10.0, "--update-window", help="Seconds after a U/L in which a latched stream may move to a new source (rtpproxy: 10)."),
    latching: str = typer.Option("dynamic", "--latching", help="strict | dynamic | dynamic-strict: which sources a stream accepts (per call: modifier Js, Jd, Jx)."),
    relatch_packets: int = typer.Option(3, "--relatch-packets", help="Consecutive packets (one SSRC, sequential) a new source needs to take over a latched stream."),
    relatch_silence: float = typer.Option(0.2, "--relatch-silence", help="... and the latched source must have been silent this many seconds."),
    ssrc_lock: bool = typer.Option(False, "--ssrc-lock", help="Drop RTP with another SSRC from the latched source until re-negotiation (per call: modifier K)."),
    peer: Optional[List[str]] = typer.Option(None, "--peer", help="Network media comes from (repeatable): the start-up checks probe routes to it."),
    strict_checks: bool = typer.Option(False, "--strict-checks", help="Refuse to start when the host checks (rtpproxy doctor) find errors."),
    nft: bool = typer.Option(True, "--nft/--no-nft", help="Open exactly the live calls' media ports in nftables (needs CAP_NET_ADMIN)."),
    nft_table: str = typer.Option("rtpproxy", "--nft-table", help="Name of the daemon's own table (inet family)."),
    nft_chain: Optional[str] = typer.Option(None, "--nft-chain", help="inet:TABLE:CHAIN of your own ruleset to hook into instead of a standalone table (e.g. inet:filter:input)."),
    nft_required: bool = typer.Option(False, "--nft-required", help="Refuse a call (E72/E71) when its ports cannot be opened in nftables."),
    nft_range_policy: str = typer.Option("drop", "--nft-range-policy", help="drop: drop media-range packets outside live calls; none: leave them to your rules."),
    kernel: Optional[bool] = typer.Option(None, "--kernel/--no-kernel", help="Forward latched streams in the kernel (nftables NAT + conntrack). Default: where the host supports it; --kernel makes it required."),
    kernel_forward_policy: str = typer.Option("drop", "--kernel-forward-policy", help="drop: with the kernel tier, forward nothing but relayed streams; accept: leave other forwarded traffic to your rules (hosts that route on purpose)."),
    table: int = typer.Option(0, "--table", help="Forwarding table this daemon owns, shown as files under --tables-dir; -1: no table files."),
    tables_dir: str = typer.Option(DEFAULT_TABLES_DIR, "--tables-dir", help="Where the table files are mounted (FUSE; needs CAP_SYS_ADMIN to mount)."),
    legacy: bool = typer.Option(False, "--legacy-invocation", hidden=True),
    config: Optional[str] = typer.Option(None, "--config", help="Options file (/etc/rtpproxy/rtpproxy.conf): `option = value` lines, the long flag names; read in place of this flag."),
) -> None:
    """Run the relay. Without a subcommand, rtpproxy takes the same flags and, like sippy's
    rtpproxy, goes to the background unless -f is given."""
    try:
        cfg = build_config(listen, listen6, advertised, control, min_port, max_port, ttl, setup_ttl,
                           independent_ttl, notify, pidfile, user, force_root, foreground or not legacy,
                           debug, nofile, sequential, tos, backend, workers, update_window, nft, nft_table,
                           nft_chain, nft_required, nft_range_policy, latching, relatch_packets, relatch_silence,
                           ssrc_lock, peer, strict_checks, table, tables_dir, kernel, kernel_forward_policy)
        setup_logging(cfg)
        if cfg.nofile:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (cfg.nofile, cfg.nofile))
            except (ValueError, OSError) as exc:
                raise ConfigError("-L", f"cannot raise the open-file limit to {cfg.nofile}: {exc}") from None
    except ConfigError as exc:
        fail(str(exc))
    from rtpproxy.daemon import Daemon  # noqa: PLC0415 - keeps `rtpproxy ctl` start-up light

    ready_fd = None if cfg.foreground else _daemonize()

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
            os.dup2(os.open(os.devnull, os.O_RDWR), 2)

    try:
        code = asyncio.run(Daemon(cfg, on_ready=ready).run())
    except ConfigError as exc:
        _report(ready_fd, str(exc))
        raise typer.Exit(2) from None
    except (RtpproxyError, OSError) as exc:
        _report(ready_fd, f"cannot start: {exc}")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _report(ready_fd: Optional[int], message: str) -> None:
    logging.getLogger("rtpproxy").error("%s", message)
    if ready_fd is not None:
        try:
            os.write(ready_fd, f"rtpproxy: error: {message}\n".encode())
        except OSError:
            pass
    else:
        typer.echo(f"rtpproxy: error: {message}", err=True)


@app.command()
def ctl(
    command: List[str] = typer.Argument(..., help="The command and its arguments, e.g. V or VF 20050322."),
    control: str = typer.Option(DEFAULT_CONTROL, "-s", "--control", help="Control socket of the daemon."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds to wait for the reply."),
) -> None:
    """Send one control command to a running daemon and print the reply."""
    from rtpproxy.control.client import ControlClient  # noqa: PLC0415

    try:
        spec = parse_control(control)
        reply = ControlClient(spec, timeout).send(" ".join(command))
    except ConfigError as exc:
        fail(str(exc))
    except (OSError, TimeoutError) as exc:
        fail(f"no reply from {control}: {exc}", 1)
    typer.echo(reply)
    if reply.startswith("E") and reply[1:].isdigit():
        raise typer.Exit(1) from None


@app.command()
def version() -> None:
    """Print the version, the protocol version and the media engine in use."""
    from rtpproxy.relay import c_engine_available  # noqa: PLC0415

    why = c_engine_available()
    typer.echo(f"rtpproxy {__version__} (control protocol 20040107, engine: {'c' if why is None else 'py — ' + why})")


def _add_subapps() -> None:
    from rtpproxy.doctorcli import doctor  # noqa: PLC0415
    from rtpproxy.nftcli import app as nft_app  # noqa: PLC0415
    from rtpproxy.tablescli import app as tables_app  # noqa: PLC0415

    app.add_typer(nft_app, name="nft")
    app.add_typer(tables_app, name="tables")
    app.command()(doctor)


LEGACY_INFO = {"-V", "-v", "-C"}


def _expand_config(args: List[str]) -> List[str]:
    """`--config FILE` anywhere after the subcommand: its options go in its place, so flags given
    after it on the command line win (typer keeps the last value of a single-valued flag)."""
    if not args or args[0] != "run" or "--config" not in args[1:]:
        return args
    i = args.index("--config", 1)
    if i + 1 >= len(args):
        _exit_config("a file name is required")
    path = args[i + 1]
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        _exit_config(f"cannot read {path}: {exc.strerror}")
    try:
        return args[:i] + conf_to_argv(text, path) + args[i + 2:]
    except ConfigError as exc:
        _exit_config(str(exc).removeprefix("--config: "))


def _exit_config(message: str) -> None:
    """Errors found before typer runs (it is typer that turns Exit into a status)."""
    sys.stderr.write(f"rtpproxy: error: --config: {message}\n")
    sys.exit(2)


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0] in LEGACY_INFO:
        from rtpproxy.control.commands import CAPABILITIES  # noqa: PLC0415

        if args[0] == "-V":
            typer.echo(__version__)
        elif args[0] == "-v":
            typer.echo("Basic version: 20040107")
            for date in sorted(CAPABILITIES - {"20040107"}):
                typer.echo(f"Extension {date}")
        else:
            typer.echo("CLOCK_MONOTONIC")
        return
    if args and args[0].startswith("-") and args[0] not in ("--help", "-h"):
        args = ["run", "--legacy-invocation", *args]       # sippy-style: flags without a subcommand
    args = _expand_config(args)
    _add_subapps()
    app(args=args, prog_name="rtpproxy")
