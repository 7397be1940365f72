"""Control transports (reference §1.1): udp/udp6 with cookies, the reply cache and replies from
the address the request was sent to; unix (one command per connection); cunix, tcp and stdio
(LF-terminated commands, many per connection)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time
from typing import Awaitable, Callable, Optional

from rtpproxy.config import ControlSpec
from rtpproxy.control import rtpp
from rtpproxy.control.commands import Commands, Context
from rtpproxy.control.rcache import ReplyCache

log = logging.getLogger("rtpproxy.control")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
MAX_DATAGRAM = 8192
MAX_LINE = 8192


class UdpControl:
    """One UDP control socket. Wildcard binds answer from the address the request came to
    (IP_PKTINFO / IPV6_PKTINFO), because Kamailio's socket is connect()ed to that address."""

    def __init__(self, spec: ControlSpec, commands: Commands, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.commands = commands
        self.clock = clock
        self.cache = ReplyCache()
        fam = socket.AF_INET6 if spec.kind == "udp6" else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if fam == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.sock.setblocking(False)
            self.sock.bind((spec.host, spec.port))
        except OSError:
            self.sock.close()
            raise
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def watched_fds(self) -> list[int]:
        """Sockets whose readability means a command is waiting (engine.watch)."""
        return [self.sock.fileno()]

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        for _ in range(64):                      # bounded so media events and timers get their turn
            try:
                data, anc, _flags, peer = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("control recv: %s", exc)
                return
            reply = self.handle(data, peer[0])
            if reply is not None:
                self._send(reply, peer, anc)

    def handle(self, data: bytes, peer_ip: str) -> Optional[bytes]:
        stats = self.commands.svc.stats
        cookie, body = rtpp.split_cookie(data)
        if cookie is None:
            stats.ncmds_rcvd += 1
            stats.ncmds_errs += 1
            return rtpp.frame_reply(None, rtpp.error_body(rtpp.E_PARSE1))
        now = self.clock()
        cached = self.cache.get(cookie, now)
        if cached is not None:
            stats.ncmds_rcvd_ndups += 1
            return cached
        reply = rtpp.frame_reply(cookie, self.commands.execute(body, Context(peer_ip, len(cookie))))
        self.cache.put(cookie, reply, now)
        return reply

    def _send(self, reply: bytes, peer, anc) -> None:
        ancillary = []
        for level, kind, blob in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(blob) >= 12:
                # struct in_pktinfo: reply from ipi_addr (the address the request was sent to)
                ancillary = [(level, kind, struct.pack("=i4s4s", 0, blob[8:12], b"\0" * 4))]
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(blob) >= 20:
                ancillary = [(level, kind, blob[:16] + struct.pack("=i", 0))]
        try:
            self.sock.sendmsg([reply], ancillary, 0, peer)
            self.commands.svc.stats.ncmds_repld += 1
        except OSError as exc:
            log.warning("control reply to %s failed: %s", peer[0], exc)


class StreamControl:
    """unix (one command per connection, as Kamailio uses it), cunix, tcp/tcp6, stdio."""

    def __init__(self, spec: ControlSpec, commands: Commands,
                 on_stdin_eof: Optional[Callable[[], None]] = None):
        self.spec = spec
        self.commands = commands
        self.on_stdin_eof = on_stdin_eof
        self._server: Optional[asyncio.base_events.Server] = None
        self._stdio_task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        k = self.spec.kind
        if k in ("unix", "cunix"):
            if _socket_alive(self.spec.path):
                raise OSError(98, f"{self.spec.path} is in use by a running daemon")
            _remove_stale_socket(self.spec.path)
            handler = self._single if k == "unix" else self._lines
            self._server = await asyncio.start_unix_server(handler, self.spec.path, limit=MAX_LINE)
        elif k in ("tcp", "tcp6"):
            fam = socket.AF_INET6 if k == "tcp6" else socket.AF_INET
            self._server = await asyncio.start_server(self._lines, self.spec.host, self.spec.port,
                                                      family=fam, limit=MAX_LINE, reuse_address=True)
        elif k == "stdio":
            self._stdio_task = asyncio.get_running_loop().create_task(self._stdio())
        else:
            raise ValueError(k)

    def watched_fds(self) -> list[int]:
        """unix mode (Kamailio's): one connection per command, so the listening socket's readability
        is a command arriving. Long-lived cunix/tcp/stdio connections are not watched."""
        if self.spec.kind != "unix" or self._server is None:
            return []
        return [s.fileno() for s in self._server.sockets]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._stdio_task is not None:
            self._stdio_task.cancel()
        if self.spec.kind in ("unix", "cunix"):
            _remove_stale_socket(self.spec.path)

    def _ctx(self, writer: asyncio.StreamWriter) -> Context:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        return Context(ip, 0)

    async def _single(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """rtpproxy's traditional unix mode: one read() is the whole command."""
        try:
            data = await reader.read(MAX_DATAGRAM)
            if data:
                body = self.commands.execute(data, self._ctx(writer))
                writer.write(rtpp.frame_reply(None, body, stream=True))
                await writer.drain()
                self.commands.svc.stats.ncmds_repld += 1
        except OSError as exc:
            log.debug("unix control connection: %s", exc)
        finally:
            writer.close()

    async def _lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve_lines(reader, writer.write, writer.drain, self._ctx(writer))
        writer.close()

    async def _serve_lines(self, reader: asyncio.StreamReader, write: Callable[[bytes], None],
                           drain: Callable[[], Awaitable[None]], ctx: Context) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial                # a last command without LF still counts
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                write(rtpp.frame_reply(None, rtpp.error_body(rtpp.E_PARSE1), stream=True))
                await drain()
                return                            # the stream is out of step: drop the connection
            except OSError:
                return
            if line.strip():
                write(rtpp.frame_reply(None, self.commands.execute(line, ctx), stream=True))
                self.commands.svc.stats.ncmds_repld += 1
                try:
                    await drain()
                except OSError:
                    return

    async def _stdio(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))
        out = os.fdopen(1, "wb", 0)

        def write(b: bytes) -> None:
            out.write(b)

        async def drain() -> None:
            return None

        await self._serve_lines(reader, write, drain, Context("127.0.0.1", 0))
        if self.on_stdin_eof is not None:
            self.on_stdin_eof()


def _socket_alive(path: str) -> bool:
    """Is something accepting connections on this unix socket path?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
