"""Protocol transcripts against a real daemon, over every transport, for both backends.

Vectors come from reference/rtpp-protocol.md (§2, §3, §7) and from rtpproxy's documented
behaviour; each line is (command, expected reply)."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from conftest import Relay, free_port

PARSE_VECTORS = [
    ("V", "20040107"),
    ("v", "20040107"),
    ("VF 20050322", "1"),
    ("Vf 20081102", "1"),
    ("VF 20040107", "1"),
    ("VF 20081224", "0"),              # no -n: notification capability is off
    ("VF 20071116", "0"),              # no re-packetization
    ("VF 20191015", "0"),              # no sub-commands
    ("VF 19990101", "0"),
    ("VF", "E1"),
    ("Vfx 20050322", "E2"),
    ("V extra", "E1"),
    ("Vx", "E2"),
    ("X extra", "E1"),
    ("Xw", "E2"),
    ("Z", "E0"),
    ("K a b c", "E0"),
    ("U cid 1.2.3.4", "E1"),
    ("U a b c d e f g h", "E1"),
    ("L cid 1.2.3.4 5 t1 t2 t3", "E1"),
    ("D cid", "E1"),
    ("Sx cid ft", "E2"),
    ("D cid ft && X", "E3"),
    ("Dx cid ft", "E8"),
    ("Gx", "E9"),
    ("G nosuchcounter", "E68"),
    ("G", ""),
    ("Ix", "E18"),
    ("I extra", "E1"),
    ("Qx cid ft", "E19"),
    ("Q nosuch ft", "E50"),
    ("D nosuch ft", "E50"),
    ("S nosuch ft", "E50"),
    ("P1 nosuch prompt session ft", "E50"),
    ("Px nosuch prompt session ft", "E17"),
    ("R nosuch ft", "E50"),
    ("Rp cid ft", "E6"),
    ("Rx cid ft", "E7"),
    ("Cx cid target ft", "E7"),
    ("C nosuch udp:127.0.0.1:9 ft", "E50"),
    ("N cid ft", "E50"),
    ("Nax cid ft", "E6"),
    ("Nx cid ft", "E7"),
    ("L nosuch 1.2.3.4 5000 ft tt", "0"),     # L never creates: 0, not an error
    ("Ue cid 1.2.3.4 5000 ft", "E11"),        # no bridge configured
    ("Ui cid 1.2.3.4 5000 ft", "E12"),
    ("UZ0 cid 1.2.3.4 5000 ft", "E13"),
    ("UZ1000 cid 1.2.3.4 5000 ft", "E13"),
    ("UC cid 1.2.3.4 5000 ft", "E14"),
    ("Uc0c8 cid 1.2.3.4 5000 ft", "E14"),
    ("UL cid 1.2.3.4 5000 ft", "E15"),
    ("UL1.2.3.400 cid 1.2.3.4 5000 ft", "E15"),
    ("UR cid 1.2.3.4 5000 ft", "E16"),
    ("UL10.9.8.7 cid 1.2.3.4 5000 ft", "E31"),  # not one of our addresses
    ("U4 cid 1.2.3.4 5000 ft", "E35"),        # '4' does not exist in rtpproxy
    ("Uq cid 1.2.3.4 5000 ft", "E35"),
    ("U6 cid ::1 5000 ft", "E36"),            # no IPv6 address configured
    ("U cid 999.1.2.3 5000 ft", "E37"),
    ("U cid 1.2.3.4 port ft", "E37"),
    ("U cid 1.2.3.4 5000 ft sock tag", "E75"),  # notify without -n
    ("U cid 1.2.3.4 5000 ft tt sock tag", "E75"),
]


@pytest.fixture(scope="module", params=["c", "py"])
def relay(request, tmp_path_factory):
    r = Relay(["-b", "-s", f"cunix:{tmp_path_factory.mktemp('c')}/cunix.sock",
               "-s", f"tcp:127.0.0.1:{free_port(socket.SOCK_STREAM)}",
               "-s", f"udp6:[::1]:{free_port(family=socket.AF_INET6, host='::1')}"],
              request.param, tmp_path_factory.mktemp("relay"))
    r.start()
    yield r
    r.stop()


def _spec(relay: Relay, kind: str) -> str:
    for i, a in enumerate(relay.args):
        if a == "-s" and relay.args[i + 1].startswith(kind + ":"):
            return relay.args[i + 1]
    raise KeyError(kind)


@pytest.mark.parametrize("transport", ["udp", "udp6", "unix", "cunix", "tcp"])
@pytest.mark.parametrize("command,expected", PARSE_VECTORS)
def test_vector(relay, transport, command, expected):
    assert relay.client(_spec(relay, transport)).send(command) == expected
    assert relay.alive()


def test_udp_cookie_framing_and_reply_cache(relay):
    port = relay.udp_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))

        def ask(data: bytes) -> bytes:
            s.send(data)
            return s.recv(2048)

        assert ask(b"k1 V") == b"k1 20040107\n"
        assert ask(b"k2 VF 20050322") == b"k2 1\n"
        assert ask(b"k3") == b"k3 E5\n"                   # cookie only
        assert ask(b"") == b"E5\n"                         # empty datagram: no cookie
        assert ask(b"  \t k4   V  \r\n") == b"k4 20040107\n"
        assert ask(b"k5 V\0") == b"k5 E5\n"                # NUL inside a token
        assert ask(b"k6 " + b" ".join([b"Q"] + [b"a"] * 23)) == b"k6 E5\n"   # 24 tokens
        # A reused cookie within 35 s gets the cached reply and the command is not run again.
        assert ask(b"rc1 Uc0 cachecall 127.0.0.1 4000 ft;1").split()[1].isdigit()
        assert ask(b"rc1 X") == ask(b"rc1 V")
        assert relay.cmd("Q cachecall ft;1") != "E50"      # X was not executed
        assert relay.cmd("D cachecall ft") == "0"


def test_retransmission_from_another_port_gets_cached_reply(relay):
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b:
        a.settimeout(2)
        b.settimeout(2)
        a.sendto(b"dup_1 U dupcall 127.0.0.1 4000 ft", ("127.0.0.1", relay.udp_port))
        first = a.recv(100)
        b.sendto(b"dup_1 U dupcall 127.0.0.1 4000 ft", ("127.0.0.1", relay.udp_port))
        assert b.recv(100) == first
    assert relay.cmd("G ncmds_rcvd_ndups") != "0"
    assert relay.cmd("D dupcall ft") == "0"


def test_unix_mode_is_one_command_per_connection(relay):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(relay.unix_path)
        s.sendall(b"V")                                     # Kamailio writes no LF
        assert s.recv(100) == b"20040107\n"
        assert s.recv(100) == b""                           # then the server closes


def test_stream_transports_take_many_commands(relay):
    path = _spec(relay, "cunix")[len("cunix:"):]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"V\nVF 20081224\nVF 20050322\n")
        buf = b""
        while buf.count(b"\n") < 3:
            buf += s.recv(100)
        assert buf == b"20040107\n0\n1\n"


def test_kamailio_happy_path(relay):
    """Reference §7.5, with the ports this relay hands out (-b: sequential from -m)."""
    cid = "a84b4c76e66710@pc33"
    u = relay.cmd(f"Uc0,8,101 {cid} 198.51.100.7 49170 1928301774;1")
    p0 = int(u.split()[0])
    assert u == f"{p0} 127.0.0.1"
    l_reply = relay.cmd(f"Lc0,8 {cid} 203.0.113.9 3456 1928301774;1 a6c85cf;1")
    p1 = int(l_reply.split()[0])
    assert l_reply == f"{p1} 127.0.0.1" and p1 != p0 and p0 % 2 == 0 and p1 % 2 == 0
    assert relay.cmd(f"Uc0,8,101 {cid} 198.51.100.7 49170 1928301774;1 a6c85cf;1") == u   # caller re-INVITE
    assert relay.cmd(f"Uc0,8 {cid} 203.0.113.9 3456 a6c85cf;1 1928301774;1") == l_reply   # callee re-INVITE
    q = relay.cmd(f"Q {cid} 1928301774;1 a6c85cf").split()
    assert len(q) == 5 and int(q[0]) in (59, 60) and q[1:] == ["0", "0", "0", "0"]
    assert re.fullmatch(r"ttl=\d+ npkts_ina=0 npkts_ino=0 nrelayed=0 ndropped=0",
                        relay.cmd(f"Qv {cid} 1928301774;1 a6c85cf"))
    assert relay.cmd(f"Q {cid} 1928301774;1 a6c85cf nrelayed ttl") .split()[0] == "0"
    assert relay.cmd(f"Qv {cid} 1928301774;1 a6c85cf rtpa_jmax") == "rtpa_jmax=0.000000"
    assert relay.cmd(f"Q {cid} 1928301774;1 a6c85cf bogus") == "E62"
    assert relay.cmd(f"P1 {cid} /nonexistent session 1928301774;1 a6c85cf;1") == "E60"
    assert relay.cmd(f"S {cid} 1928301774;1 a6c85cf;1") == "0"
    assert relay.cmd(f"R {cid} 1928301774 a6c85cf") == "E50"
    assert relay.cmd(f"C {cid} udp:127.0.0.1:9 1928301774;1 a6c85cf;1") == "E65"
    assert relay.cmd(f"D {cid} 1928301774 a6c85cf") == "0"
    assert relay.cmd(f"D {cid} 1928301774 a6c85cf") == "E50"
    assert relay.cmd(f"L {cid} 203.0.113.9 3456 1928301774;1 a6c85cf;1") == "0"


def test_play_session_without_codecs_is_e35(relay):
    relay.cmd("U nocodec 198.51.100.7 4000 ft;1")
    assert relay.cmd("P1 nocodec /x session ft;1") == "E35"
    relay.cmd("Uc0 nocodec 198.51.100.7 4000 ft;1")
    assert relay.cmd("P1 nocodec /x session ft;1") == "E60"
    assert relay.cmd("P0 nocodec /x session ft;1") == "0"
    assert relay.cmd("D nocodec ft") == "0"


def test_delete_prefix_matching_covers_every_medianum(relay):
    for n in (1, 2, 3):
        relay.cmd(f"U mcall 198.51.100.7 {4000 + 2 * n} ft;{n}")
    assert relay.cmd("D mcall ft;2") == "0"                 # only that one
    assert relay.cmd("Q mcall ft;2") == "E50"
    assert relay.cmd("Q mcall ft;1") != "E50"
    assert relay.cmd("D mcall ft") == "0"                   # every remaining medianum
    assert relay.cmd("Q mcall ft;1") == "E50" and relay.cmd("Q mcall ft;3") == "E50"
    # D with the tags swapped (BYE from the callee) finds the session through its to_tag
    relay.cmd("U swcall 198.51.100.7 4000 ft;1")
    assert relay.cmd("D swcall tt ft") == "0"
    assert relay.cmd("Q swcall ft;1") == "E50"


def test_weak_and_strong(relay):
    relay.cmd("UW wcall 198.51.100.7 4000 ft;1")
    relay.cmd("U wcall 198.51.100.7 4000 ft;1")            # strong too
    assert relay.cmd("D wcall ft") == "0"                   # clears strong; weak keeps it alive
    assert relay.cmd("Q wcall ft;1") != "E50"
    assert relay.cmd("Dw wcall ft") == "0"
    assert relay.cmd("Q wcall ft;1") == "E50"


def test_new_port_modifier(relay):
    first = relay.cmd("U ncall 198.51.100.7 4000 ft;1").split()[0]
    assert relay.cmd("U ncall 198.51.100.7 4000 ft;1").split()[0] == first
    second = relay.cmd("Un ncall 198.51.100.7 4000 ft;1").split()[0]
    assert second != first
    assert relay.cmd("D ncall ft") == "0"


def test_info_and_stats(relay):
    relay.cmd("X")
    relay.cmd("U icall 198.51.100.7 4000 ft;1")
    info = relay.cmd("Il")
    assert "active sessions: 1" in info and "active streams: 2" in info
    assert re.search(r"average load: \d+\.\d{6}", info)
    assert relay.cmd("Ib").startswith("sessions created: ")
    g = relay.cmd("Gv nsess_created nsess_destroyed npkts_rcvd")
    assert re.fullmatch(r"nsess_created=\d+ nsess_destroyed=\d+ npkts_rcvd=\d+", g)
    assert relay.cmd("X") == "0"
    assert "active sessions: 0" in relay.cmd("I")


def test_stdio_transport(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rtpproxy", "run", "-f", "--no-nft", "--table", "-1", "-s", "stdio:", "-l", "127.0.0.1", "-m", "45000",
         "-M", "45100", "--backend", "py"],
        input=b"V\nVF 20081224\nbogus\n", capture_output=True, timeout=20)
    assert proc.stdout == b"20040107\n0\nE0\n"
    assert proc.returncode == 0                              # EOF on stdin: drain and exit
