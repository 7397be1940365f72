"""The C/Python contract: the extension's ABI version and struct layouts match relay.h."""
from __future__ import annotations

import pytest

from rtpproxy.relay import c_engine_available

pytestmark = pytest.mark.skipif(c_engine_available() is not None, reason="C engine not built")


def test_abi_version_matches():
    from rtpproxy import _relay
    assert _relay.lib.rp_abi_version() == _relay.lib.RP_ABI_VERSION == 5


def test_layouts():
    """Any change here must bump RP_ABI_VERSION in relay.h."""
    from rtpproxy._relay import ffi
    assert ffi.sizeof("struct rp_addr") == 20
    assert ffi.sizeof("struct rp_stream") == 72
    assert ffi.offsetof("struct rp_stream", "forward_until_ns") == 64
    assert ffi.offsetof("struct rp_stream", "lock_ssrc") == 56
    assert ffi.offsetof("struct rp_stream", "relatch_packets") == 60
    assert ffi.offsetof("struct rp_stream", "latched") == 8
    assert ffi.offsetof("struct rp_stream", "dst") == 28
    assert ffi.offsetof("struct rp_stream", "gen") == 48
    assert ffi.sizeof("struct rp_counters") == 56
    assert ffi.offsetof("struct rp_counters", "last_rx_ns") == 40
    assert ffi.sizeof("struct rp_event") == 48
    assert ffi.offsetof("struct rp_event", "src") == 20
    assert ffi.offsetof("struct rp_event", "ts_ns") == 40
    assert ffi.sizeof("struct rp_worker_stats") == 56
