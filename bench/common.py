"""Shared helpers for the benchmark harnesses: build the C tools, start and stop relays, read CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
TICK = os.sysconf("SC_CLK_TCK")


def build(tool: str) -> Path:
    """Compile bench/<tool>.c (not part of the package) if it is missing or older than its source."""
    BUILD.mkdir(exist_ok=True)
    src, out = HERE / f"{tool}.c", BUILD / tool
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads) from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class OurRelay:
    """Our daemon, pinned to one core, UDP control on loopback."""

    def __init__(self, backend: str = "c", workers: int = 1, cpus: str = "1", extra: tuple[str, ...] = ()):
        self.port = free_udp_port()
        self.args = ["taskset", "-c", cpus, sys.executable, "-m", "rtpproxy", "run", "-F", "--no-nft", "--table", "-1", "-d", "WARN",
                     "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{self.port}", "-m", "20000", "-M", "29999",
                     "--backend", backend, "--workers", str(workers), *extra]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> OurRelay:
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE)
        from rtpproxy.config import parse_control  # noqa: PLC0415
        from rtpproxy.control.client import ControlClient  # noqa: PLC0415

        client = ControlClient(parse_control(f"udp:127.0.0.1:{self.port}"), 0.2)
        for _ in range(100):
            try:
                if client.send("V") == "20040107":
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("relay did not start: " + (self.proc.stderr.read().decode() if self.proc.poll() else ""))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def loadgen(port: int, sessions: int, seconds: int, pid: int, cpus: str = "0", no_query: bool = False) -> dict:
    cmd = ["taskset", "-c", cpus, str(build("loadgen")), "-c", f"127.0.0.1:{port}", "-n", str(sessions),
           "-t", str(seconds), "-p", str(pid)] + (["-q"] if no_query else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


class RtpEngine:
    """Debian's rtpengine, userspace only (--table=-1), legacy protocol on --listen-udp."""

    def __init__(self, threads: int = 1, cpus: str = "1"):
        self.port = free_udp_port()
        self.args = ["taskset", "-c", cpus, "rtpengine", "--table=-1", "--no-fallback", "--interface=127.0.0.1",
                     f"--listen-udp=127.0.0.1:{self.port}", "--port-min=30000", "--port-max=39999",
                     f"--num-threads={threads}", "--foreground", "--log-stderr", "--log-level=3"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RtpEngine:
        self.proc = subprocess.Popen(self.args, stderr=subprocess.DEVNULL)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            for i in range(50):
                try:
                    s.sendto(f"probe{i} V".encode(), ("127.0.0.1", self.port))
                    if s.recv(100).split()[1] == b"20040107":
                        return self
                except OSError:
                    time.sleep(0.1)
        raise RuntimeError("rtpengine did not start")

    @property
    def pid(self) -> int:
        """The daemon itself, not the taskset wrapper (taskset execs, so they are the same)."""
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
