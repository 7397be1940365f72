"""The table files as a FUSE file system: the only module that imports a FUSE binding.

The binding is mfusepy (PyPI; libfuse 3 or 2) or Debian's python3-fusepy (libfuse 2):
same high-level API. libfuse runs its single-threaded loop in a thread of ours; every
operation is handed to the asyncio thread (Tables lives there) and waited for, so the
files show one consistent state. Readable files are rendered once per open() and served
from that snapshot, so a large `list` read in chunks has stable offsets; each `cat`
opens again and sees live counters. The mount uses direct_io: sizes are unknown until
rendered, and every read must reach us.

Lifecycle: mount() cleans a stale mount left by a crashed daemon, starts the reaper
(mountreaper.py) that detaches the mount when this process is gone, then mounts; stop()
lets the reaper unmount, which ends libfuse's loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import importlib
import itertools
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from rtpproxy.mountreaper import unmount
from rtpproxy.syscheck import effective_capabilities
from rtpproxy.tablefmt import TableError
from rtpproxy.tables import DIR, READ, Tables

log = logging.getLogger("rtpproxy.tables")

OP_TIMEOUT = 5.0               # an operation the asyncio thread does not answer in time gets EIO
MOUNT_TIMEOUT = 5.0


def load_binding():
    """The FUSE binding module, or raise TableUnavailable saying what to install."""
    # mfusepy (PyPI), then Debian's python3-fusepy (module `fusepy`), then upstream fusepy (`fuse`).
    for name in ("mfusepy", "fusepy", "fuse"):
        try:
            binding = importlib.import_module(name)
        except ImportError:
            continue
        except OSError as exc:            # the binding is there, libfuse is not
            raise TableUnavailable(f"{exc}: install libfuse (apt-get install fuse3, or libfuse2 "
                                   "for python3-fusepy)") from None
        if hasattr(binding, "FUSE") and hasattr(binding, "Operations"):
            return binding
    raise TableUnavailable("no FUSE binding: apt-get install python3-fusepy (or pip install mfusepy)")


class TableUnavailable(Exception):
    """The table files cannot be served here; the message says why and what to do."""


def mount_state(path: str) -> Optional[str]:
    """'live' or 'stale' if a FUSE file system is mounted at path, 'other' for another kind, None if none."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        if fields[4].replace("\\040", " ") != real:
            continue
        if not fields[sep + 1].startswith("fuse"):
            return "other"
        try:
            os.stat(real)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return "stale"
        return "live"
    return None


def clean_stale(path: str) -> bool:
    """Detach a dead daemon's mount at path; True if there was one."""
    if mount_state(path) != "stale":
        return False
    why = unmount(path)
    if why:
        raise TableUnavailable(f"a stale mount at {path} cannot be removed ({why}): run `umount -l {path}` as root")
    log.info("removed the stale table mount at %s left by a previous daemon", path)
    return True


def _can_mount() -> bool:
    CAP_SYS_ADMIN = 21
    return bool(effective_capabilities() >> CAP_SYS_ADMIN & 1)


class TableMount:
    def __init__(self, tables: Tables, loop: asyncio.AbstractEventLoop, mountpoint: str):
        self.tables = tables
        self.loop = loop
        self.mountpoint = mountpoint
        self._thread: Optional[threading.Thread] = None
        self._reaper: Optional[subprocess.Popen] = None
        self._error: Optional[BaseException] = None

    # Every file operation runs on the asyncio thread; this waits for it from libfuse's thread.
    def call(self, fn: Callable, *args):
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:     # handed back to the FUSE thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(OP_TIMEOUT)

    def mount(self) -> None:
        """Serve the files at mountpoint, or raise TableUnavailable with the reason and the fix."""
        binding = load_binding()
        if not os.path.exists("/dev/fuse"):
            raise TableUnavailable("/dev/fuse is missing: load the module (modprobe fuse) or, in a container, "
                                   "pass the device through")
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
            raise TableUnavailable(f"/dev/fuse is mode {mode:04o}, not usable by uid {os.getuid()}: Debian's udev "
                                   "makes it 0666 (chmod 0666 /dev/fuse where it does not, e.g. in a container)")
        state = mount_state(self.mountpoint)
        if state == "live":
            raise TableUnavailable(f"{self.mountpoint} is served by another process: choose another "
                                   "--tables-dir")
        if state == "other":
            raise TableUnavailable(f"something else is mounted at {self.mountpoint}: choose another --tables-dir")
        clean_stale(self.mountpoint)
        try:
            os.makedirs(self.mountpoint, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise TableUnavailable(f"cannot create {self.mountpoint} ({exc.strerror}): run as root or choose "
                                   "--tables-dir") from None
        r, w = os.pipe()
        # The reaper holds the read end; only we hold the write end (not inherited by children).
        self._reaper = subprocess.Popen([sys.executable, "-m", "rtpproxy.mountreaper", self.mountpoint],
                                        stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        close_fds=True)    # holds no pipe of whoever started us (it logs to syslog)
        os.close(r)
        self._reaper_pipe = w
        os.set_inheritable(w, False)
        ready = threading.Event()
        ops = _operations(binding, self, ready)
        self._thread = threading.Thread(target=self._serve, args=(binding, ops), name="tables-fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                why = f"libfuse status {self._error}" if self._error else "no answer from libfuse"
                need = "" if _can_mount() else ": mounting needs CAP_SYS_ADMIN (run as root, or see the unit's " \
                                               "AmbientCapabilities)"
                raise TableUnavailable(f"mounting {self.mountpoint} failed ({why}; libfuse's own message is just "
                                       f"above){need}; --table -1 runs without the files")

    def _serve(self, binding, ops) -> None:
        try:
            binding.FUSE(ops, self.mountpoint, foreground=True, nothreads=True, allow_other=True,
                         direct_io=True, fsname="rtpproxy", subtype="rtpproxy")
        except BaseException as exc:            # reported by mount(); the daemon runs on without files
            self._error = exc

    def stop(self) -> None:
        """Unmount (through the reaper, which also covers our crash) and wait for libfuse's loop."""
        if self._reaper is not None:
            os.close(self._reaper_pipe)
            try:
                self._reaper.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
            self._reaper = None
        if self._thread is not None:
            self._thread.join(MOUNT_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the table file system thread did not stop; unmount %s by hand", self.mountpoint)
            self._thread = None


def _operations(binding, mount: TableMount, ready: threading.Event):
    """The libfuse callbacks: path operations mapped onto Tables, errors onto errno."""
    fh_counter = itertools.count(1)
    snapshots: dict[int, bytes] = {}
    uid, gid = os.getuid(), os.getgid()
    started = time.time_ns()

    def run(fn, *args):
        try:
            return mount.call(fn, *args)
        except TableError as exc:
            raise binding.FuseOSError(exc.errno) from None
        except concurrent.futures.TimeoutError:
            raise binding.FuseOSError(errno.EIO) from None

    class Ops(binding.Operations):
        use_ns = True

        def init(self, path):
            ready.set()

        def getattr(self, path, fh=None):
            kind = run(mount.tables.kind, path)
            if kind is None:
                raise binding.FuseOSError(errno.ENOENT)
            mode = (stat.S_IFDIR | 0o555) if kind == DIR else (stat.S_IFREG | (0o444 if kind == READ else 0o220))
            return dict(st_mode=mode, st_nlink=2 if kind == DIR else 1, st_size=0, st_uid=uid, st_gid=gid,
                        st_atime=started, st_mtime=started, st_ctime=started)

        def readdir(self, path, fh):
            return [".", "..", *run(mount.tables.listdir, path)]

        def open(self, path, flags):
            kind = run(mount.tables.kind, path)
            if kind is None:
                raise binding.FuseOSError(errno.ENOENT)
            if kind == DIR:
                raise binding.FuseOSError(errno.EISDIR)
            accmode = flags & os.O_ACCMODE
            if (kind == READ) != (accmode == os.O_RDONLY):
                raise binding.FuseOSError(errno.EACCES)
            fh = next(fh_counter)
            if kind == READ:
                snapshots[fh] = run(mount.tables.read, path)
            return fh

        def read(self, path, size, offset, fh):
            return snapshots.get(fh, b"")[offset:offset + size]

        def write(self, path, data, offset, fh):
            run(mount.tables.write, path, bytes(data))
            return len(data)

        def truncate(self, path, length, fh=None):
            return 0                            # `echo cmd > control` truncates first: nothing to do

        def release(self, path, fh):
            snapshots.pop(fh, None)
            return 0

    return Ops()
