"""-l/-6 forms and interface selection (pure)."""
from __future__ import annotations

import pytest

from rtpproxy.config import Bind
from rtpproxy.errors import ConfigError
from rtpproxy.interfaces import by_name_or_address, has_bridge, parse_all, parse_one, select


@pytest.mark.parametrize("value,flag,version,adv,expected", [
    ("192.0.2.1", "-l", 4, None, [Bind("192.0.2.1")]),
    ("*", "-l", 4, None, [Bind("0.0.0.0")]),
    ("192.0.2.1", "-l", 4, "203.0.113.1", [Bind("192.0.2.1", "203.0.113.1")]),
    ("10.0.0.1/192.0.2.1", "-l", 4, "/203.0.113.1",
     [Bind("10.0.0.1", None, "internal"), Bind("192.0.2.1", "203.0.113.1", "external")]),
    ("internal/10.0.0.5", "-l", 4, None, [Bind("10.0.0.5", None, "internal")]),
    ("external/192.0.2.10!203.0.113.10", "-l", 4, None, [Bind("192.0.2.10", "203.0.113.10", "external")]),
    ("pub@192.0.2.10=203.0.113.10", "-l", 4, None, [Bind("192.0.2.10", "203.0.113.10", "pub")]),
    ("v6side/2001:db8::1", "-l", 4, None, [Bind("2001:db8::1", None, "v6side")]),   # named: either family
    ("2001:db8::1/2001:db8::2", "-6", 6, None,
     [Bind("2001:db8::1", None, "internal"), Bind("2001:db8::2", None, "external")]),
])
def test_forms(value, flag, version, adv, expected):
    assert parse_one(value, flag, version, adv) == expected


@pytest.mark.parametrize("value,flag,version", [
    ("2001:db8::1", "-l", 4), ("192.0.2.1", "-6", 6), ("a/b/c", "-l", 4), ("x y/192.0.2.1", "-l", 4),
    ("@192.0.2.1", "-l", 4), ("int/999.1.1.1", "-l", 4),
])
def test_bad_forms_name_the_flag(value, flag, version):
    with pytest.raises(ConfigError) as exc:
        parse_one(value, flag, version)
    assert exc.value.flag in (flag, "-A")


def test_duplicate_names_refused():
    with pytest.raises(ConfigError):
        parse_all(["a/10.0.0.1", "a/10.0.0.2"], "-l", 4, None)


IFACES = [Bind("10.0.0.1", None, "internal"), Bind("192.0.2.1", "203.0.113.1", "external"),
          Bind("2001:db8::1", None, "internal"), Bind("2001:db8::2", None, "external"), Bind("10.9.0.1", None, "lab")]


@pytest.mark.parametrize("want_v6,letter,host", [
    (False, None, "10.0.0.1"), (True, None, "2001:db8::1"),
    (False, "I", "10.0.0.1"), (False, "E", "192.0.2.1"), (True, "E", "2001:db8::2"), (True, "I", "2001:db8::1"),
])
def test_select(want_v6, letter, host):
    assert select(IFACES, want_v6, letter).host == host


def test_select_across_families_by_name():
    mixed = [Bind("10.0.0.1", None, "internal"), Bind("2001:db8::2", None, "external")]
    assert select(mixed, False, "E").host == "2001:db8::2"       # v4 caller, v6 callee: E is the v6 side
    assert select(mixed, True, None).host == "2001:db8::2"
    assert select([Bind("10.0.0.1")], True, None) is None


def test_lookup_and_bridge():
    assert by_name_or_address(IFACES, "{lab}").host == "10.9.0.1"
    assert by_name_or_address(IFACES, "203.0.113.1").host == "192.0.2.1"
    assert by_name_or_address(IFACES, "{nope}") is None
    assert has_bridge(IFACES) and not has_bridge([Bind("10.0.0.1")])
