"""End to end with the real clients: Debian's kamailio (rtpproxy module, rtpproxy_manage) between
two sipp instances. The UAC streams G.711 with rtp_stream, the UAS echoes it (-rtp_echo).

Asserts, per call: media went through the relay both ways (the relay's own per-call counters),
no media went directly between the SIP endpoints (a tcpdump capture on loopback), and the
sessions are gone after BYE."""
from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for

CALLS = 4
TALK_MS = 3000
PTIME_PACKETS = TALK_MS // 20                    # packets one direction of one call carries

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
HERE = Path(__file__).parent


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        msg = f"{tool} is not installed (apt-get install kamailio sip-tester tcpdump)"
        if os.environ.get("CI"):
            pytest.fail(msg)                     # CI installs them: missing means .ci/run is broken
        pytest.skip(msg)


def _ulaw_tone(seconds: float) -> bytes:
    def enc(x: int) -> int:
        sign = 0x80 if x < 0 else 0
        x = min(abs(x), 32635) + 0x84
        exp, mask = 7, 0x4000
        while exp and not x & mask:
            exp, mask = exp - 1, mask >> 1
        return ~(sign | exp << 4 | (x >> (exp + 3)) & 0x0F) & 0xFF
    return bytes(enc(int(8000 * math.sin(2 * math.pi * 440 * i / 8000))) for i in range(int(8000 * seconds)))


def _even_free_port() -> int:
    for _ in range(100):
        p = free_port()
        if p % 2 == 0 and p < 65000:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no even port pair")


@pytest.mark.parametrize("backend", ["c", "py"])
def test_calls_through_kamailio(make_relay, backend, tmp_path):
    for tool in ("kamailio", "sipp", "tcpdump"):
        _need(tool)
    relay = make_relay(backend=backend)
    sip_port, uas_port, uac_port = (free_port() for _ in range(3))
    uas_media, uac_media = _even_free_port(), _even_free_port()

    (tmp_path / "audio.raw").write_bytes(_ulaw_tone(TALK_MS / 1000 + 1))
    cfg = (HERE / "e2e/kamailio.cfg.in").read_text()
    for k, v in {"@SIP_PORT@": sip_port, "@MODULES@": MODULES, "@UAS_PORT@": uas_port,
                 "@RTPPROXY_SOCK@": f"udp:127.0.0.1:{relay.udp_port}"}.items():
        cfg = cfg.replace(k, str(v))
    (tmp_path / "kamailio.cfg").write_text(cfg)
    scenario = (HERE / "e2e/uac_rtp.xml.in").read_text()
    scenario = scenario.replace("@AUDIO@", str(tmp_path / "audio.raw")).replace("@TALK_MS@", str(TALK_MS))
    (tmp_path / "uac.xml").write_text(scenario)

    procs: list[subprocess.Popen] = []
    capture = tmp_path / "media.pcap"
    try:
        procs.append(subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-U", "-w", str(capture),
             f"udp and (port {uas_media} or port {uac_media})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        kam_log = open(tmp_path / "kamailio.log", "wb")
        procs.append(subprocess.Popen(["kamailio", "-f", str(tmp_path / "kamailio.cfg"), "-DD", "-E",
                                       "-w", str(tmp_path)], stdout=kam_log, stderr=subprocess.STDOUT))
        # Kamailio probes the relay at start-up (V, VF 20050322, VF 20071116, VF 20081102)
        assert wait_for(_kamailio_probed(relay), timeout=10), "kamailio never probed the relay"
        uas = subprocess.Popen(["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(uas_port), "-rtp_echo",
                                "-mp", str(uas_media), "-nostdin", "-timeout", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        procs.append(uas)
        time.sleep(0.5)
        uac = subprocess.run(["sipp", f"127.0.0.1:{sip_port}", "-sf", str(tmp_path / "uac.xml"),
                              "-i", "127.0.0.1", "-p", str(uac_port), "-mp", str(uac_media),
                              "-m", str(CALLS), "-r", str(CALLS), "-l", str(CALLS), "-timeout", "40",
                              "-nostdin", "-trace_err"],
                             capture_output=True, timeout=60, cwd=tmp_path)
        assert uac.returncode == 0, uac.stdout.decode(errors="replace")[-3000:]
        time.sleep(0.5)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    log = relay.log()
    # Every call's media went through the relay both ways, and its session ended with the BYE.
    deleted = re.findall(r"\[(\S+)\] deleted, tag \S+; rtp from caller (\d+) in/(\d+) relayed/\d+ dropped, "
                         r"from callee (\d+) in/(\d+) relayed", log)
    assert len(deleted) == CALLS, log
    for cid, c_in, c_rel, e_in, e_rel in deleted:
        assert int(c_in) >= PTIME_PACKETS - 5 and int(c_rel) == int(c_in), (cid, log)
        assert int(e_in) >= PTIME_PACKETS - 10 and int(e_rel) == int(e_in), (cid, log)
    assert "active sessions: 0" in relay.cmd("I")

    # No packet went straight between the two sipp media ports.
    dump = subprocess.run(["tcpdump", "-n", "-r", str(capture)], capture_output=True, text=True).stdout
    flows = re.findall(r"127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+):", dump)
    assert len(flows) >= CALLS * PTIME_PACKETS * 3              # caller->relay, relay->callee, and back
    endpoints = {str(uas_media), str(uac_media)}
    direct = [f for f in flows if set(f) <= endpoints]
    assert direct == []
    relay_ports = {int(p) for f in flows for p in f if p not in endpoints}
    assert all(relay.min_port <= p <= relay.max_port for p in relay_ports)


def _kamailio_probed(relay):
    """A predicate: have at least the 4 start-up probes arrived, not counting our own G queries?"""
    base = int(relay.cmd("G ncmds_rcvd"))
    ours = [1]

    def probed() -> bool:
        n = int(relay.cmd("G ncmds_rcvd"))
        ours[0] += 1
        return n - base - ours[0] >= 4
    return probed
