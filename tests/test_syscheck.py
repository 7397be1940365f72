"""The doctor's verdicts from host facts (pure): every finding names what, why and the fix."""
from __future__ import annotations

import json

from rtpproxy.syscheck import Facts, RouteProbe, evaluate, exit_code, to_json

CLEAN = dict(interfaces={"10.1.0.1": "eth1"}, rp_filter={"all": 0, "eth1": 2}, local_port_range=(32768, 34999),
             nofile=70000, rmem_max=4 << 20)


def run(**over):
    facts = Facts(**{**CLEAN, **over})
    return evaluate(facts, 35000, 65000, 1)


def by(findings, check):
    return [f for f in findings if f.check == check]


def test_clean_host():
    findings = run()
    assert exit_code(findings) == 0
    assert all(f.level in ("ok", "info") for f in findings)


def test_strict_rp_filter_is_the_max_of_all_and_the_interface():
    (f,) = by(run(rp_filter={"all": 1, "eth1": 0}), "rp_filter")
    assert f.level == "warn" and "effective 1" in f.what and "eth1" in f.what
    assert f.fix == "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth1.rp_filter=2"
    (ok,) = by(run(rp_filter={"all": 2, "eth1": 0}), "rp_filter")
    assert ok.level == "ok" and "loose" in ok.what


def test_strict_rp_filter_with_a_failing_peer_is_an_error():
    probe = RouteProbe("198.51.100.1", "10.1.0.1", "eth1", "eth2", in_ok=False, in_error="Invalid argument")
    findings = run(rp_filter={"all": 1, "eth1": 1}, routes=[probe])
    (rpf,) = by(findings, "rp_filter")
    assert rpf.level == "error" and "198.51.100.1" in rpf.why
    (route,) = by(findings, "route")
    assert route.level == "warn" and "leave by eth2" in route.what
    assert exit_code(findings) == 2


def test_no_route_back():
    findings = run(routes=[RouteProbe("198.51.100.1", "10.1.0.1", "eth1", None, "Network is unreachable")])
    assert [f.level for f in by(findings, "route")] == ["error"]


def test_live_counter():
    (f,) = by(run(rp_filter={"all": 1, "eth1": 1}, rpf_fails=42), "live-rpf")
    assert f.level == "error" and f.what.startswith("42 packets") and "strict on eth1" in f.why
    (g,) = by(run(rpf_fails=3), "live-rpf")
    assert g.level == "warn" and "loose" in g.why


def test_ports_nofile_buffers_forwarding():
    findings = run(local_port_range=(32768, 60999), nofile=1024, rmem_max=65536)
    assert by(findings, "ports")[0].fix == "sysctl -w net.ipv4.ip_local_reserved_ports=35000-60999"
    assert by(findings, "nofile")[0].fix.startswith("-L 30065")
    assert by(findings, "buffers")[0].level == "warn"
    assert by(run(rmem_max=212992), "buffers")[0].level == "info"


def test_kernel_tier_findings():
    facts = Facts(**{**CLEAN, "ip_forward": 0})
    required = [f for f in evaluate(facts, 35000, 65000, 1, kernel_tier=True) if f.check == "kernel"]
    assert [f.level for f in required] == ["error"] and "ip_forward=1" in required[0].fix
    assert "--kernel-forward-policy" in required[0].fix                  # what turning forwarding on opens
    auto = by(evaluate(facts, 35000, 65000, 1), "kernel")
    assert [f.level for f in auto] == ["info"] and auto[0].what == "kernel tier: off (net.ipv4.ip_forward is 0)"
    assert by(evaluate(facts, 35000, 65000, 1, kernel_tier=False), "kernel")[0].what == "kernel tier: off (--no-kernel)"
    on = Facts(**{**CLEAN, "ip_forward": 1, "conntrack_max": 4096, "udp_timeouts": (30, 10), "has_v6": True})
    found = evaluate(on, 35000, 65000, 1)
    assert by(found, "kernel")[0].level == "ok"
    assert by(found, "kernel")[1].fix == "sysctl -w net.ipv6.conf.all.forwarding=1"
    ct = by(found, "conntrack")
    assert ct[0].level == "warn" and ct[0].fix == "sysctl -w net.netfilter.nf_conntrack_max=16024"
    assert ct[1].level == "warn" and "udp_timeout_stream=120" in ct[1].fix
    fine = Facts(**{**CLEAN, "ip_forward": 1, "conntrack_max": 262144})
    assert [f.level for f in by(evaluate(fine, 35000, 65000, 1), "conntrack")] == ["ok", "ok"]


def test_json_and_lines():
    findings = run(rp_filter={"all": 1, "eth1": 1})
    doc = json.loads(to_json(findings))
    assert doc["status"] == "warnings" and {"level", "check", "what", "why", "fix"} <= set(doc["findings"][0])
    line = by(findings, "rp_filter")[0].line()
    assert line.startswith("WARN  eth1 (10.1.0.1)") and ". Fix: sysctl -w" in line
