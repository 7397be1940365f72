"""Multihomed relay hosts, in network namespaces: strict reverse-path filtering eating media on an
asymmetric path (and doctor naming it), and bridging between interfaces and address families."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import rtp_packet, wait_for
from netns import Netns, link
from rtpproxy.config import parse_control
from rtpproxy.control.client import ControlClient

pytestmark = pytest.mark.privileged

PEER_NET, PEER_IP = "198.51.100.0/24", "198.51.100.7"


@pytest.fixture
def hosts():
    made = [Netns("relay"), Netns("caller"), Netns("callee")]
    try:
        yield made
    finally:
        for ns in made:
            ns.delete()


class Daemon:
    def __init__(self, ns: Netns, tmp, *args: str):
        self.ns, self.ctl = ns, f"unix:{tmp}/ctl.sock"
        self.log_path = tmp / "relay.log"
        self.log = open(self.log_path, "wb")
        self.proc = ns.popen([sys.executable, "-m", "rtpproxy", "run", "-F", "-d", "DBUG", "--table", "-1", "-s", self.ctl,
                              "-b", "-m", "42000", "-M", "42099", *args], stdout=self.log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: b"ready:" in self.log_path.read_bytes() or self.proc.poll() is not None, 15)
        assert self.proc.poll() is None, self.log_path.read_text()

    def cmd(self, c: str) -> str:
        return ControlClient(parse_control(self.ctl), timeout=3).send(c)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def udp(ns: Netns, host: str, port: int) -> socket.socket:
    s = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, port))
    s.settimeout(0.3)
    return s


def received(sock: socket.socket, limit: float = 3.0) -> list[tuple[bytes, tuple]]:
    got, end = [], time.monotonic() + limit
    while time.monotonic() < end:
        try:
            data, src = sock.recvfrom(2048)
            got.append((data, src[:2]))
        except TimeoutError:
            break
    return got


def send_rtp(sock: socket.socket, dst, n: int, start: int = 0) -> None:
    for i in range(n):
        sock.sendto(rtp_packet(start + i), dst)
        time.sleep(0.01)


def doctor(ns: Netns, *args: str) -> subprocess.CompletedProcess:
    return ns.run(sys.executable, "-m", "rtpproxy", "doctor", *args, check=False)


def test_strict_rp_filter_on_an_asymmetric_path_is_found_and_fixed(hosts, tmp_path):
    relay, caller, callee = hosts
    r_int, _ = link(relay, "10.1.0.1", caller, "10.1.0.2")
    link(relay, "10.2.0.1", callee, "10.2.0.2")
    caller.run("ip", "addr", "add", f"{PEER_IP}/32", "dev", "lo")        # the caller's public address ...
    caller.run("ip", "route", "add", "default", "via", "10.1.0.1")
    # The peer network sits behind the caller host as behind a router: ARP speaks for the link's
    # own address (otherwise strict filtering refuses the ARP too and nothing is even sent).
    caller.sysctl("net.ipv4.conf.all.arp_announce", "2")
    relay.run("ip", "route", "add", PEER_NET, "via", "10.2.0.2")        # ... routed back the other way
    relay.sysctl("net.ipv4.conf.all.rp_filter", "1")
    relay.sysctl(f"net.ipv4.conf.{r_int}.rp_filter", "1")
    ifaces = ["-l", "internal/10.1.0.1", "-l", "external/10.2.0.1"]
    d = Daemon(relay, tmp_path, *ifaces, "--nft", "--peer", PEER_NET)
    a = udp(caller, PEER_IP, 5000)
    b = udp(callee, "10.2.0.2", 6000)
    try:
        p0 = int(d.cmd(f"UIE asym-1 {PEER_IP} 5000 ft;1").split()[0])
        lr = d.cmd("LIE asym-1 10.2.0.2 6000 ft;1 tt;1").split()
        assert lr[1:] == ["10.1.0.1"]                                          # the caller's side: internal
        p1 = int(lr[0])
        assert "strict reverse-path filtering" in d.log_path.read_text()     # the start-up check said so

        send_rtp(a, ("10.1.0.1", p1), 20)
        assert received(b, 0.5) == []                                         # silently lost

        report = doctor(relay, *ifaces, "--peer", PEER_NET, "-m", "42000", "-M", "42099")
        assert report.returncode == 2, report.stdout
        rpf = next(line for line in report.stdout.splitlines() if "strict reverse-path" in line)
        assert rpf.startswith("ERROR") and r_int in rpf and "10.1.0.1" in rpf
        assert f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{r_int}.rp_filter=2" in rpf
        live = re.search(r"(\d+) packets to media ports failed the reverse-path check", report.stdout)
        assert live and int(live.group(1)) >= 20, report.stdout
        assert '"level": "error"' in doctor(relay, *ifaces, "--peer", PEER_NET, "--json").stdout

        fix = rpf.split("Fix: ", 1)[1]                                        # apply exactly what it says
        relay.run(*fix.split())
        send_rtp(a, ("10.1.0.1", p1), 50, start=20)
        got = received(b)
        assert len(got) == 50 and {src for _, src in got} == {("10.2.0.1", p0)}   # no loss now
        after = doctor(relay, *ifaces, "--peer", PEER_NET, "-m", "42000", "-M", "42099")
        assert "reverse-path filtering loose" in after.stdout
    finally:
        a.close()
        b.close()
        d.stop()


@pytest.mark.parametrize("callee_ip,relay_ip", [("10.2.0.2", "10.2.0.1"), ("fd00:2::2", "fd00:2::1")],
                         ids=["ipv4-ipv4", "ipv4-ipv6"])
def test_bridging_between_interfaces(hosts, tmp_path, callee_ip, relay_ip):
    relay, caller, callee = hosts
    link(relay, "10.1.0.1", caller, "10.1.0.2")
    link(relay, relay_ip, callee, callee_ip, prefix=64 if ":" in relay_ip else 24)
    ext = ["-6", f"external/{relay_ip}"] if ":" in relay_ip else ["-l", f"external/{relay_ip}"]
    d = Daemon(relay, tmp_path, "--no-nft", "-l", "internal/10.1.0.1", *ext)
    v6 = "6" if ":" in callee_ip else ""
    a = udp(caller, "10.1.0.2", 5000)
    b = udp(callee, callee_ip, 6000)
    try:
        u = d.cmd("UIE br-1 10.1.0.2 5000 ft;1").split()                    # offer from the internal caller
        assert u[1:] == ([relay_ip, "6"] if v6 else [relay_ip])              # the callee is told the external side
        p0 = int(u[0])
        lr = d.cmd(f"LIE{v6} br-1 {callee_ip} 6000 ft;1 tt;1").split()
        assert lr[1:] == ["10.1.0.1"]                                       # the caller is told the internal side
        p1 = int(lr[0])
        send_rtp(a, ("10.1.0.1", p1), 20)
        got_b = received(b)
        send_rtp(b, (relay_ip, p0), 20)
        got_a = received(a)
        assert len(got_b) == 20 and {s for _, s in got_b} == {(relay_ip, p0)}      # leaves from the external side
        assert len(got_a) == 20 and {s for _, s in got_a} == {("10.1.0.1", p1)}    # and from the internal side
    finally:
        a.close()
        b.close()
        d.stop()
