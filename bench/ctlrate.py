"""Control-plane throughput while media flows: U/L/D over UDP as fast as the relay answers.

    python bench/ctlrate.py [--sessions 1000] [--seconds 10] [--window 64]

loadgen (C, core 0) sets up --sessions calls and plays media through them; with -w it also keeps
--window control commands in flight on a second socket during the media period, each slot
cycling U, L, D of its own short call. The relay runs on core 1. Each relay is run twice, media
alone and media + commands, so the relay's CPU per command is the difference over the commands
answered. A second pass paces the commands (--rate per second, one in flight) to read their
latency at a signalling rate rather than at saturation, --repeat runs of --paced-seconds per
relay (the p99 of a short run moves a lot on a shared VM, so every run is shown). A reply's latency ends at the kernel's
receive timestamp (SO_TIMESTAMPNS), not when loadgen gets round to it between media packets.
Writes results/ctlrate.md.
"""
from __future__ import annotations

import argparse
import shutil
import time

from common import HERE, OurRelay, RtpEngine, host_probe, loadgen


def measure(label: str, factory, sessions: int, seconds: int, window: int, query: bool) -> dict:
    with factory() as relay:
        alone = loadgen(relay.port, sessions, seconds, relay.pid, no_query=not query)
    with factory() as relay:
        busy = loadgen(relay.port, sessions, seconds, relay.pid, no_query=not query, churn=window)
    cmds = max(1, busy["churn_cmds"])
    return {"relay": label, "sessions": sessions, "per_s": busy["churn_per_s"], "p50_us": busy["churn_p50_us"],
            "p99_us": busy["churn_p99_us"], "errors": busy["churn_errors"],
            "relay_us_per_cmd": 1e6 * (busy["relay_cpu_s"] - alone["relay_cpu_s"]) / cmds,
            "media_loss_pct": busy["loss_pct"], "media_p99_us": busy["lat_p99_us"],
            "media_p99_alone_us": alone["lat_p99_us"]}


def paced_latency(label: str, factory, sessions: int, seconds: int, rate: int, query: bool, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        with factory() as relay:
            runs.append(loadgen(relay.port, sessions, seconds, relay.pid, no_query=not query, churn_rate=rate))
    p99s = sorted(r["churn_p99_us"] for r in runs)
    return {"relay": label, "sessions": sessions, "runs": runs, "p99_median": p99s[len(p99s) // 2],
            "errors": sum(r["churn_errors"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rate", type=int, default=200, help="paced U/L/D per second for the latency row")
    ap.add_argument("--repeat", type=int, default=3, help="paced runs per relay")
    ap.add_argument("--paced-seconds", type=int, default=30,
                    help="length of a paced run: 6000 commands, so that one stall of the VM does not make the p99")
    args = ap.parse_args()
    probe_before = host_probe()
    relays = [("ours-c-1w", lambda: OurRelay("c", 1, "1"), True),
              # the packaged default: every call's ports opened and closed in nftables
              ("ours-c-1w-nft", lambda: OurRelay("c", 1, "1", ("--nft", "--no-kernel")), True)]
    if shutil.which("rtpengine"):
        relays.append(("rtpengine-1t", lambda: RtpEngine(1, "1"), False))
    rows = [measure(label, f, args.sessions, args.seconds, args.window, q) for label, f, q in relays]
    paced = [paced_latency(label, f, args.sessions, args.paced_seconds, args.rate, q, args.repeat)
             for label, f, q in relays]
    lines = [f"# Control plane under media ({time.strftime('%Y-%m-%d')}, `python bench/ctlrate.py --sessions "
             f"{args.sessions} --seconds {args.seconds} --window {args.window} --repeat {args.repeat} --paced-seconds {args.paced_seconds}`)", "",
             "| relay | live sessions | U/L/D answered per s | relay µs CPU/command | p50 µs | p99 µs | error replies "
             "| media loss % | media p99 µs (alone) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['relay']} | {r['sessions']} | {r['per_s']:.0f} | {r['relay_us_per_cmd']:.1f} "
                     f"| {r['p50_us']} | {r['p99_us']} | {r['errors']} | {r['media_loss_pct']:.3f} "
                     f"| {r['media_p99_us']} ({r['media_p99_alone_us']}) |")
    lines += ["", f"Latency at a signalling rate ({args.rate} U/L/D per second, one at a time, same media load, "
              f"{args.repeat} runs of {args.paced_seconds} s each):", "",
              "| relay | live sessions | p50 µs per run | p99 µs per run | median p99 µs | error replies "
              "| media p99 µs per run |", "|---|---|---|---|---|---|---|"]
    for r in paced:
        def each(key, runs=r["runs"]):
            return ", ".join(str(x[key]) for x in runs)
        lines.append(f"| {r['relay']} | {r['sessions']} | {each('churn_p50_us')} | {each('churn_p99_us')} "
                     f"| {r['p99_median']} | {r['errors']} | {each('lat_p99_us')} |")
    lines += ["", f"Before: {probe_before}.", f"After: {host_probe()}."]
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / "ctlrate.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
