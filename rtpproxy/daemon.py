"""Wiring only: loop, engine, control endpoints, signals, pidfile, privileges, shutdown."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from typing import Callable, Optional

from rtpproxy import syscheck
from rtpproxy.config import Config
from rtpproxy.control.commands import Commands
from rtpproxy.control.transports import StreamControl, UdpControl
from rtpproxy.errors import ConfigError, NftError
from rtpproxy.notify import Notifier
from rtpproxy.relay import open_engine
from rtpproxy.service import MediaService

log = logging.getLogger("rtpproxy")

TICK_S = 1.0
PERIOD_S = 0.1         # deferred work (timeouts, closing sockets, adoption) is looked at this often


def _sd_notify(message: str) -> None:
    """systemd's readiness protocol, spoken directly (no python3-systemd needed)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), path)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


CAP_NET_ADMIN = 12
PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def limit_capabilities(keep_net_admin: bool) -> None:
    """Keep CAP_NET_ADMIN (so nftables can still be updated as the unprivileged user) or nothing.
    After setuid with PR_SET_KEEPCAPS, or as a systemd User= service started with ambient
    capabilities: CAP_SYS_ADMIN was only needed to mount the table files."""
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    data[0].effective = data[0].permitted = (1 << CAP_NET_ADMIN) if keep_net_admin else 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: limiting capabilities after start-up")


def drop_privileges(user: str, group: Optional[str], keep_net_admin: bool = False) -> None:
    import ctypes
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("-u", f"no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("-u", f"no such group {group!r}") from None
    if keep_net_admin:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    if keep_net_admin:
        limit_capabilities(True)


class Daemon:
    def __init__(self, cfg: Config, on_ready: Optional[Callable[[], None]] = None):
        self.cfg = cfg
        self.on_ready = on_ready
        self.stop_event: Optional[asyncio.Event] = None
        self.service: Optional[MediaService] = None

    def request_stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    def _drain(self) -> None:
        """SIGHUP: rtpproxy's 'deorbiting burn': refuse new sessions, exit when the last one ends."""
        assert self.service is not None
        log.warning("SIGHUP: refusing new sessions, exiting when the %d active ones end",
                    len(self.service.sessions))
        self.service.draining = True
        if not len(self.service.sessions):
            self.request_stop()

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        engine = open_engine(cfg.backend, cfg.workers, cfg.max_streams)
        notifier = Notifier()
        svc = MediaService(cfg, engine, on_timeout=lambda s: notifier.notify(*s.notify))
        self.service = svc
        firewall = None
        commands = Commands(cfg, svc)
        udp: list[UdpControl] = []
        streams: list[StreamControl] = []
        ticker: Optional[asyncio.Task] = None
        tables = table_mount = None
        pid_written = False
        try:
            if cfg.nft:
                firewall = svc.firewall = self._firewall(svc)
            else:
                svc.kernel_state = "off (--no-nft)"
            self._host_checks(firewall)
            only_stdio = all(c.kind == "stdio" for c in cfg.control)
            for spec in cfg.control:
                if spec.kind in ("udp", "udp6"):
                    u = UdpControl(spec, commands)
                    udp.append(u)
                else:
                    sc = StreamControl(spec, commands, on_stdin_eof=self._drain if only_stdio else None)
                    await sc.start()
                    streams.append(sc)
            engine.start(loop, svc.on_events)
            for u in udp:
                u.start(loop)
            for fd in [fd for c in (*udp, *streams) for fd in c.watched_fds()]:
                engine.watch(fd)                   # a worker sharing our core yields it to a command
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._drain)
            ticker = loop.create_task(self._tick(svc))
            if cfg.table >= 0:
                tables, table_mount = self._table_files(svc, loop)
            if cfg.pidfile:
                with open(cfg.pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
                pid_written = True
            if cfg.user:
                drop_privileges(cfg.user, cfg.group, keep_net_admin=firewall is not None)
            elif os.getuid() != 0 and syscheck.effective_capabilities():
                limit_capabilities(firewall is not None)     # a User= service: drop what start-up needed
            log.info("ready: %s engine (%d worker%s), control %s, media %s, ports %d-%d",
                     engine.name, getattr(engine, "workers", 1), "s" if getattr(engine, "workers", 1) > 1 else "",
                     ", ".join(str(c) for c in cfg.control),
                     ", ".join((f"{b.name}/" if b.name else "") + b.host + (f"!{b.advertised}" if b.advertised else "")
                               for b in cfg.interfaces),
                     cfg.min_port, cfg.max_port)
            # Everything alive now (modules, the CLI's and nft's objects) lives as long as we do: keep
            # it out of every later collection, which otherwise scans it on each full pass
            # (traced: a full pass held the control thread ~35 ms at 1000 calls).
            gc.collect()
            gc.freeze()
            _sd_notify("READY=1")
            if self.on_ready:
                self.on_ready()
            await self.stop_event.wait()
            _sd_notify("STOPPING=1")
            log.info("shutting down")
            return 0
        finally:
            if ticker is not None:
                ticker.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for u in udp:
                u.close()
            for sc in streams:
                await sc.close()
            if table_mount is not None:
                await loop.run_in_executor(None, table_mount.stop)   # file operations still run meanwhile
            if tables is not None:
                tables.close()
            svc.destroy_all("shut down")
            engine.close()
            if firewall is not None:
                try:
                    firewall.teardown()
                except NftError as exc:
                    log.error("nft: teardown failed, run `rtpproxy nft teardown`: %s", exc)
            await notifier.close()
            if pid_written:
                try:
                    os.unlink(cfg.pidfile)
                except OSError as exc:
                    log.warning("cannot remove pidfile %s: %s", cfg.pidfile, exc)

    def _firewall(self, svc: MediaService):
        """The nft table, with the kernel tier's maps and chains when it can run here. --kernel
        makes every reason it cannot a start-up error; by default it is one warning."""
        from rtpproxy import kernel  # noqa: PLC0415
        from rtpproxy.firewall import MediaFirewall  # noqa: PLC0415

        cfg = self.cfg
        reason = "--no-kernel" if cfg.kernel is False else kernel.kernel_reason(syscheck.forwarding(), True)
        firewall = None
        if reason is None:
            try:
                firewall = MediaFirewall(cfg.nft_layout(kernel=True), required=cfg.nft_required)
                firewall.setup()
                svc.kernel = kernel.open_tier(firewall.layout, firewall.nft)
                svc.kernel_state = "on"
                log.info("kernel tier on: latched streams are forwarded by nftables NAT")
                if cfg.kernel_forward_policy == "drop":
                    # ip_forward is on: say loudly that this host forwards nothing else while we run.
                    log.warning("kernel tier: forwarded traffic that is not a relayed stream is dropped while "
                                "rtpproxy runs; if this host routes on purpose, use --kernel-forward-policy "
                                "accept (or --no-kernel)")
            except (NftError, OSError) as exc:
                reason = f"the kernel tier cannot be set up: {exc}"
                svc.kernel = None
        if reason is not None:
            if cfg.kernel:
                raise ConfigError("--kernel", f"{reason} (or run without --kernel)")
            if cfg.kernel is None:
                log.warning("kernel tier off: %s; rtpproxy doctor explains", reason)
            svc.kernel_state = f"off ({reason})"
            firewall = MediaFirewall(cfg.nft_layout(), required=cfg.nft_required)
            firewall.setup()                   # one transaction: all of it or nothing
        return firewall

    def _table_files(self, svc: MediaService, loop):
        """Own table --table and serve its files; without FUSE, say why once and run on."""
        from rtpproxy.tablectl import TableMount, TableUnavailable  # noqa: PLC0415
        from rtpproxy.tablefmt import TableError  # noqa: PLC0415
        from rtpproxy.tables import Tables, claim  # noqa: PLC0415

        cfg = self.cfg
        try:
            lock = claim(cfg.table)
        except TableError as exc:
            raise ConfigError("--table", f"{exc}: choose another with --table N, or --table -1 for none") from None
        tables = Tables(cfg.table, svc, lock=lock)
        mount = TableMount(tables, loop, cfg.tables_dir)
        try:
            mount.mount()
        except TableUnavailable as exc:
            log.warning("table files off: %s", exc)
            return tables, None
        log.info("table %d: files at %s", cfg.table, cfg.tables_dir)
        return tables, mount

    def _host_checks(self, firewall) -> None:
        """rtpproxy doctor's checks at start: logged; fatal with --strict-checks."""
        cfg = self.cfg
        findings = syscheck.evaluate(syscheck.gather(cfg.interfaces, cfg.peers), cfg.min_port, cfg.max_port,
                                     len(cfg.interfaces), cfg.kernel)
        for f in findings:
            if f.level == "error":
                log.error("check: %s", f.line())
            elif f.level == "warn":
                log.warning("check: %s", f.line())
        if cfg.strict_checks and syscheck.exit_code(findings) == 2:
            raise ConfigError("--strict-checks", "the host checks found errors (see above, or run rtpproxy doctor)")

    async def _tick(self, svc: MediaService) -> None:
        steps = round(TICK_S / PERIOD_S)
        n = 0
        while True:
            await asyncio.sleep(PERIOD_S)
            n += 1
            try:
                svc.new_period()
                if n % steps == 0:
                    svc.tick()
                # Slices with the loop's I/O in between: a command waits for a slice, not a batch.
                while svc.background_slice():
                    await asyncio.sleep(0)
            except Exception:                      # a bug in one tick must not stop timeouts for good
                log.exception("timer tick failed")
            if n % steps == 0 and svc.draining and not len(svc.sessions):
                self.request_stop()
