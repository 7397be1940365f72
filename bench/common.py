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


def host_probe() -> str:
    """How fast and how steady this (virtual) machine is right now: five timings of a fixed loop
    on each core. On a shared VM the host's load moves every number of a run; a report that carries
    this line can be compared with another one (seen here: 0.12 s at rest; 0.15-0.3 s when
    the host was busy, and then both relays' latency tails grew several-fold)."""
    parts = []
    for cpu in sorted(os.sched_getaffinity(0)):
        out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c",
                              "import time\nfor _ in range(5):\n t=time.perf_counter()\n"
                              " x=0\n for i in range(3000000): x+=i\n print(time.perf_counter()-t)"],
                             capture_output=True, text=True, check=True)
        times = sorted(float(t) for t in out.stdout.split())
        parts.append(f"core {cpu} {times[0]:.3f}/{times[2]:.3f}/{times[-1]:.3f} s")
    return "host probe (3M-step Python loop, best/median/worst of 5): " + ", ".join(parts)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads) from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Topology:
    """For the kernel tier: the generator and the relay in two network namespaces joined by a
    veth pair (packets the relay's kernel forwards must arrive from outside it). Every relay of
    that comparison runs in the same topology, so the rows compare like with like."""

    GEN_IP, RELAY_IP = "10.0.9.2", "10.0.9.1"

    def __enter__(self) -> Topology:
        tag = os.urandom(3).hex()
        self.gen, self.relay = f"rpb-gen-{tag}", f"rpb-relay-{tag}"
        for ns in (self.gen, self.relay):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", f"vg{tag}", "netns", self.gen, "type", "veth", "peer", "name", f"vr{tag}",
            "netns", self.relay)
        for ns, dev, ip in ((self.gen, f"vg{tag}", self.GEN_IP), (self.relay, f"vr{tag}", self.RELAY_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.ip_local_reserved_ports=20000-39999"):
            _sh("ip", "netns", "exec", self.relay, "sysctl", "-qw", key)
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.gen, self.relay):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _in_ns(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def _udp_probe(ns: str | None, host: str, port: int, payload: bytes) -> bytes:
    """Send one datagram from inside ns (this thread only, via setns) and return the answer."""
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY) if ns else None
    try:
        if target is not None and libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(payload, (host, port))
            return s.recv(200)
    finally:
        if target is not None:
            libc.setns(own, 0x40000000)
            os.close(target)
        os.close(own)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM a relay and wait; SIGKILL if it hangs (bench must not import tests' helpers)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers_v(ns: str | None, host: str, port: int, tries: int) -> bool:
    """Wait (0.1 s steps) until the relay answers V on its UDP control port."""
    for i in range(tries):
        try:
            if _udp_probe(ns, host, port, f"probe{i} V".encode()).split()[1] == b"20040107":
                return True
        except OSError:
            time.sleep(0.1)
    return False


class OurRelay:
    """Our daemon, pinned to one core, UDP control on loopback (or inside a Topology's relay)."""

    def __init__(self, backend: str = "c", workers: int = 1, cpus: str = "1", extra: tuple[str, ...] = (),
                 ns: str | None = None, host: str = "127.0.0.1"):
        self.port = free_udp_port()
        self.ns, self.host = ns, host
        nft = ("--nft",) if "--kernel" in extra else () if "--nft" in extra else ("--no-nft",)
        self.args = [*_in_ns(ns), "taskset", "-c", cpus, sys.executable, "-m", "rtpproxy", "run", "-F", *nft,
                     "--table", "-1", "-d", "WARN", "-l", host, "-s", f"udp:{host}:{self.port}", "-m", "20000",
                     "-M", "29999", "--backend", backend, "--workers", str(workers), *extra]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> OurRelay:
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE)
        if _answers_v(self.ns, self.host, self.port, 100):
            return self
        raise RuntimeError("relay did not start: " + (self.proc.stderr.read().decode() if self.proc.poll() else ""))

    @property
    def pid(self) -> int:
        """The daemon (taskset and `ip netns exec` exec it, so it keeps the pid)."""
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


def loadgen(port: int, sessions: int, seconds: int, pid: int, cpus: str = "0", no_query: bool = False,
            topology: Topology | None = None, churn: int = 0, churn_rate: int = 0) -> dict:
    host, src = (topology.RELAY_IP, topology.GEN_IP) if topology else ("127.0.0.1", "127.0.0.1")
    cmd = [*_in_ns(topology.gen if topology else None), "taskset", "-c", cpus, str(build("loadgen")),
           "-c", f"{host}:{port}", "-s", src, "-n", str(sessions), "-t", str(seconds), "-p", str(pid)] + \
        (["-q"] if no_query else []) + (["-w", str(churn)] if churn else []) + \
        (["-R", str(churn_rate)] if churn_rate else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


class RtpEngine:
    """Debian's rtpengine, userspace only (--table=-1), legacy protocol on --listen-udp."""

    def __init__(self, threads: int = 1, cpus: str = "1", ns: str | None = None, host: str = "127.0.0.1"):
        self.port = free_udp_port()
        self.ns, self.host = ns, host
        self.args = [*_in_ns(ns), "taskset", "-c", cpus, "rtpengine", "--table=-1", "--no-fallback",
                     f"--interface={host}", f"--listen-udp={host}:{self.port}", "--port-min=30000",
                     "--port-max=39999", f"--num-threads={threads}", "--foreground", "--log-stderr", "--log-level=3"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RtpEngine:
        self.proc = subprocess.Popen(self.args, stderr=subprocess.DEVNULL)
        if _answers_v(self.ns, self.host, self.port, 50):
            return self
        raise RuntimeError("rtpengine did not start")

    @property
    def pid(self) -> int:
        """The daemon itself, not the taskset wrapper (taskset execs, so they are the same)."""
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        _stop(self.proc)
