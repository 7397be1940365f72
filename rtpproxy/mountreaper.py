"""Unmounts the table files when the daemon that serves them is gone, however it went.

`python3 -m rtpproxy.mountreaper MOUNTPOINT`, started by tablectl.py while the daemon
can still mount (before it drops privileges), with a pipe on stdin whose other end
only the daemon holds. When the pipe reads EOF (clean stop, crash, SIGKILL) the mount
is detached, so `ls /run/rtpproxy/tables` never hangs on a dead server. It ignores the
signals a stop sends to the whole service (systemd's SIGTERM to the cgroup, a terminal's
SIGINT): the daemon's exit is what it waits for.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import syslog

MNT_DETACH = 2


def unmount(path: str) -> str:
    """Detach the mount at path; '' on success, else why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), MNT_DETACH) == 0:
        return ""
    err = ctypes.get_errno()
    # A mount made through the setuid helper (no CAP_SYS_ADMIN) is the helper's to undo.
    for helper in ("fusermount3", "fusermount"):
        exe = shutil.which(helper)
        if exe and subprocess.run([exe, "-u", "-z", path], capture_output=True).returncode == 0:
            return ""
    return os.strerror(err)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path = sys.argv[1]
    while True:
        try:
            if not os.read(0, 64):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    why = unmount(path)
    if why and "not mounted" not in why and "Invalid argument" not in why:
        syslog.openlog("rtpproxy-mountreaper", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, f"cannot unmount {path}: {why}; the next start removes it, or "
                                      "`rtpproxy tables umount`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
