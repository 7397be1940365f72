"""A blocking client for the legacy protocol, as Kamailio speaks it: used by `rtpproxy ctl`,
the tests and the benchmark."""
from __future__ import annotations

import itertools
import os
import secrets
import socket

from rtpproxy.config import ControlSpec


# Cookies must never repeat within the server's 35 s reply cache, across client objects too.
_COOKIES = itertools.count(1)
_PREFIX = f"{os.getpid()}_{secrets.token_hex(3)}"


class ControlClient:
    def __init__(self, spec: ControlSpec, timeout: float = 2.0):
        self.spec = spec
        self.timeout = timeout

    def send(self, command: str) -> str:
        """Send one command; return the reply body without cookie or trailing LF."""
        k = self.spec.kind
        if k in ("udp", "udp6"):
            return self._udp(command)
        if k == "unix":
            return self._stream(socket.AF_UNIX, self.spec.path, command.encode("latin-1"))
        if k == "cunix":
            return self._stream(socket.AF_UNIX, self.spec.path, command.encode("latin-1") + b"\n")
        if k in ("tcp", "tcp6"):
            fam = socket.AF_INET6 if k == "tcp6" else socket.AF_INET
            return self._stream(fam, (self.spec.host, self.spec.port), command.encode("latin-1") + b"\n")
        raise ValueError(f"cannot send to a {k} control socket")

    def _udp(self, command: str) -> str:
        fam = socket.AF_INET6 if self.spec.kind == "udp6" else socket.AF_INET
        host = self.spec.host
        if host in ("0.0.0.0", "::"):
            host = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
        cookie = f"{_PREFIX}_{next(_COOKIES)}"
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(self.timeout)
            s.connect((host, self.spec.port))
            s.send(f"{cookie} {command}".encode("latin-1"))
            while True:
                data = s.recv(65536).decode("latin-1")
                got, _, body = data.partition(" ")
                if got == cookie:
                    return body.rstrip("\n")

    def _stream(self, fam: int, addr, payload: bytes) -> str:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(addr)
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if self.spec.kind == "unix":
                    continue                 # unix mode: the server closes after the reply
            return buf.decode("latin-1").rstrip("\n")
