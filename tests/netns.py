"""Network namespaces for privileged tests: hosts made of `ip netns` + veth pairs.

Sockets are opened inside a namespace by switching only the calling thread there (setns) for
the duration of the socket() call; a socket stays in the namespace it was created in."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from conftest import stop_process
from rtpproxy.config import parse_control
from rtpproxy.control.client import ControlClient

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@contextlib.contextmanager
def entered(name: str):
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


class Netns:
    def __init__(self, role: str):
        self.name = f"rpt-{role}-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def socket(self, family=socket.AF_INET, kind=socket.SOCK_DGRAM) -> socket.socket:
        with entered(self.name):
            return socket.socket(family, kind)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def link(a: Netns, a_ip: str, b: Netns, b_ip: str, prefix: int = 24) -> tuple[str, str]:
    """A veth pair between a and b with the given addresses; returns the interface names."""
    tag = uuid.uuid4().hex[:5]
    ia, ib = f"va{tag}", f"vb{tag}"
    sh("ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib, "netns", b.name)
    for ns, iface, ip in ((a, ia, a_ip), (b, ib, b_ip)):
        fam = "-6" if ":" in ip else "-4"
        ns.run("ip", fam, "addr", "add", f"{ip}/{prefix}", "dev", iface, *(["nodad"] if ":" in ip else []))
        ns.run("ip", "link", "set", iface, "up")
    return ia, ib


class NsRelay:
    """The daemon run inside a namespace, controlled over a unix socket in tmp."""

    def __init__(self, ns: Netns, tmp, relay_ip: str, lo: int, hi: int, *args: str):
        self.ns, self.tmp = ns, tmp
        self.ctl = f"unix:{tmp}/ctl.sock"
        self.args = ["-F", "-f", "-d", "DBUG", "--table", "-1", "-l", relay_ip, "-s", self.ctl, "-b", "-m", str(lo),
                     "-M", str(hi), *args]
        self.proc = None

    def start(self) -> NsRelay:
        (self.tmp / "ctl.sock").unlink(missing_ok=True)
        path = self.tmp / "relay.log"
        self.log = open(path, "ab")
        seen = path.stat().st_size                        # a restart appends: look past the old run
        self.proc = self.ns.popen([sys.executable, "-m", "rtpproxy", "run", *self.args], stdout=self.log,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while b"ready:" not in path.read_bytes()[seen:] and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.proc.poll() is None, path.read_text()
        return self

    def cmd(self, c: str) -> str:
        return ControlClient(parse_control(self.ctl), timeout=3).send(c)

    def log_text(self) -> str:
        return (self.tmp / "relay.log").read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc:
            stop_process(self.proc, sig)
        self.log.close()
