"""Packaging: `make install DESTDIR=...` and the Debian package's whole life on this machine.

The .deb test builds the package, installs it with apt (which pulls Debian's own dependencies,
python3-typer 0.7 among them), starts the installed unit's ExecStart as the service user with the
unit's capabilities (systemd may not be PID 1 here: setpriv stands in for it), talks to it over
UDP, stops it, checks that nothing is left, and purges it. It changes the system, so it runs
only where RTPPROXY_TEST_DEB=1 (CI sets it)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import wait_for
from rtpproxy.config import parse_control
from rtpproxy.control.client import ControlClient

ROOT = Path(__file__).resolve().parent.parent


def copy_tree(dst: Path) -> Path:
    """The tracked files of the checkout, as they are in the work tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        elif src.exists():
            shutil.copy2(src, target)
    return dst


def test_make_install_destdir_gives_a_runnable_tree(tmp_path):
    src = copy_tree(tmp_path / "src")
    dest = tmp_path / "dest"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["make", "install", f"DESTDIR={dest}", "PREFIX=/usr/local", f"PYTHON={sys.executable}"],
                       cwd=src, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    entry = dest / "usr/local/bin/rtpproxy"
    site = next(dest.glob("usr/local/lib/python3*/site-packages"))
    run = subprocess.run([str(entry), "version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)}, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("rtpproxy 0.1.0"), run.stdout + run.stderr
    assert "engine: c)" in run.stdout                           # the C engine was built and installed
    unit = (dest / "usr/local/lib/systemd/system/rtpproxy.service").read_text()
    assert "ExecStart=/usr/local/bin/rtpproxy run --config /etc/rtpproxy/rtpproxy.conf" in unit
    assert (dest / "etc/rtpproxy/rtpproxy.conf").exists()
    r = subprocess.run(["make", "uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local", f"PYTHON={sys.executable}"],
                       cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not entry.exists() and not (site / "rtpproxy").exists()
    assert (dest / "etc/rtpproxy/rtpproxy.conf").exists()       # the admin's config stays


def _exec_start(unit: str) -> list[str]:
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [a for a in line.split("=", 1)[1].split() if a != "$EXTRA_OPTS"]


@pytest.mark.privileged
@pytest.mark.skipif(not os.environ.get("RTPPROXY_TEST_DEB"),
                    reason="builds and installs the .deb system-wide: set RTPPROXY_TEST_DEB=1 (CI does)")
def test_debian_package_lifecycle(tmp_path):
    src = copy_tree(tmp_path / "src")
    build = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (deb,) = tmp_path.glob("rtpproxy_*.deb")
    if shutil.which("lintian"):
        lint = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True)
        assert not [x for x in lint.stdout.splitlines() if x.startswith("E:")], lint.stdout

    inst = subprocess.run(["apt-get", "install", "-y", str(deb)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    proc = fuse_mode = None
    try:
        version = subprocess.run(["/usr/bin/rtpproxy", "version"], capture_output=True, text=True)
        assert version.stdout.startswith("rtpproxy 0.1.0") and "engine: c)" in version.stdout, version
        assert subprocess.run(["getent", "passwd", "rtpproxy"], capture_output=True).returncode == 0
        unit_path = next(p for p in (Path("/lib/systemd/system/rtpproxy.service"),
                                     Path("/usr/lib/systemd/system/rtpproxy.service")) if p.exists())
        unit = unit_path.read_text()
        assert "Type=notify" in unit
        caps = re.search(r"^AmbientCapabilities=(.*)$", unit, re.M).group(1).split()
        assert sorted(caps) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]          # nft, and mounting the table files
        capset = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
        conf = Path("/etc/rtpproxy/rtpproxy.conf").read_text()
        udp = re.search(r"^control = (udp:\S+)", conf, re.M).group(1)
        unix = re.search(r"^control = unix:(\S+)", conf, re.M).group(1)

        # What systemd would do: RuntimeDirectory, NOTIFY_SOCKET, User/Group, the capabilities;
        # and what udev does on a Debian host (containers may leave /dev/fuse 0600).
        fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        os.chmod("/dev/fuse", 0o666)
        Path("/run/rtpproxy").mkdir(exist_ok=True)
        shutil.chown("/run/rtpproxy", "rtpproxy", "rtpproxy")
        notify_dir = Path(tempfile.mkdtemp(prefix="rtpproxy-notify-"))     # reachable by the service user
        notify_path = notify_dir / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(20)
        os.chmod(notify_dir, 0o755)
        os.chmod(notify_path, 0o777)
        proc = subprocess.Popen(["setpriv", "--reuid=rtpproxy", "--regid=rtpproxy", "--init-groups",
                                 f"--inh-caps={capset}", f"--ambient-caps={capset}",
                                 f"--bounding-set={capset}", *_exec_start(unit)],
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": str(notify_path)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert notify.recv(100) == b"READY=1"
        client = ControlClient(parse_control(udp), timeout=3)
        assert client.send("V") == "20040107"
        port = client.send("U pkgcall 127.0.0.1 4000 ft;1").split()[0]
        assert port.isdigit()
        assert client.send("L pkgcall 127.0.0.1 4002 ft;1 tt;1").split()[0].isdigit()
        assert ControlClient(parse_control(f"unix:{unix}"), timeout=3).send("VF 20050322") == "1"
        table = subprocess.run(["nft", "-j", "list", "table", "inet", "rtpproxy"], capture_output=True, text=True)
        assert table.returncode == 0 and '"comment": "pkgcall"' in table.stdout   # its ports are open
        # The table files, served through Debian's python3-fusepy, show the call.
        tables = Path("/run/rtpproxy/tables")
        assert (tables / "list").read_text() == "0\n"
        listing = (tables / "0" / "list").read_text()       # the packaged config binds `listen = *`
        assert f"local inet4 0.0.0.0:{port}\n    owner: call pkgcall" in listing, listing
        # Once mounted, the daemon keeps CAP_NET_ADMIN alone.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"^CapEff:\s+0*1000$", status, re.M), status
        assert client.send("D pkgcall ft tt") == "0"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
        for stop_post in (x for x in unit.splitlines() if x.startswith("ExecStopPost=")):
            subprocess.run(stop_post.split("=", 1)[1].lstrip("+").split(), check=True)
        assert wait_for(lambda: "/run/rtpproxy/tables" not in Path("/proc/mounts").read_text(), 5)
        # Nothing left behind: no table, no socket, the control port free again.
        assert subprocess.run(["nft", "list", "table", "inet", "rtpproxy"], capture_output=True).returncode != 0
        assert not Path(unix).exists()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", int(udp.rsplit(":", 1)[1])))
        notify.close()
        shutil.rmtree(notify_dir, ignore_errors=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if fuse_mode is not None:
            os.chmod("/dev/fuse", fuse_mode)
        purge = subprocess.run(["apt-get", "purge", "-y", "rtpproxy"], capture_output=True, text=True,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert purge.returncode == 0, purge.stderr
    assert subprocess.run(["getent", "passwd", "rtpproxy"], capture_output=True).returncode != 0
    assert not Path("/etc/rtpproxy").exists()
    assert wait_for(lambda: not Path("/usr/bin/rtpproxy").exists(), 5)
