"""The command line as an operator meets it: bad flags, pidfile, signals, the sippy-style
invocation that backgrounds itself, privilege drop, `rtpproxy ctl`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import IS_ROOT, free_port, free_port_range, wait_for

RTPPROXY = [sys.executable, "-m", "rtpproxy"]


def run(*args, timeout=20):
    return subprocess.run([*RTPPROXY, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,flag", [
    (["run", "-m", "abc"], "-m"),
    (["run", "-F", "-m", "100"], "-m"),
    (["run", "-F", "-m", "40000", "-M", "39000"], "-M"),
    (["run", "-F", "-s", "bogus:x"], "-s"),
    (["run", "-F", "-s", "udp:127.0.0.1:99999"], "-s"),
    (["run", "-F", "-l", "not-an-ip"], "-l"),
    (["run", "-F", "-6", "127.0.0.1"], "-6"),
    (["run", "-F", "-d", "LOUD"], "-d"),
    (["run", "-F", "-T", "0"], "-T"),
    (["run", "-F", "-n", "smtp:x"], "-n"),
    (["run", "-F", "-t", "zz"], "-t"),
    (["run", "-F", "--backend", "java"], "--backend"),
    (["run", "-F", "-p", "/nonexistent/dir/pid"], "-p"),
    (["run", "--no-such-flag"], "--no-such-flag"),
    (["-m", "abc"], "-m"),                                    # sippy-style invocation, same checks
])
def test_bad_flags_exit_2_naming_the_flag(args, flag):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="the root check only applies to root")
def test_root_with_udp_control_needs_u_or_F():
    r = run("run", "-s", f"udp:127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "-u USER" in r.stderr and "-F" in r.stderr


def _start(tmp_path, *extra):
    base = free_port_range(20)
    port = free_port()
    sock = tmp_path / "ctl.sock"
    pid = tmp_path / "rtpproxy.pid"
    proc = subprocess.Popen([*RTPPROXY, "run", "-F", "--no-nft", "--table", "-1", "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{port}",
                             "-s", f"unix:{sock}", "-p", str(pid), "-m", str(base), "-M", str(base + 19), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: pid.exists() and sock.exists(), timeout=10), proc.stderr.read() if proc.poll() else ""
    return proc, port, sock, pid


def test_sigterm_cleans_up_everything(tmp_path):
    proc, port, sock, pid = _start(tmp_path)
    assert int(pid.read_text()) == proc.pid
    out = run("ctl", "-s", f"udp:127.0.0.1:{port}", "U", "c1", "127.0.0.1", "4000", "ft;1")
    media_port = int(out.stdout.split()[0])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not pid.exists() and not sock.exists()
    for p, kind in ((port, socket.SOCK_DGRAM), (media_port, socket.SOCK_DGRAM), (media_port + 1, socket.SOCK_DGRAM)):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", p))                        # everything the daemon held is free again
    assert "shut down, tag ft;1" in proc.stderr.read()


def test_second_instance_on_the_same_socket_fails_clearly(tmp_path):
    proc, port, sock, pid = _start(tmp_path)
    try:
        r = run("run", "-F", "--no-nft", "--table", "-1", "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{port}")
        assert r.returncode == 1 and "cannot start" in r.stderr and "in use" in r.stderr
        r = run("run", "-F", "--no-nft", "--table", "-1", "-l", "127.0.0.1", "-s", f"unix:{sock}")
        assert r.returncode == 1 and "in use by a running daemon" in r.stderr
        assert run("ctl", "-s", f"unix:{sock}", "V").stdout == "20040107\n"   # the first one is untouched
    finally:
        proc.terminate()
        proc.wait(10)


def test_sighup_drains_then_exits(tmp_path):
    proc, port, sock, pid = _start(tmp_path)
    ctl = ["ctl", "-s", f"udp:127.0.0.1:{port}"]
    assert run(*ctl, "U", "c1", "127.0.0.1", "4000", "ft;1").returncode == 0
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert run(*ctl, "U", "c2", "127.0.0.1", "4000", "ft;1").stdout == "E99\n"    # no new sessions
    assert proc.poll() is None                                                     # c1 still served
    assert run(*ctl, "D", "c1", "ft").stdout == "0\n"
    assert proc.wait(10) == 0


def test_ctl_reports_errors_with_exit_codes(tmp_path):
    proc, port, sock, pid = _start(tmp_path)
    try:
        assert run("ctl", "-s", f"unix:{sock}", "VF", "20050322").stdout == "1\n"
        bad = run("ctl", "-s", f"unix:{sock}", "D", "nosuch", "tag")
        assert bad.stdout == "E50\n" and bad.returncode == 1
    finally:
        proc.terminate()
        proc.wait(10)
    gone = run("ctl", "-s", f"udp:127.0.0.1:{free_port()}", "--timeout", "0.5", "V")
    assert gone.returncode == 1 and "no reply" in gone.stderr


def test_sippy_style_invocation_goes_to_background(tmp_path):
    base = free_port_range(20)
    port = free_port()
    pid = tmp_path / "bg.pid"
    r = run("-F", "--no-nft", "--table", "-1", "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{port}", "-p", str(pid), "-m", str(base),
            "-M", str(base + 19))
    assert r.returncode == 0, r.stderr                 # returns once the background daemon is ready
    daemon_pid = int(pid.read_text())
    try:
        assert run("ctl", "-s", f"udp:127.0.0.1:{port}", "V").stdout == "20040107\n"
    finally:
        os.kill(daemon_pid, signal.SIGTERM)
    assert wait_for(lambda: not pid.exists(), timeout=10)


def test_sippy_style_start_failure_is_reported_by_the_parent(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        r = run("-F", "--no-nft", "--table", "-1", "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{busy.getsockname()[1]}")
    assert r.returncode == 1 and "cannot start" in r.stderr


@pytest.mark.privileged
def test_u_drops_privileges(tmp_path):
    os.chmod(tmp_path, 0o755)
    proc, port, sock, pid = _start(tmp_path, "-u", "nobody")
    try:
        nobody = str(int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout))

        def uids() -> list[str]:
            status = open(f"/proc/{proc.pid}/status").read()
            return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert wait_for(lambda: uids() == [nobody] * 4, timeout=5), uids()
        assert run("ctl", "-s", f"udp:127.0.0.1:{port}", "U", "c", "127.0.0.1", "4000", "t").returncode == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_version_and_legacy_info_flags():
    assert "control protocol 20040107" in run("version").stdout
    assert run("-v").stdout.startswith("Basic version: 20040107\n")
    assert run("-V").stdout.strip()


@pytest.mark.privileged
def test_nft_without_cap_net_admin_names_the_capability():
    """Root minus CAP_NET_ADMIN (as a unit missing it would be): start fails and says what to add."""
    r = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", *RTPPROXY, "run", "-F",
                        "--table", "-1", "-l", "127.0.0.1", "-s", f"udp:127.0.0.1:{free_port()}", "--nft-table", "rptcaps"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "CAP_NET_ADMIN" in r.stderr and "--no-nft" in r.stderr


def test_nft_missing_package_is_named():
    code = ("import sys; sys.modules['nftables'] = None; from rtpproxy.cli import main; "
            f"main(['run', '-F', '-l', '127.0.0.1', '-s', 'udp:127.0.0.1:{free_port()}'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "apt-get install python3-nftables" in r.stderr
