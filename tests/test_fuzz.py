"""Bad input never crashes the daemon: thousands of random and truncated commands each get an
E code or a documented reply, and the relay keeps serving."""
from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Relay

VALID = [
    "Uc0,8,101 cid{n} 198.51.100.7 49170 ft{n};1",
    "L cid{n} 203.0.113.9 3456 ft{n};1 tt;1",
    "UAZ20c0,8 cid{n} 198.51.100.7 49170 ft{n};1 tt;1",
    "U6 cid{n} ::1 4000 ft{n};1",
    "D cid{n} ft{n} tt",
    "Dw cid{n} ft{n}",
    "Qv cid{n} ft{n};1 tt ttl nrelayed",
    "P3 cid{n} prompt session ft{n};1",
    "S cid{n} ft{n};1",
    "Rs cid{n} ft{n}",
    "C cid{n} udp:127.0.0.1:9 ft{n}",
    "Na cid{n} ft{n}",
    "Gv nsess_created ncmds_rcvd",
    "Ibl",
    "VF 20081102",
    "U cid{n} 198.51.100.7 49170 ft{n};1 tt;1 /tmp/x t%41g",
]

# Every body the protocol documents: E<n>; a port with an optional address (and 6); plain numbers,
# name=value lists and I's lines.
# (the last form is I/G text; I's `kernel: off (reason)` line brings parentheses, dashes, slashes)
REPLY = re.compile(r"(E\d{1,2}|\d+( [0-9a-f.:]+( 6)?)?|[0-9a-z_=. \n:(),/+-]*)")

TOKENS = st.sampled_from(["U", "L", "D", "Q", "P", "S", "R", "C", "N", "V", "VF", "I", "G", "X", "Uc0", "Lw",
                          "U6", "UL127.0.0.1", "UR127.0.0.1", "Z", "&&", "cid", "ft;1", "tt;1", "1.2.3.4",
                          "::1", "0.0.0.0", "65536", "-1", "0", "49170", "%zz", "session", "ttl", "",
                          "\t", "\r\n"])
COMMANDS = st.one_of(
    st.lists(TOKENS, max_size=30).map(lambda t: " ".join(t).encode()),
    st.binary(max_size=300),
    st.tuples(st.sampled_from(VALID), st.integers(0, 5), st.integers(0, 200)).map(
        lambda v: v[0].format(n=v[1]).encode()[:v[2]]),      # truncated valid commands
)


@pytest.fixture(scope="module", params=["c", "py"])
def relay(request, tmp_path_factory):
    r = Relay(["-6", "::1", "-l", "127.0.0.1", "-n", "unix:/tmp/x"], request.param, tmp_path_factory.mktemp("f"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def udp(relay):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(("127.0.0.1", relay.udp_port))
    yield s
    s.close()


_seq = iter(range(10**9))


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=COMMANDS)
def test_udp_garbage_gets_a_documented_reply(relay, udp, body):
    cookie = f"fz{next(_seq)}"
    udp.send(cookie.encode() + b" " + body)
    reply = udp.recv(4096)
    assert reply.startswith(cookie.encode() + b" ") and reply.endswith(b"\n")
    text = reply[len(cookie) + 1:-1].decode("latin-1")
    assert REPLY.fullmatch(text), text


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=COMMANDS)
def test_unix_garbage_gets_a_documented_reply(relay, body):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(relay.unix_path)
        s.sendall(body or b" ")
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.endswith(b"\n") and REPLY.fullmatch(reply[:-1].decode("latin-1"))


def test_still_serving_after_the_storm(relay):
    assert relay.alive()
    assert relay.cmd("V") == "20040107"
    assert relay.cmd("X") == "0"
    assert "Traceback" not in relay.log()
