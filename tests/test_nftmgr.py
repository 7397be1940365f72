"""Golden tests of the nft builders and parsers: pure functions, no root needed.
Regenerate after an intended change with UPDATE_GOLDEN=1 and review the diff."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rtpproxy import nftmgr
from rtpproxy.nftmgr import Element, NftLayout

GOLDEN = Path(__file__).parent / "golden"
STANDALONE = NftLayout(min_port=35000, max_port=65000, element_timeout=90, control_ports=(40000,))
CHAIN = NftLayout(admin_chain=("inet", "filter", "input"), min_port=20000, max_port=30000, range_policy="none",
                  element_timeout=45)
ELEMENTS = [Element("192.0.2.10", 35000, "a84b4c76e66710@pc33"), Element("192.0.2.10", 35001, "a84b4c76e66710@pc33"),
            Element("2001:db8::10", 35002, "v6call"), Element("0.0.0.0", 35004, "any"), Element("::", 35006, "any6"),
            Element("192.0.2.10", 35008, "x" * 300)]


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_standalone_setup():
    check("nft_standalone_setup.nft", nftmgr.setup_text(STANDALONE))


def test_chain_mode_setup_removes_old_jumps_first():
    check("nft_chain_setup.nft", nftmgr.setup_text(CHAIN, jump_handles=[7, 12]))


def test_removal():
    check("nft_standalone_removal.nft", nftmgr.removal_text(STANDALONE))


@pytest.mark.parametrize("layout,name", [(STANDALONE, "standalone"), (CHAIN, "chain")])
def test_element_commands(layout, name):
    doc = {"add": nftmgr.element_commands(layout, "add", ELEMENTS),
           "delete": nftmgr.element_commands(layout, "delete", ELEMENTS),
           "flush": nftmgr.flush_commands(layout)}
    check(f"nft_elements_{name}.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")


def test_comment_is_bounded():
    (cmd,) = [c for c in nftmgr.element_commands(STANDALONE, "add", ELEMENTS[-1:])]
    assert len(cmd["add"]["element"]["elem"][0]["elem"]["comment"]) == nftmgr.COMMENT_MAX


def test_parse_listing():
    listing = json.loads((GOLDEN / "nft_listing.json").read_text())
    assert nftmgr.parse_elements(listing, STANDALONE) == [
        Element("10.77.0.1", 41000, "call-7@peer"), Element("10.77.0.1", 41001, "call-7@peer"),
        Element("0.0.0.0", 41002, "w")]
    assert nftmgr.parse_counters(listing) == {"rtpproxy: live media": 5, "rtpproxy: media port outside any call": 2}
    chain_listing = {"nftables": [{"rule": {"chain": "input", "handle": 9, "comment": "rtpproxy"}},
                                  {"rule": {"chain": "input", "handle": 10, "comment": "admin"}},
                                  {"rule": {"chain": "other", "handle": 11, "comment": "rtpproxy"}}]}
    assert nftmgr.jump_handles(chain_listing, CHAIN) == [9]
    assert nftmgr.jump_handles(chain_listing, STANDALONE) == []


@pytest.mark.parametrize("value", ["filter:input", "bridge:filter:input", "ip:filter:INPUT", "inet::input",
                                   "inet:a:b:c"])
def test_bad_admin_chain(value):
    with pytest.raises(ValueError):
        nftmgr.parse_admin_chain(value)


KERNEL = NftLayout(min_port=35000, max_port=65000, element_timeout=90, kernel=True)
FLOWS = [nftmgr.KernelFlow(("198.51.100.7", 5000), ("192.0.2.10", 35000), ("203.0.113.9", 6000),
                           ("192.0.2.10", 35002), "call-1"),
         nftmgr.KernelFlow(("2001:db8::7", 5000), ("2001:db8::10", 35004), ("2001:db8::9", 6000),
                           ("2001:db8::10", 35006), "call-6")]


def test_kernel_tier_setup():
    check("nft_kernel_setup.nft", nftmgr.setup_text(KERNEL))
    accepting = nftmgr.setup_text(NftLayout(kernel=True, forward_policy="accept"))
    assert nftmgr.FORWARD_DROP_COMMENT not in accepting and "--kernel-forward-policy accept" in accepting


def test_kernel_flow_elements():
    doc = {"add": nftmgr.kernel_commands(KERNEL, "add", FLOWS),
           "delete": nftmgr.kernel_commands(KERNEL, "delete", FLOWS),
           "flush": nftmgr.kernel_flush_commands(KERNEL)}
    check("nft_kernel_elements.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")


def test_parse_kernel_counters():
    listing = {"nftables": [{"metainfo": {}}, {"set": {"name": "kcount4", "elem": [
        {"elem": {"val": {"concat": ["10.0.1.1", 40000]}, "counter": {"packets": 5, "bytes": 1000}}}]}},
        {"set": {"name": "kcount6", "elem": [
            {"elem": {"val": {"concat": ["2001:db8:0::1", 40002]}, "counter": {"packets": 1, "bytes": 220}}}]}}]}
    assert nftmgr.parse_kernel_counters(listing) == {("10.0.1.1", 40000): (5, 1000), ("2001:db8::1", 40002): (1, 220)}
