"""The table files mounted for real (FUSE) by a running daemon, used with plain file I/O as
`cat` and `echo` would: live counters, entries written through N/control that packets then
follow, the errno of every refusal, chunked reads of a large list, and recovery after SIGKILL."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port, rtp_packet

pytestmark = pytest.mark.privileged

TABLE = 44


def read(path) -> str:
    with open(path) as f:
        return f.read()


def write_errno(path, text: str) -> int:
    """0 if the write was taken, else the errno the writer got."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def stat_of(status: str, name: str) -> int:
    return int(next(line.split(":", 1)[1] for line in status.splitlines() if line.startswith(name + ":")))


def block_of(listing: str, local: str) -> str:
    return next(b for b in listing.split("\n\n") if b.startswith(f"local inet4 {local}\n"))


def mounted(path) -> bool:
    return any(line.split()[1] == str(path) for line in read("/proc/mounts").splitlines())


def reaper_pids(path) -> list[int]:
    r = subprocess.run(["pgrep", "-f", f"rtpproxy.mountreaper {path}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


@pytest.fixture
def tables_relay(make_relay, tmp_path):
    mnt = tmp_path / "tables"

    def make(*extra):
        return make_relay("--table", str(TABLE), "--tables-dir", str(mnt), *extra)

    yield make, mnt
    for pid in reaper_pids(mnt):
        os.kill(pid, signal.SIGKILL)
    if mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_live_counters_of_a_call(tables_relay, peers):
    make, mnt = tables_relay
    relay = make()
    assert mounted(mnt) and "files at" in relay.log()
    assert sorted(os.listdir(mnt)) == [str(TABLE), "control", "list"]
    assert read(mnt / "list") == f"{TABLE}\n"
    caller, callee = peers(), peers()
    port_u = int(relay.cmd(f"U c1 127.0.0.1 {caller.port} ft").split()[0])
    port_l = int(relay.cmd(f"L c1 127.0.0.1 {callee.port} ft tt").split()[0])
    seen = []
    for round_ in range(3):
        for seq in range(10):
            caller.send(rtp_packet(round_ * 10 + seq), ("127.0.0.1", port_l))   # the answer's port
        assert len(callee.drain(0.2)) == 10
        listing = read(mnt / str(TABLE) / "list")
        seen.append((stat_of(read(mnt / str(TABLE) / "status"), "Packets"), listing))
    block = block_of(seen[-1][1], f"127.0.0.1:{port_l}")
    assert "owner: call c1 tag ft side 1 rtp" in block
    assert f"expect inet4 127.0.0.1:{caller.port}" in block
    assert f"output src inet4 127.0.0.1:{port_u} dst inet4 127.0.0.1:{callee.port}" in block
    assert "5160 bytes, 30 packets, 30 relayed, 0 drops" in block
    assert [p for p, _ in seen] == [10, 20, 30]          # plain reads see the counters move
    status = read(mnt / str(TABLE) / "status")
    assert stat_of(status, "Streams") == 4 and stat_of(status, "Owner PID") == relay.proc.pid
    relay.cmd("D c1 ft")
    assert "local inet4" not in read(mnt / str(TABLE) / "list")


def test_entries_written_to_control_carry_packets(tables_relay, peers):
    make, mnt = tables_relay
    make()
    a, b, c = peers(), peers(), peers()
    pa, pb = free_port(), free_port()
    ctl = mnt / str(TABLE) / "control"
    assert write_errno(ctl, f"add 127.0.0.1:{pb} dst 127.0.0.1:{a.port}\n") == 0
    assert write_errno(ctl, f"add 127.0.0.1:{pa} dst 127.0.0.1:{b.port} via 127.0.0.1:{pb} "
                            f"expect 127.0.0.1:{a.port}\n") == 0
    assert write_errno(ctl, f"update 127.0.0.1:{pb} via 127.0.0.1:{pa}\n") == 0
    for seq in range(5):
        a.send(rtp_packet(seq), ("127.0.0.1", pa))
        b.send(rtp_packet(seq), ("127.0.0.1", pb))
    assert {src for _, src in b.drain()} == {("127.0.0.1", pb)}
    assert {src for _, src in a.drain()} == {("127.0.0.1", pa)}
    c.send(rtp_packet(1), ("127.0.0.1", pa))                   # not the expected source
    assert b.drain(0.3) == []
    assert write_errno(ctl, f"update 127.0.0.1:{pa} dst 127.0.0.1:{c.port}") == 0
    a.send(rtp_packet(9), ("127.0.0.1", pa))
    assert [src for _, src in c.drain()] == [("127.0.0.1", pb)]
    block = block_of(read(mnt / str(TABLE) / "list"), f"127.0.0.1:{pa}")
    assert "6 relayed, 1 drops, 1 mismatched" in block
    assert write_errno(ctl, f"del 127.0.0.1:{pb}") == errno.EBUSY     # pa sends through it
    assert write_errno(ctl, f"del 127.0.0.1:{pa}") == errno.EBUSY     # and pb through pa
    assert write_errno(ctl, f"update 127.0.0.1:{pb} via 127.0.0.1:{pb}") == 0
    assert write_errno(ctl, f"del 127.0.0.1:{pa}") == 0
    assert write_errno(ctl, f"del 127.0.0.1:{pb}") == 0
    a.send(rtp_packet(10), ("127.0.0.1", pa))
    assert c.drain(0.3) == []


def test_every_refusal_reaches_the_writer_as_errno(tables_relay, peers):
    make, mnt = tables_relay
    relay = make()
    top, ctl = mnt / "control", mnt / str(TABLE) / "control"
    assert write_errno(top, f"add {TABLE}") == errno.EEXIST
    assert write_errno(top, f"del {TABLE}") == errno.EBUSY
    assert write_errno(top, "del 9") == errno.ENOENT
    assert write_errno(top, "add 99") == errno.EINVAL
    assert write_errno(top, "rm -rf /") == errno.EINVAL
    assert write_errno(top, "add 9\n") == 0 and read(mnt / "list") == f"9\n{TABLE}\n"
    p = free_port()
    assert write_errno(mnt / "9" / "control", f"add 127.0.0.1:{p} dst 127.0.0.1:9") == 0
    assert write_errno(top, "del 9") == errno.EBUSY
    assert write_errno(mnt / "9" / "control", f"add 127.0.0.1:{p} dst 127.0.0.1:9") == errno.EEXIST
    assert write_errno(ctl, f"del 127.0.0.1:{p}") == errno.ENOENT          # it is table 9's
    assert write_errno(ctl, "del 127.0.0.1:1") == errno.ENOENT
    assert write_errno(ctl, "add nonsense") == errno.EINVAL
    caller = peers()
    port_u = int(relay.cmd(f"U c2 127.0.0.1 {caller.port} ft").split()[0])
    assert write_errno(ctl, f"del 127.0.0.1:{port_u}") == errno.EBUSY       # a call's entry
    assert write_errno(ctl, f"add 127.0.0.1:{port_u} dst 127.0.0.1:9") == errno.EEXIST
    with pytest.raises(OSError) as exc:
        open(mnt / str(TABLE) / "list", "w")
    assert exc.value.errno == errno.EACCES
    with pytest.raises(FileNotFoundError):
        open(mnt / "17" / "status")
    # The daemon kept serving through all of it.
    assert relay.cmd("V") == "20040107"


def test_large_list_reads_in_chunks(tables_relay, peers):
    make, mnt = tables_relay
    relay = make("-m", "42000", "-M", "42999")
    callee = peers()
    for i in range(150):
        relay.cmd(f"U big{i} 127.0.0.1 {callee.port} ft")
        relay.cmd(f"L big{i} 127.0.0.1 {callee.port} ft tt")
    path = mnt / str(TABLE) / "list"
    fd = os.open(path, os.O_RDONLY)
    chunks = []
    try:
        while chunk := os.read(fd, 1000):
            chunks.append(chunk)
    finally:
        os.close(fd)
    text = b"".join(chunks).decode()
    assert len(chunks) > 100                                    # many reads at increasing offsets
    blocks = [b for b in text.split("\n\n") if b]
    assert len(blocks) == 600 and all(b.startswith("local inet4 127.0.0.1:") and
                                      b.rstrip().endswith(("never", "ago")) for b in blocks)
    assert len({b.splitlines()[0] for b in blocks}) == 600    # no block lost or repeated across chunks


def test_sigkill_then_restart(tables_relay):
    make, mnt = tables_relay
    relay = make()
    relay.proc.kill()
    relay.proc.wait()
    assert wait_for(lambda: not mounted(mnt))                   # the reaper detached it
    relay2 = make()
    assert read(mnt / "list") == f"{TABLE}\n"
    # A crash that takes the reaper too leaves a dead mount; the next start removes it.
    for pid in reaper_pids(mnt):
        os.kill(pid, signal.SIGKILL)
    relay2.proc.kill()
    relay2.proc.wait()
    with pytest.raises(OSError) as exc:
        os.listdir(mnt)
    assert exc.value.errno == errno.ENOTCONN
    relay3 = make()
    assert "removed the stale table mount" in relay3.log()
    assert read(mnt / "list") == f"{TABLE}\n"
    assert relay3.stop() == 0
    assert wait_for(lambda: not mounted(mnt))                   # clean stop unmounts


def test_two_daemons_cannot_own_one_table(tables_relay, tmp_path):
    make, mnt = tables_relay
    first = make()
    r = subprocess.run([sys.executable, "-m", "rtpproxy", "run", "-F", "--no-nft", "-l", "127.0.0.1",
                        "-s", f"udp:127.0.0.1:{free_port()}", "-m", "43000", "-M", "43100",
                        "--table", str(TABLE), "--tables-dir", str(tmp_path / "other")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"--table: table {TABLE} is owned by another rtpproxy (pid {first.proc.pid})" in r.stderr
