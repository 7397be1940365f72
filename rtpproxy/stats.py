"""Daemon-wide counters, named as rtpproxy's G command names them (rtpp_stats.c)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from rtpproxy.engine_api import Counters

# Every name G accepts, in rtpproxy's order. Those we have no mechanism for (resizer, player,
# RTP analysis) are true zeros: this relay never resizes, plays or analyses.
G_NAMES = (
    "nsess_created nsess_destroyed nsess_timeout nsess_complete nsess_nortp nsess_owrtp nsess_nortcp "
    "nsess_owrtcp nplrs_created nplrs_destroyed npkts_rcvd npkts_played npkts_relayed npkts_resizer_in "
    "npkts_resizer_out npkts_resizer_discard npkts_discard total_duration ncmds_rcvd ncmds_rcvd_ndups "
    "ncmds_succd ncmds_errs ncmds_repld rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs pps_in"
).split()


# Our extension of G (not rtpproxy names): the nftables sets against the session table.
NFT_G_NAMES = ("nft_open", "nft_failures", "nft_live", "nft_missing", "nft_stale")
EXTRA_G_NAMES = ("latch_refused",)


@dataclass
class Stats:
    nsess_created: int = 0
    nsess_destroyed: int = 0
    nsess_timeout: int = 0
    nsess_complete: int = 0
    nsess_nortp: int = 0
    nsess_owrtp: int = 0
    nsess_nortcp: int = 0
    nsess_owrtcp: int = 0
    total_duration: float = 0.0
    ncmds_rcvd: int = 0
    ncmds_rcvd_ndups: int = 0
    ncmds_succd: int = 0
    ncmds_errs: int = 0
    ncmds_repld: int = 0
    refused: int = 0                 # sources the latching policy refused (G latch_refused, our extension)
    # packet totals of streams already destroyed; live streams are added on demand
    done_rcvd: int = 0
    done_relayed: int = 0
    done_discard: int = 0

    def absorb(self, c: Counters) -> None:
        self.done_rcvd += c.packets
        self.done_relayed += c.relayed
        self.done_discard += c.dropped

    def session_ended(self, duration: float, rtp_dirs: int, rtcp_dirs: int) -> None:
        self.nsess_destroyed += 1
        self.total_duration += duration
        self.nsess_nortp += rtp_dirs == 0
        self.nsess_owrtp += rtp_dirs == 1
        self.nsess_nortcp += rtcp_dirs == 0
        self.nsess_owrtcp += rtcp_dirs == 1

    def values(self, live: list[Counters], pps_in: float) -> dict[str, float]:
        """Every G name with its current value."""
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {name: own.get(name, 0) for name in G_NAMES}
        out["npkts_rcvd"] = self.done_rcvd + sum(c.packets for c in live)
        out["npkts_relayed"] = self.done_relayed + sum(c.relayed for c in live)
        out["npkts_discard"] = self.done_discard + sum(c.dropped for c in live)
        out["pps_in"] = pps_in
        out["latch_refused"] = self.refused
        return out
