"""The table files' language, without FUSE: what writers may send and what readers get."""
import errno

import pytest

from rtpproxy.engine_api import WorkerStats

from rtpproxy.tablefmt import (
    ANY,
    EntryCommand,
    EntryView,
    StatusView,
    TableError,
    parse_entry_command,
    parse_table_command,
    render_list,
    render_status,
    render_table_list,
)


@pytest.mark.parametrize("data, want", [
    (b"add 0", ("add", 0)),
    (b"add 63\n", ("add", 63)),
    (b"del 7\n", ("del", 7)),
    (b"  del   7  \n", ("del", 7)),
])
def test_table_commands(data, want):
    assert parse_table_command(data) == want


@pytest.mark.parametrize("data", [
    b"", b"\n", b"add", b"add x", b"add 64", b"add -1", b"kill 3", b"add 1 2", b"add 1\nadd 2",
    b"add 1\r\n", b"\xffadd 1", b"add 1" + b" " * 600, b"ADD 1", b"add 0x1",
])
def test_bad_table_commands_are_einval(data):
    with pytest.raises(TableError) as exc:
        parse_table_command(data)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("data, want", [
    (b"add 127.0.0.1:30000 dst 10.0.0.1:4000\n",
     EntryCommand("add", ("127.0.0.1", 30000), dst=("10.0.0.1", 4000))),
    (b"add 127.0.0.1:30000 dst 10.0.0.1:4000 via 127.0.0.1:30002 expect 10.0.0.2:5000",
     EntryCommand("add", ("127.0.0.1", 30000), ("10.0.0.1", 4000), ("127.0.0.1", 30002), ("10.0.0.2", 5000))),
    (b"update [::1]:30000 expect any", EntryCommand("update", ("::1", 30000), expect=ANY)),
    (b"update [2001:db8::1]:30000 dst [2001:db8::2]:9", EntryCommand("update", ("2001:db8::1", 30000),
                                                                     dst=("2001:db8::2", 9))),
    (b"del 127.0.0.1:30000", EntryCommand("del", ("127.0.0.1", 30000))),
])
def test_entry_commands(data, want):
    assert parse_entry_command(data) == want


@pytest.mark.parametrize("data, err", [
    (b"add 127.0.0.1:30000", errno.EINVAL),                         # no dst
    (b"add 127.0.0.1 dst 10.0.0.1:4000", errno.EINVAL),             # no port
    (b"add host:30000 dst 10.0.0.1:4000", errno.EINVAL),            # names are not resolved
    (b"add 127.0.0.1:0 dst 10.0.0.1:4000", errno.EINVAL),
    (b"add 127.0.0.1:70000 dst 10.0.0.1:4000", errno.EINVAL),
    (b"add ::1:30000 dst [::1]:4000", errno.EINVAL),                # IPv6 without brackets
    (b"add 127.0.0.1:30000 dst 10.0.0.1:4000 dst 10.0.0.1:4001", errno.EINVAL),
    (b"add 127.0.0.1:30000 dst", errno.EINVAL),
    (b"add 127.0.0.1:30000 to 10.0.0.1:4000", errno.EINVAL),
    (b"update 127.0.0.1:30000", errno.EINVAL),
    (b"del 127.0.0.1:30000 dst 10.0.0.1:4000", errno.EINVAL),
    (b"flush", errno.EINVAL),
    (b"add 127.0.0.1:30000 dst [::1]:4000", errno.EAFNOSUPPORT),
])
def test_bad_entry_commands(data, err):
    with pytest.raises(TableError) as exc:
        parse_entry_command(data)
    assert exc.value.errno == err


def test_list_blocks_carry_what_an_operator_looks_for():
    e = EntryView(local=("203.0.113.1", 30000), owner="call abc tag x side 0 rtp", expect=("198.51.100.1", 2000),
                  mismatch="drop", via=("203.0.113.1", 30002), dst=("198.51.100.3", 2010), packets=150,
                  bytes=25800, relayed=149, drops=1, mismatched=3, last_packet_age=0.04)
    v6 = EntryView(local=("2001:db8::1", 30004), owner="manual", expect=None, mismatch="forward",
                   via=None, dst=None)
    text = render_list([v6, e]).decode()
    blocks = text.split("\n\n")
    assert blocks[0].splitlines() == [
        "local inet4 203.0.113.1:30000",
        "    owner: call abc tag x side 0 rtp",
        "    expect inet4 198.51.100.1:2000",
        "    src mismatch action: drop",
        "    output src inet4 203.0.113.1:30002 dst inet4 198.51.100.3:2010",
        "    path: userspace",
        "    stats: 25800 bytes, 150 packets, 149 relayed, 1 drops, 3 mismatched",
        "    last packet: 0.0 s ago",
    ]
    assert "local inet6 [2001:db8::1]:30004" in blocks[1] and "expect any" in blocks[1]
    assert "output src none dst none" in blocks[1] and "last packet: never" in blocks[1]
    assert render_list([]) == b""


def test_status_sums_entries_and_lists_workers():
    entries = tuple(EntryView(("127.0.0.1", p), "manual", None, "forward", None, None, packets=10, bytes=1720,
                              relayed=9, drops=1) for p in (30000, 30002))
    text = render_status(StatusView(3, 1234, "c, 2 workers", "off (not enabled)", entries,
                                    (WorkerStats(streams=1, packets=10, relayed=9, dropped=1, events_lost=0),
                                     WorkerStats(streams=1, packets=10, relayed=9, dropped=1, events_lost=2)))).decode()
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["Table"].strip() == "3" and lines["Streams"].strip() == "2"
    assert lines["Packets"].strip() == "20" and lines["Bytes"].strip() == "3440"
    assert lines["Drops"].strip() == "2" and lines["Errors"].strip() == "2"
    assert lines["Kernel"].strip() == "off (not enabled)"
    assert lines["Worker 1"].strip() == "streams 1, packets 10, relayed 9, drops 1, errors 2"


def test_table_list():
    assert render_table_list({5, 0, 12}) == b"0\n5\n12\n"
