"""`rtpproxy tables list|show|add|del|umount`: conveniences over the table files.

Plain file reads and writes, exactly what `cat` and `echo` would do, so the CLI shows
what scripts see; errors are the errno the daemon returned, with its meaning.
"""
from __future__ import annotations

import errno
import os
from typing import Optional

import typer

from rtpproxy.config import DEFAULT_TABLES_DIR

app = typer.Typer(add_completion=False, help="The forwarding-table files (FUSE, default /run/rtpproxy/tables).")

DIR = typer.Option(DEFAULT_TABLES_DIR, "--dir", help="Where the daemon mounted its table files (--tables-dir).")

MEANING = {
    errno.EEXIST: "it exists already",
    errno.ENOENT: "no such table or entry",
    errno.EBUSY: "in use",
    errno.EINVAL: "not a valid command",
}


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"rtpproxy: error: {message}", err=True)
    raise typer.Exit(code)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        _hint(path, exc)
        return ""


def _write(path: str, command: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        _hint(path, exc)
        return
    try:
        os.write(fd, (command + "\n").encode())
    except OSError as exc:
        _fail(f"{command!r}: {MEANING.get(exc.errno, exc.strerror)} ({errno.errorcode.get(exc.errno, exc.errno)})")
    finally:
        os.close(fd)


def _hint(path: str, exc: OSError) -> None:
    if exc.errno == errno.ENOTCONN:
        _fail(f"{path}: the daemon serving it is gone: `rtpproxy tables umount` removes the stale mount")
    if exc.errno == errno.ENOENT:
        _fail(f"{path}: not found: is the daemon running with table files (--table, --tables-dir)?")
    _fail(f"{path}: {exc.strerror}")


@app.command("list")
def list_(dir: str = DIR) -> None:
    """The tables, one per line."""
    typer.echo(_read(os.path.join(dir, "list")), nl=False)


@app.command()
def show(n: int = typer.Argument(..., help="Table number."), dir: str = DIR) -> None:
    """A table's status, then its forwarding entries."""
    typer.echo(_read(os.path.join(dir, str(n), "status")))
    typer.echo(_read(os.path.join(dir, str(n), "list")), nl=False)


@app.command()
def add(n: int = typer.Argument(..., help="Table number (0..63)."), dir: str = DIR) -> None:
    """Create table N (for manual entries)."""
    _write(os.path.join(dir, "control"), f"add {n}")


@app.command("del")
def del_(n: int = typer.Argument(..., help="Table number."), dir: str = DIR) -> None:
    """Delete table N (EBUSY while it has entries or is the daemon's own)."""
    _write(os.path.join(dir, "control"), f"del {n}")


@app.command()
def umount(dir: str = DIR, config: Optional[str] = typer.Option(
        None, "--config", help="Take tables-dir from the daemon's options file.")) -> None:
    """Remove a stale mount left by a daemon that is gone (the unit's ExecStopPost runs this)."""
    from rtpproxy.tablectl import mount_state  # noqa: PLC0415
    from rtpproxy.mountreaper import unmount  # noqa: PLC0415

    if config:
        from rtpproxy.config import conf_values  # noqa: PLC0415
        try:
            dir = conf_values(open(config, encoding="utf-8").read(), config).get("tables-dir", dir)
        except OSError as exc:
            _fail(f"--config: cannot read {config}: {exc.strerror}", 2)
    state = mount_state(dir)
    if state == "live":
        _fail(f"{dir} is served by a running daemon: stop it instead")
    if state == "stale":
        why = unmount(dir)
        if why:
            _fail(f"cannot unmount {dir}: {why}")
        typer.echo(f"removed the stale mount at {dir}")
