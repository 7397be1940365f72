"""nftables with real packets: a relay host namespace with the daemon's table loaded, a SIP peer
namespace over veth. Ports open exactly while their call lives; crash leftovers go away."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from conftest import rtp_packet, wait_for
from netns import Netns, NsRelay as _NsRelay, link
from rtpproxy.config import parse_control
from rtpproxy.control.client import ControlClient

pytestmark = pytest.mark.privileged

RELAY_IP, PEER_IP = "10.77.0.1", "10.77.0.2"
LO, HI = 41000, 41009                 # -b: the first call gets 41000, the next 41002, ...
SPARE = 41008                          # a port in the range no call uses in these tests


@pytest.fixture
def hosts():
    relay, peer = Netns("relay"), Netns("peer")
    try:
        link(relay, RELAY_IP, peer, PEER_IP)
        # As `rtpproxy doctor` advises: keep the kernel from handing media ports out as ephemeral
        # ports, which the range drop must otherwise spare.
        relay.sysctl("net.ipv4.ip_local_reserved_ports", f"{LO}-{LO + 4100}")
        yield relay, peer
    finally:
        relay.delete()
        peer.delete()


def NsRelay(ns, tmp, *args):
    return _NsRelay(ns, tmp, RELAY_IP, LO, HI, *args)


def nft_json(ns: Netns, *what: str) -> dict:
    r = ns.run("nft", "-j", "list", *what, check=False)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}


def elements(ns: Netns) -> list[dict]:
    out = []
    for obj in nft_json(ns, "table", "inet", "rtpproxy").get("nftables", []):
        if "set" in obj:
            out += [e["elem"] for e in obj["set"].get("elem", []) if isinstance(e, dict) and "elem" in e]
    return out


def counter(ns: Netns, comment: str) -> int:
    total = 0
    for obj in nft_json(ns, "table", "inet", "rtpproxy").get("nftables", []):
        rule = obj.get("rule")
        if rule and rule.get("comment") == comment:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def arrives(ns_sock, peer_sock, port: int) -> bool:
    """Does a datagram from the peer to RELAY_IP:port reach a socket bound there?"""
    peer_sock.sendto(b"probe", (RELAY_IP, port))
    try:
        ns_sock.recv(100)
        return True
    except TimeoutError:
        return False


def test_ports_open_exactly_while_the_call_lives(hosts, tmp_path):
    relay_ns, peer_ns = hosts
    # A socket on a range port that no call uses: the daemon's table must keep it unreachable.
    spare = relay_ns.socket()
    spare.bind((RELAY_IP, SPARE))
    spare.settimeout(0.3)
    peer = peer_ns.socket()
    peer.bind((PEER_IP, 5000))
    assert arrives(spare, peer, SPARE)                         # control: no firewall yet, it arrives
    relay = NsRelay(relay_ns, tmp_path, "--nft").start()
    try:
        assert not arrives(spare, peer, SPARE)                 # outside any call: dropped
        drops = counter(relay_ns, "rtpproxy: media port outside any call")
        peer.sendto(rtp_packet(1), (RELAY_IP, LO))            # before U: the call's port is closed too
        assert wait_for(lambda: counter(relay_ns, "rtpproxy: media port outside any call") > drops, 3)

        assert relay.cmd(f"U call-7@peer {PEER_IP} 5000 ft;1").split() == [str(LO), RELAY_IP]
        els = elements(relay_ns)
        assert sorted((e["val"]["concat"][1], e["comment"]) for e in els) == \
            [(LO, "call-7@peer"), (LO + 1, "call-7@peer")]
        assert all(80 < e["expires"] <= 90 for e in els)        # timeout: -T 60 + 30 s margin
        for i in range(5):
            peer.sendto(rtp_packet(i), (RELAY_IP, LO))          # reachable: the relay's socket gets them
        assert wait_for(lambda: relay.cmd("Q call-7@peer ft;1").split()[2] == "5", 3), relay.cmd("Q call-7@peer ft;1")
        assert counter(relay_ns, "rtpproxy: live media") >= 5
        assert not arrives(spare, peer, SPARE)                 # still only the call's ports

        assert relay.cmd("D call-7@peer ft") == "0"
        assert wait_for(lambda: elements(relay_ns) == [], 2)    # deleted in nft by the next 0.1 s period
        drops = counter(relay_ns, "rtpproxy: media port outside any call")
        peer.sendto(rtp_packet(9), (RELAY_IP, LO))
        assert wait_for(lambda: counter(relay_ns, "rtpproxy: media port outside any call") > drops, 3)
        status = relay_ns.run(sys.executable, "-m", "rtpproxy", "nft", "status", "-s", relay.ctl, check=False)
        assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr
    finally:
        relay.stop()
        spare.close()
        peer.close()
    assert nft_json(relay_ns, "table", "inet", "rtpproxy") == {}        # clean shutdown removes the table
    assert relay_ns.run("nft", "list", "ruleset").stdout.strip() == ""


def test_sigkill_leftovers_expire_and_are_removed_at_restart(hosts, tmp_path):
    relay_ns, _ = hosts
    relay = NsRelay(relay_ns, tmp_path, "--nft", "-T", "5").start()
    relay.cmd(f"U crash-1 {PEER_IP} 5000 ft;1")
    relay.cmd(f"L crash-1 {PEER_IP} 6000 ft;1 tt;1")
    assert len(elements(relay_ns)) == 4
    relay.stop(signal.SIGKILL)
    left = elements(relay_ns)
    assert len(left) == 4 and all(0 < e["expires"] <= 35 for e in left)    # they expire on their own (-T 5 + 30)
    status = relay_ns.run(sys.executable, "-m", "rtpproxy", "nft", "status", "-s", relay.ctl, check=False)
    assert status.returncode == 1 and "drift" in status.stdout
    relay.start()                                                         # restart: stale state removed first
    try:
        assert elements(relay_ns) == []
        assert relay.cmd(f"U fresh {PEER_IP} 5000 ft;1").split()[0] == str(LO)
        assert [e["comment"] for e in elements(relay_ns)] == ["fresh", "fresh"]
    finally:
        relay.stop()


def test_chain_mode_hooks_into_the_admins_table(hosts, tmp_path):
    relay_ns, peer_ns = hosts
    relay_ns.run("nft", "add table inet filter")
    relay_ns.run("nft", "add chain inet filter input { type filter hook input priority 0; policy drop; }")
    relay = NsRelay(relay_ns, tmp_path, "--nft", "--nft-chain", "inet:filter:input").start()
    peer = peer_ns.socket()
    peer.bind((PEER_IP, 5000))
    try:
        relay.cmd(f"U adm-1 {PEER_IP} 5000 ft;1")
        for i in range(3):
            peer.sendto(rtp_packet(i), (RELAY_IP, LO))      # the admin's policy is drop, our jump lets it in
        assert wait_for(lambda: relay.cmd("Q adm-1 ft;1").split()[2] == "3", 3)
        ruleset = relay_ns.run("nft", "list", "table", "inet", "filter").stdout
        assert "jump rtpproxy" in ruleset and "rtpproxy_media4" in ruleset
    finally:
        relay.stop()
        peer.close()
    ruleset = relay_ns.run("nft", "list", "table", "inet", "filter").stdout
    assert "rtpproxy" not in ruleset and "policy drop" in ruleset          # the admin's table is untouched


def test_thousand_sessions_tracked_exactly(hosts, tmp_path):
    relay_ns, _ = hosts
    relay = NsRelay(relay_ns, tmp_path, "--nft")
    relay.args[relay.args.index("-M") + 1] = str(LO + 4100)
    relay.start()
    try:
        client = ControlClient(parse_control(relay.ctl), timeout=3)
        t0 = time.perf_counter()
        for i in range(1000):
            assert client.send(f"U bulk-{i} {PEER_IP} 5000 ft;1").split()[0].isdigit()
            assert client.send(f"L bulk-{i} {PEER_IP} 6000 ft;1 tt;1").split()[0].isdigit()
        setup = time.perf_counter() - t0
        assert len(elements(relay_ns)) == 4000
        assert relay.cmd("Gv nft_open nft_live nft_missing nft_stale nft_failures") == \
            "nft_open=4000 nft_live=4000 nft_missing=0 nft_stale=0 nft_failures=0"
        for i in range(0, 1000, 2):
            assert client.send(f"D bulk-{i} ft tt") == "0"
        assert wait_for(lambda: len(elements(relay_ns)) == 2000, 2)
        assert relay.cmd("X") == "0"
        assert elements(relay_ns) == []
        print(f"\n2000 U/L with nft over a unix socket (one connection each): {setup:.2f} s")
    finally:
        relay.stop()


def test_range_drop_spares_ports_the_kernel_may_use_as_ephemeral(tmp_path):
    """Without reserved ports, replies to other programs' ephemeral ports inside the media range
    (DNS answers, say) must still get through: the drop leaves those ports out."""
    relay_ns, peer_ns = Netns("relay"), Netns("peer")
    try:
        link(relay_ns, RELAY_IP, peer_ns, PEER_IP)
        relay_ns.sysctl("net.ipv4.ip_local_port_range", f"{LO} {LO + 5}")
        relay = NsRelay(relay_ns, tmp_path, "--nft").start()
        try:
            client = relay_ns.socket()
            client.bind((RELAY_IP, LO + 2))               # a program's ephemeral port in the media range
            client.settimeout(0.5)
            peer = peer_ns.socket()
            peer.bind((PEER_IP, 53))
            peer.sendto(b"answer", (RELAY_IP, LO + 2))
            assert client.recv(100) == b"answer"
            ruleset = relay_ns.run("nft", "list", "table", "inet", "rtpproxy").stdout
            assert f"udp dport != {{ {LO}-{LO + 5} }}" in ruleset or f"!= {LO}-{LO + 5}" in ruleset
            client.close()
            peer.close()
        finally:
            relay.stop()
    finally:
        relay_ns.delete()
        peer_ns.delete()


def test_u_keeps_exactly_cap_net_admin_for_nft(hosts, tmp_path):
    """-u drops root; the daemon keeps CAP_NET_ADMIN alone, so calls still open their ports."""
    relay_ns, _ = hosts
    os.chmod(tmp_path, 0o777)                                  # the control socket is created before the drop
    relay = NsRelay(relay_ns, tmp_path, "--nft", "-u", "nobody").start()
    try:
        status = wait_for(lambda: _status(relay.proc.pid), timeout=5)
        caps = [line for line in status.splitlines() if line.startswith(("Uid:", "CapEff:"))]
        assert caps[0].split()[1] != "0" and caps[1].split()[1] == f"{1 << 12:016x}", caps
        assert relay.cmd(f"U capcall {PEER_IP} 5000 ft;1").split()[0] == str(LO)
        assert [e["comment"] for e in elements(relay_ns)] == ["capcall", "capcall"]
        assert relay.cmd("D capcall ft") == "0"
        assert wait_for(lambda: elements(relay_ns) == [], 2)
        assert "cannot open" not in (tmp_path / "relay.log").read_text()
    finally:
        relay.stop()


def _status(pid: int) -> str:
    """/proc status of the daemon (the python child of `ip netns exec`) once it is no longer root."""
    for child in [pid, *(int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split())]:
        text = open(f"/proc/{child}/status").read()
        uid = next(line for line in text.splitlines() if line.startswith("Uid:")).split()[1]
        if "python" in open(f"/proc/{child}/comm").read() and uid != "0":
            return text
    return ""


def test_new_port_on_another_interface_closes_the_old_holes(hosts, tmp_path):
    """`Un` with `L{label}` moves a side to another address: the old pair's elements must go,
    keyed by the address the old pair was bound to."""
    relay_ns, _ = hosts
    relay_ns.run("ip", "addr", "add", "10.77.0.3/32", "dev", "lo")          # a second local address
    relay = NsRelay(relay_ns, tmp_path, "--nft", "-l", "lab@10.77.0.3").start()
    try:
        first = relay.cmd(f"U move-1 {PEER_IP} 5000 ft;1").split()
        assert first[1] == RELAY_IP
        moved = relay.cmd(f"UnL{{lab}} move-1 {PEER_IP} 5000 ft;1").split()
        assert moved[1] == "10.77.0.3"
        want = [("10.77.0.3", int(moved[0])), ("10.77.0.3", int(moved[0]) + 1)]
        assert wait_for(lambda: sorted((e["val"]["concat"][0], e["val"]["concat"][1])
                                       for e in elements(relay_ns)) == want, 2), elements(relay_ns)
    finally:
        relay.stop()


WRITE_ELEMENTS = """
import sys
from rtpproxy import nftmgr
from rtpproxy.errors import NftError
from rtpproxy.nftmgr import Element, NftLayout
from rtpproxy.nftnl import ElementWriter
layout = NftLayout(min_port=41000, max_port=41009)
nftmgr.Nft().text(nftmgr.setup_text(layout, []))
ElementWriter(layout).add([Element("10.77.0.1", 41000, "call-a@x"), Element("10.77.0.1", 41001, "call-a@x"),
                           Element("fd00::1", 41002, "v6"), Element("0.0.0.0", 41004, "wild"),
                           Element("::", 41006, "x" * 200)])
try:
    ElementWriter(NftLayout(table="nosuch")).add([Element("10.77.0.1", 41000, "c")])
except NftError as exc:
    print(exc)
"""


def test_raw_element_writes_read_back_like_nfts_own(hosts):
    """The per-call open (nftnl.ElementWriter, raw nfnetlink) writes the elements `nft` itself
    would: the right set per family and bind, the call-id comment (cut to nft's limit), the
    timeout; and a refusal names the kernel's reason."""
    relay_ns, _ = hosts
    out = relay_ns.run(sys.executable, "-c", WRITE_ELEMENTS).stdout
    assert "inet nosuch: No such file or directory" in out
    by_set = {}
    for obj in nft_json(relay_ns, "table", "inet", "rtpproxy")["nftables"]:
        if "set" in obj:
            by_set[obj["set"]["name"]] = [e["elem"] for e in obj["set"].get("elem", [])]
    assert sorted((e["val"]["concat"][1], e["comment"]) for e in by_set["media4"]) == \
        [(41000, "call-a@x"), (41001, "call-a@x")]
    assert [(e["val"]["concat"], e["comment"]) for e in by_set["media6"]] == [(["fd00::1", 41002], "v6")]
    assert [(e["val"], e["comment"]) for e in by_set["any4"]] == [(41004, "wild")]
    assert [(e["val"], e["comment"]) for e in by_set["any6"]] == [(41006, "x" * 127)]
    assert all(0 < e["expires"] <= 90 for elems in by_set.values() for e in elems)
    relay_ns.run("nft", "delete", "table", "inet", "rtpproxy")
