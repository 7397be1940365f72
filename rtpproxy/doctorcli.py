"""`rtpproxy doctor`: what on this host will silently eat media, and the command that fixes it."""
from __future__ import annotations

from typing import List, Optional

import typer

from rtpproxy import syscheck
from rtpproxy.errors import ConfigError, NftError
from rtpproxy.interfaces import parse_all


def live_rpf_failures(table: str, chain: Optional[str]) -> Optional[int]:
    """The live counter of packets failing the reverse-path check, if the daemon's table is loaded."""
    from rtpproxy import nftmgr  # noqa: PLC0415

    try:
        admin = nftmgr.parse_admin_chain(chain) if chain else None
        layout = nftmgr.NftLayout(table=table, admin_chain=admin)
        listing = nftmgr.Nft().list_table(layout.family, layout.table_name)
    except (NftError, ValueError):
        return None
    if listing is None:
        return None
    return nftmgr.parse_counters(listing).get(nftmgr.RPF_COMMENT)


def doctor(
    listen: Optional[List[str]] = typer.Option(None, "-l", "--listen", help="Media addresses, as given to the daemon."),
    listen6: Optional[List[str]] = typer.Option(None, "-6", "--listen6", help="IPv6 media addresses, as given to the daemon."),
    min_port: int = typer.Option(35000, "-m", "--min-port"),
    max_port: int = typer.Option(65000, "-M", "--max-port"),
    peer: Optional[List[str]] = typer.Option(None, "--peer", help="Network media comes from (repeatable), e.g. 198.51.100.0/24."),
    kernel: Optional[bool] = typer.Option(None, "--kernel/--no-kernel", help="As given to the daemon: --kernel makes what the kernel tier needs an error, --no-kernel skips it."),
    nft_table: str = typer.Option("rtpproxy", "--nft-table"),
    nft_chain: Optional[str] = typer.Option(None, "--nft-chain"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output for monitoring."),
) -> None:
    """Check reverse-path filtering, routes to peers, port range, limits and buffers.
    Exit 0: clean, 1: warnings, 2: errors."""
    try:
        binds = parse_all(listen or [], "-l", 4, None) + parse_all(listen6 or [], "-6", 6, None)
        peers = syscheck.validate_peers(peer or [])
    except ConfigError as exc:
        typer.echo(f"rtpproxy: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        typer.echo(f"rtpproxy: error: --peer: {exc}", err=True)
        raise typer.Exit(2) from None
    binds = binds or parse_all(["*"], "-l", 4, None)
    facts = syscheck.gather(binds, peers, live_rpf_failures(nft_table, nft_chain))
    findings = syscheck.evaluate(facts, min_port, max_port, len(binds), kernel)
    if as_json:
        typer.echo(syscheck.to_json(findings))
    else:
        for f in findings:
            typer.echo(f.line())
    raise typer.Exit(syscheck.exit_code(findings))
