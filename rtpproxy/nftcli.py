"""`rtpproxy nft setup|teardown|status|show`: the daemon's nftables objects from the shell."""
from __future__ import annotations

from collections import Counter
from typing import Optional

import typer

from rtpproxy import nftmgr
from rtpproxy.config import DEFAULT_CONTROL, parse_control
from rtpproxy.errors import ConfigError, NftError
from rtpproxy.firewall import MARGIN_S

app = typer.Typer(add_completion=False, help="The relay's nftables table: set up, remove, check, show.")


def _layout(table: str, chain: Optional[str], min_port: int, max_port: int, range_policy: str,
            ttl: int) -> nftmgr.NftLayout:
    try:
        admin = nftmgr.parse_admin_chain(chain) if chain else None
    except ValueError as exc:
        raise ConfigError("--nft-chain", f"{chain!r}: {exc}") from None
    if range_policy not in ("drop", "none"):
        raise ConfigError("--nft-range-policy", "use drop or none")
    return nftmgr.NftLayout(table=table, admin_chain=admin, min_port=min_port, max_port=max_port,
                            range_policy=range_policy, element_timeout=ttl + MARGIN_S)


def _fail(message: str, code: int) -> None:
    typer.echo(f"rtpproxy: error: {message}", err=True)
    raise typer.Exit(code)


TABLE = typer.Option("rtpproxy", "--nft-table", help="The daemon's table (standalone mode).")
CHAIN = typer.Option(None, "--nft-chain", help="inet:TABLE:CHAIN when the daemon runs with --nft-chain.")
MIN_PORT = typer.Option(35000, "-m", "--min-port", help="Lowest media port, as given to the daemon.")
MAX_PORT = typer.Option(65000, "-M", "--max-port", help="Highest media port, as given to the daemon.")
POLICY = typer.Option("drop", "--nft-range-policy", help="drop or none, as given to the daemon.")
TTL = typer.Option(60, "-T", "--ttl", help="Session TTL, as given to the daemon (sets the element timeout).")


def _run(action, *args):
    try:
        return action(*args)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except NftError as exc:
        _fail(str(exc), 1)


@app.command()
def setup(table: str = TABLE, chain: Optional[str] = CHAIN, min_port: int = MIN_PORT, max_port: int = MAX_PORT,
          range_policy: str = POLICY, ttl: int = TTL) -> None:
    """Load the skeleton (removing stale state first), as the daemon does at start."""
    def act():
        from rtpproxy.firewall import MediaFirewall  # noqa: PLC0415

        layout = _layout(table, chain, min_port, max_port, range_policy, ttl)
        MediaFirewall(layout).setup()
        typer.echo(f"{layout.family} {layout.table_name}: set up")
    _run(act)


def _flush_kernel_entries() -> None:
    """The kernel tier's NAT'ed conntrack entries outlive the table: delete them too."""
    from rtpproxy.conntrack import Conntrack  # noqa: PLC0415

    try:
        ct = Conntrack()
    except OSError:
        return                               # no conntrack here: nothing was forwarded by it
    try:
        ct.flush_mark(nftmgr.CT_MARK)
    except OSError as exc:
        typer.echo(f"rtpproxy: warning: kernel-tier conntrack entries not deleted: {exc}", err=True)
    finally:
        ct.close()


@app.command()
def teardown(table: str = TABLE, chain: Optional[str] = CHAIN,
             config: Optional[str] = typer.Option(None, "--config", help="Take nft-table/nft-chain from the daemon's options file.")) -> None:
    """Remove everything the daemon adds (idempotent); for ExecStopPost and after a crash."""
    def act():
        from rtpproxy.config import conf_values  # noqa: PLC0415
        from rtpproxy.firewall import MediaFirewall  # noqa: PLC0415

        t, c = table, chain
        if config:
            try:
                values = conf_values(open(config, encoding="utf-8").read(), config)
            except OSError as exc:
                raise ConfigError("--config", f"cannot read {config}: {exc.strerror}") from None
            t, c = values.get("nft-table", t), values.get("nft-chain", c)
        layout = _layout(t, c, 35000, 65000, "drop", 60)
        MediaFirewall(layout).teardown()
        typer.echo(f"{layout.family} {layout.table_name}: removed")
        _flush_kernel_entries()
    _run(act)


@app.command()
def status(table: str = TABLE, chain: Optional[str] = CHAIN,
           control: str = typer.Option(DEFAULT_CONTROL, "-s", "--control", help="The daemon's control socket."),
           timeout: float = typer.Option(2.0, "--timeout")) -> None:
    """Compare the live sets with the daemon's session table; exit 1 on any drift."""
    def act():
        layout = _layout(table, chain, 35000, 65000, "drop", 60)
        nft = nftmgr.Nft()
        listing = nft.list_table(layout.family, layout.table_name)
        live = nftmgr.parse_elements(listing or {}, layout)
        present = listing is not None and any(o.get("chain", {}).get("name") == layout.chain
                                              for o in listing.get("nftables", []))
        daemon = _ask_daemon(control, timeout)
        if daemon is None:
            typer.echo(f"daemon: not reachable on {control}")
            stale = len(live) + (1 if present else 0)
            typer.echo(f"{layout.family} {layout.table_name}: {'present' if present else 'absent'}, "
                       f"{len(live)} elements")
            if stale:
                typer.echo("drift: nftables state without a daemon; run `rtpproxy nft teardown`")
                raise typer.Exit(1)
            typer.echo("in sync: nothing open, nothing running")
            return
        typer.echo(f"daemon: {daemon['nft_open']} media sockets open, {daemon['nft_failures']} nft failures")
        typer.echo(f"{layout.family} {layout.table_name}: {'present' if present else 'ABSENT'}, "
                   f"{daemon['nft_live']} elements live, {daemon['nft_missing']} missing, {daemon['nft_stale']} stale")
        if not present or daemon["nft_missing"] or daemon["nft_stale"]:
            typer.echo("drift: the sets do not match the session table")
            raise typer.Exit(1)
        typer.echo("in sync")
    _run(act)


def _ask_daemon(control: str, timeout: float) -> Optional[dict[str, int]]:
    from rtpproxy.control.client import ControlClient  # noqa: PLC0415

    try:
        reply = ControlClient(parse_control(control), timeout).send("Gv nft_open nft_failures nft_live nft_missing nft_stale")
    except (OSError, TimeoutError):
        return None
    if reply.startswith("E"):
        raise NftError(f"the daemon on {control} answered {reply} to the nft counters: is it this rtpproxy?")
    return {k: int(v) for k, v in (item.split("=") for item in reply.split())}


@app.command()
def show(table: str = TABLE, chain: Optional[str] = CHAIN) -> None:
    """Packets counted by each rule, then the open media sockets with their call-ids."""
    def act():
        layout = _layout(table, chain, 35000, 65000, "drop", 60)
        nft = nftmgr.Nft()
        listing = nft.list_table(layout.family, layout.table_name)
        if listing is None:
            typer.echo(f"{layout.family} {layout.table_name}: absent")
            raise typer.Exit(1)
        elements = nftmgr.parse_elements(listing, layout)
        for rule, packets in nftmgr.parse_counters(listing).items():
            typer.echo(f"{packets:>12} packets  {rule}")
        per_call = Counter(e.call_id for e in elements)
        typer.echo(f"{len(elements)} open media sockets in {len(per_call)} calls")
        for e in sorted(elements, key=lambda e: (e.call_id, e.port)):
            typer.echo(f"  {e.host}:{e.port}  {e.call_id}")
    _run(act)
