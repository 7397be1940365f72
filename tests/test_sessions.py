"""Session lookup rules (reference §2.11, §2.4) and TTL arithmetic (§5.5)."""
from __future__ import annotations

import pytest

from rtpproxy.sessions import Session, SessionTable, find_stream, medianum, remaining_ttl, tag_prefix_match


@pytest.mark.parametrize("stored,from_tag,to_tag,expected", [
    ("ft;1", "ft;1", None, 0),
    ("ft;1", "ft;1", "tt;1", 0),
    ("ft;1", "tt;1", "ft;1", 1),          # callee's re-INVITE: tags swapped
    ("ft;1", "tt;1", "ft", 1),            # Kamailio's Q: to_tag without ;N, from_tag's ;N applies
    ("ft;2", "tt;1", "ft", -1),           # ... but only with the same medianum
    ("ft;1", "ft", None, -1),             # exact match needed for U/L/P/S/Q/C
    ("ft;1", "xx;1", "yy;1", -1),
    ("ft", "tt", "ft", 1),
])
def test_find_stream(stored, from_tag, to_tag, expected):
    assert find_stream(stored, from_tag, to_tag) == expected


@pytest.mark.parametrize("stored,given,expected", [
    ("ft;1", "ft", True), ("ft;12", "ft", True), ("ft;1", "ft;1", True), ("ft", "ft", True),
    ("ft;1", "f", False), ("ftx;1", "ft", False), ("ft;1;2", "ft", False), ("ft;2", "ft;1", False),
])
def test_prefix_match(stored, given, expected):
    assert tag_prefix_match(stored, given) is expected


def test_medianum():
    assert medianum("abc;3") == "3" and medianum("abc") is None and medianum(";3") is None


def test_table_matching_and_removal():
    t = SessionTable()
    a, b, c = Session("cid", "ft;1", 0), Session("cid", "ft;2", 0), Session("other", "ft;1", 0)
    for s in (a, b, c):
        t.add(s)
    assert len(t) == 3
    assert t.lookup("cid", "ft;2", None) == (b, 0)
    assert t.lookup("cid", "tt;2", "ft") == (b, 1)
    assert [s for s, _ in t.matching("cid", "ft", None)] == [a, b]
    assert t.matching("cid", "tt", "ft") == [(a, 1), (b, 1)]
    t.remove(a)
    assert len(t) == 2 and t.lookup("cid", "ft;1", None) == (None, -1)


def test_ttl_setup_then_established():
    s = Session("cid", "ft;1", created=0.0, last_signal=0.0)
    assert remaining_ttl(s, 3.0, (0.0, 0.0), ttl=60, setup_ttl=5, independent=False) == 2.0
    s.complete = True
    assert remaining_ttl(s, 3.0, (0.0, 0.0), ttl=60, setup_ttl=5, independent=False) == 57.0


def test_ttl_reset_by_media_either_way_or_each_way():
    s = Session("cid", "ft;1", created=0.0, last_signal=0.0, complete=True)
    rx = (50.0, 0.0)                       # only one direction carries media
    assert remaining_ttl(s, 70.0, rx, ttl=60, setup_ttl=60, independent=False) == 40.0
    assert remaining_ttl(s, 70.0, rx, ttl=60, setup_ttl=60, independent=True) == -10.0
