"""Shared fixtures: a real daemon in a subprocess, control clients, RTP peers on loopback."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from rtpproxy.config import parse_control
from rtpproxy.control.client import ControlClient
from rtpproxy.relay import c_engine_available

IS_ROOT = os.geteuid() == 0

BACKENDS = ["c", "py"]


def pytest_collection_modifyitems(config, items):
    skip_priv = pytest.mark.skip(reason="needs root / CAP_NET_ADMIN (network namespaces, nft): run as root or in CI")
    for item in items:
        if "privileged" in item.keywords and not IS_ROOT:
            item.add_marker(skip_priv)


def free_port(kind=socket.SOCK_DGRAM, family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(size: int = 40) -> int:
    """A base port P such that P..P+size is free for UDP on loopback right now."""
    for base in range(40000, 60000, 200):
        socks = []
        try:
            for p in range(base, base + size + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal a daemon and wait for it; SIGKILL if it is still there after timeout."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Relay:
    """A daemon started as a subprocess with the given flags."""

    def __init__(self, args: list[str], backend: str = "c", tmp: Optional[Path] = None):
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="rtpproxy-test-"))
        self.udp_port = free_port()
        self.min_port = free_port_range(60)
        self.max_port = self.min_port + 59
        self.unix_path = str(self.tmp / "ctl.sock")
        self.args = ["-F", "-f", "-d", "DBUG", *([] if "--nft" in args else ["--no-nft"]),
                     *([] if any(a.startswith("--table") for a in args) else ["--table", "-1"]), "-s", f"udp:127.0.0.1:{self.udp_port}", "-s",
                     f"unix:{self.unix_path}", "-m", str(self.min_port), "-M", str(self.max_port),
                     "--backend", backend, *args]
        if not any(a in ("-l", "-6") for a in args):
            self.args += ["-l", "127.0.0.1"]
        self.log_path = self.tmp / "relay.log"
        self.backend = backend
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> Relay:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "rtpproxy", "run", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            if b"ready:" in self.log_path.read_bytes():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"relay did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, spec: Optional[str] = None) -> ControlClient:
        return ControlClient(parse_control(spec or f"udp:127.0.0.1:{self.udp_port}"), timeout=3)

    def cmd(self, command: str) -> str:
        return self.client().send(command)

    def stop(self) -> int:
        if self.proc:
            stop_process(self.proc)
        self._log.close()
        return self.proc.returncode if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def make_relay(tmp_path):
    relays: list[Relay] = []

    def make(*args: str, backend: str = "c") -> Relay:
        if backend == "c" and c_engine_available() is not None:
            pytest.fail(f"C engine not built: {c_engine_available()}")
        r = Relay(list(args), backend, tmp_path / f"r{len(relays)}")
        r.tmp.mkdir(parents=True, exist_ok=True)
        relays.append(r)
        return r.start()

    yield make
    for r in relays:
        r.stop()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def rtp_packet(seq: int, ssrc: int = 0x11223344, ts: int = 0, payload: bytes = b"\xd5" * 160,
               pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


class Peer:
    """A media endpoint on loopback (or any local address)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)
        self.addr = self.sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.addr[1]

    def send(self, data: bytes, to) -> None:
        self.sock.sendto(data, to)

    def drain(self, wait: float = 0.3, limit: float = 5.0) -> list[tuple[bytes, tuple]]:
        """Everything that arrives until `wait` seconds pass without a packet (at most `limit` s)."""
        got = []
        end = time.monotonic() + limit
        deadline = min(end, time.monotonic() + wait)
        while time.monotonic() < deadline:
            try:
                data, src = self.sock.recvfrom(4096)
                got.append((data, src[:2]))
                deadline = min(end, time.monotonic() + wait)
            except TimeoutError:
                pass
        return got

    def flush(self) -> int:
        """Discard what is queued now, without waiting; returns how many packets."""
        n = 0
        self.sock.setblocking(False)
        try:
            while n < 100_000:
                self.sock.recv(4096)
                n += 1
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.05)
        return n

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(host: str = "127.0.0.1") -> Peer:
        p = Peer(host)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can another program bind this UDP port (has the relay let go of its socket)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    return predicate()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class Talker:
    """A party sending RTP at 50 packets/s (20 ms ptime) from its own socket until stopped."""

    def __init__(self, peer: Peer, dst: tuple, ssrc: int, start_seq: int = 0):
        import threading

        self.peer, self.dst, self.ssrc, self.seq = peer, dst, ssrc, start_seq
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Talker:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.peer.send(rtp_packet(self.seq, self.ssrc), self.dst)
            self.seq, self.sent = self.seq + 1, self.sent + 1
            next_t += 0.02
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def ssrc_of(packet: bytes) -> int:
    return struct.unpack("!I", packet[8:12])[0]
