"""The kernel tier with real packets: a caller namespace and a callee namespace on either side of
a relay namespace (ip_forward on). After latching, media flows peer to peer through the relay's
NAT maps while the relay's own sockets receive nothing; an attacker is not forwarded; a
re-INVITE to a new address moves the stream; D leaves no map element and no conntrack entry;
and the host forwards nothing that is not a relayed stream."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from conftest import rtp_packet, wait_for
from netns import Netns, NsRelay, link

pytestmark = pytest.mark.privileged

RELAY, CALLER, CALLEE, CALLEE2 = "10.0.1.1", "10.0.1.2", "10.0.2.2", "10.0.2.3"
LO, HI = 42000, 42099


@pytest.fixture
def hosts():
    if shutil.which("conntrack") is None:
        msg = "conntrack is not installed (apt-get install conntrack): these tests list the relay's entries with it"
        if os.environ.get("CI"):
            pytest.fail(msg)                     # CI installs it: missing means .ci/run is broken
        pytest.skip(msg)
    r, c, e = Netns("krelay"), Netns("kcaller"), Netns("kcallee")
    try:
        link(c, CALLER, r, RELAY)
        e_if, _ = link(e, CALLEE, r, "10.0.2.1")
        e.run("ip", "addr", "add", f"{CALLEE2}/24", "dev", e_if)
        c.run("ip", "route", "add", "default", "via", RELAY)
        e.run("ip", "route", "add", "default", "via", "10.0.2.1")
        r.sysctl("net.ipv4.ip_forward", "1")
        r.sysctl("net.ipv4.ip_local_reserved_ports", f"{LO}-{HI}")
        yield r, c, e
    finally:
        for ns in (r, c, e):
            ns.delete()


def sock(ns: Netns, addr):
    s = ns.socket()
    s.bind(addr)
    s.settimeout(0.05)
    return s


def drain(s, wait=0.4) -> list:
    got, end = [], time.monotonic() + wait
    while time.monotonic() < end:
        try:
            data, src = s.recvfrom(4096)
            got.append(src)
            end = time.monotonic() + wait
        except TimeoutError:
            pass
    return got


def talk(pairs, n: int, seq0: int = 0) -> None:
    """Each (socket, destination) sends n RTP packets, 20 ms apart, as a phone would."""
    for i in range(n):
        for k, (s, dst) in enumerate(pairs):
            s.sendto(rtp_packet(seq0 + i, ssrc=0x1000 + k), dst)
        time.sleep(0.02)


def udp_in(ns: Netns) -> int:
    """Datagrams the relay host delivered to its own sockets (/proc/net/snmp, per namespace)."""
    lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("InDatagrams")])


def map_elements(ns: Netns, name: str) -> list:
    r = ns.run("nft", "-j", "list", "map" if not name.startswith("kcount") else "set", "inet", "rtpproxy", name,
               check=False)
    assert r.returncode == 0, r.stderr            # the daemon's table is there while it runs
    for obj in json.loads(r.stdout)["nftables"]:
        for kind in ("map", "set"):
            if kind in obj:
                return obj[kind].get("elem", [])
    return []


def conntrack_ports(ns: Netns) -> str:
    """The relay host's UDP conntrack table, as the conntrack tool lists it (Debian's conntrack)."""
    r = ns.run("conntrack", "-L", "-p", "udp", check=False)
    assert r.returncode == 0, r.stderr            # a missing tool must not pass for an empty table
    return r.stdout


def test_latched_streams_leave_userspace(hosts, tmp_path):
    r_ns, c_ns, e_ns = hosts
    tables = tmp_path / "tables"
    relay = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel", "-T", "4", "--table", "5",
                    "--tables-dir", str(tables)).start()
    try:
        caller, callee = sock(c_ns, (CALLER, 5000)), sock(e_ns, (CALLEE, 6000))
        port_u = int(relay.cmd(f"U kcall {CALLER} 5000 ft").split()[0])     # the callee sends here
        port_l = int(relay.cmd(f"L kcall {CALLEE} 6000 ft tt").split()[0])  # the caller sends here
        assert relay.cmd("I").splitlines()[-1] == "kernel: on"
        # Learning: both parties talk, the relay latches both, the flows go into the kernel.
        talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 10)
        assert len(drain(callee)) == 10 and len(drain(caller)) == 10
        assert wait_for(lambda: len(map_elements(r_ns, "kdnat4")) == 2, timeout=3)   # RTP, one per direction
        assert "media in the kernel" in relay.log_text()
        before = udp_in(r_ns)
        talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 50, seq0=10)
        at_callee, at_caller = drain(callee), drain(caller)
        assert len(at_callee) == 50 and set(at_callee) == {(RELAY, port_u)}        # from the relay's ports
        assert len(at_caller) == 50 and set(at_caller) == {(RELAY, port_l)}
        assert udp_in(r_ns) == before                       # the relay process saw none of them
        # An attacker (another port on the caller's host) is not forwarded: it meets userspace latching.
        attacker = sock(c_ns, (CALLER, 5050))
        talk([(attacker, (RELAY, port_l))], 5)
        assert drain(callee, 0.5) == []
        assert udp_in(r_ns) == before + 5
        # Counters merge the kernel's packets; media through the kernel keeps the call alive past -T 4.
        talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 150, seq0=60)   # 3 s
        drain(callee), drain(caller)
        time.sleep(2.5)                                    # a counter poll
        q = relay.cmd("Q kcall ft tt").split()
        assert int(q[1]) >= 210 and int(q[2]) >= 210, q   # packets from each party, kernel included
        # The table files say where each stream runs. (`ip netns exec` gave the daemon its own mount
        # namespace: read them from there.)
        def table_file(name):
            return r_ns.run("nsenter", "-t", str(relay.proc.pid), "-m", "cat", str(tables / "5" / name)).stdout
        assert "Kernel:      on" in table_file("status")
        block = next(b for b in table_file("list").split("\n\n") if f"local inet4 {RELAY}:{port_l}\n" in b)
        assert "path: kernel" in block and int(block.split(" packets,")[0].rsplit(" ", 1)[1]) >= 210
        # Re-INVITE: the callee moves to a new address; the stream follows it.
        callee2 = sock(e_ns, (CALLEE2, 7000))
        relay.cmd(f"U kcall {CALLER} 5000 ft tt")
        relay.cmd(f"L kcall {CALLEE2} 7000 ft tt")
        talk([(callee2, (RELAY, port_u))], 5, seq0=300)
        assert drain(caller) == [(RELAY, port_l)] * 5     # relayed in userspace, still from the right port
        assert wait_for(lambda: any(CALLEE2 in json.dumps(e) for e in map_elements(r_ns, "kdnat4")), timeout=3)
        talk([(caller, (RELAY, port_l)), (callee2, (RELAY, port_u))], 20, seq0=400)
        assert drain(callee2) == [(RELAY, port_u)] * 20 and drain(callee, 0.3) == []
        assert drain(caller) == [(RELAY, port_l)] * 20
        # D: nothing of the call is left in the maps or in conntrack.
        assert relay.cmd("D kcall ft tt") == "0"
        for name in ("kdnat4", "ksnat4", "kcount4"):
            assert map_elements(r_ns, name) == []
        # (The attacker's refused packets left an ordinary, never-forwarded entry: it expires.)
        call_entries = [ln for ln in conntrack_ports(r_ns).splitlines()
                        if any(f"port={p}" in ln for p in (port_l, port_u)) and "port=5050" not in ln]
        assert call_entries == []
        talk([(caller, (RELAY, port_l))], 3, seq0=500)
        assert drain(callee2, 0.3) == []
    finally:
        relay.stop()


def test_silent_kernel_call_times_out(hosts, tmp_path):
    r_ns, c_ns, e_ns = hosts
    relay = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel", "-T", "3").start()
    try:
        caller, callee = sock(c_ns, (CALLER, 5000)), sock(e_ns, (CALLEE, 6000))
        port_u = int(relay.cmd(f"U tcall {CALLER} 5000 ft").split()[0])
        port_l = int(relay.cmd(f"L tcall {CALLEE} 6000 ft tt").split()[0])
        talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 10)
        assert wait_for(lambda: len(map_elements(r_ns, "kdnat4")) >= 2, timeout=3)
        talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 250)    # 5 s > -T 3, all in the kernel
        assert relay.cmd("Q tcall ft tt").split()[0].isdigit()             # still alive
        assert wait_for(lambda: "timed out" in relay.log_text(), timeout=10)   # silence ends it
        assert map_elements(r_ns, "kdnat4") == []
    finally:
        relay.stop()


def test_the_relay_host_forwards_only_relayed_streams(hosts, tmp_path):
    r_ns, c_ns, e_ns = hosts
    stranger, target = sock(c_ns, (CALLER, 5999)), sock(e_ns, (CALLEE, 6999))
    stranger.sendto(b"direct", (CALLEE, 6999))
    assert len(drain(target)) == 1                        # ip_forward on: the host routes between peers
    relay = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel").start()
    try:
        stranger.sendto(b"direct", (CALLEE, 6999))
        assert drain(target) == []                        # not a relayed stream: dropped
        target.sendto(b"back", (CALLER, 5999))
        assert drain(stranger) == []
    finally:
        relay.stop()
    stranger.sendto(b"direct", (CALLEE, 6999))
    assert len(drain(target)) == 1                        # the table went with the daemon


def test_kernel_required_but_unavailable_fails_start(hosts, tmp_path):
    r_ns, _, _ = hosts
    r_ns.sysctl("net.ipv4.ip_forward", "0")
    relay = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel")
    with pytest.raises(AssertionError):
        relay.start()
    assert relay.proc.wait(10) == 2
    assert "--kernel: net.ipv4.ip_forward is 0" in relay.log_text()
    relay.log.close()
    auto = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft").start()            # default: one warning, runs
    try:
        assert "kernel tier off: net.ipv4.ip_forward is 0" in auto.log_text()
        assert auto.cmd("I").splitlines()[-1].startswith("kernel: off (net.ipv4.ip_forward is 0")
    finally:
        auto.stop()


def test_restart_after_a_crash_stops_the_dead_calls_media(hosts, tmp_path):
    r_ns, c_ns, e_ns = hosts
    relay = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel").start()
    caller, callee = sock(c_ns, (CALLER, 5000)), sock(e_ns, (CALLEE, 6000))
    port_u = int(relay.cmd(f"U ccall {CALLER} 5000 ft").split()[0])
    port_l = int(relay.cmd(f"L ccall {CALLEE} 6000 ft tt").split()[0])
    talk([(caller, (RELAY, port_l)), (callee, (RELAY, port_u))], 10)
    assert wait_for(lambda: len(map_elements(r_ns, "kdnat4")) == 2, timeout=3)
    talk([(caller, (RELAY, port_l))], 5)
    drain(callee)
    relay.stop(signal.SIGKILL)
    talk([(caller, (RELAY, port_l))], 5, seq0=100)
    assert len(drain(callee)) == 5                  # the NAT'ed entry outlives the daemon...
    relay2 = NsRelay(r_ns, tmp_path, RELAY, LO, HI, "--nft", "--kernel").start()
    try:
        talk([(caller, (RELAY, port_l))], 5, seq0=200)
        assert drain(callee) == []                  # ...until the next start deletes it (by its mark)
        assert "mark=1920233584" not in conntrack_ports(r_ns)
    finally:
        relay2.stop()
