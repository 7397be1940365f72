"""Side-by-side benchmark: our relay against rtpengine, in the same run on the same machine.

    python bench/run.py                       # full sweep (make bench)
    python bench/run.py --smoke --out DIR     # a few sessions for a few seconds (CI)

For each relay and session count, loadgen (C, pinned to core 0) sets the calls up with U/L and
plays G.711-shaped RTP both ways (50 packets/s per direction) through every call; the relay is
pinned to core 1, the 2-worker/2-thread runs to cores 1-2 (on a 2-core machine they can only
have cores 0-1, shared with the generator, and the scaling ratio is reported as not measurable). A run passes at < 0.1 % loss
and p99 < 5 ms; a relay's capacity is the most sessions of the sweep it passes at. Writes a
Markdown table and a PNG plot, and prints one summary line with the ratios ours/rtpengine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from common import HERE, OurRelay, RtpEngine, Topology, host_probe, loadgen

FULL_SWEEP = (100, 500, 1000, 1500, 2000, 3000)
LOSS_LIMIT, P99_LIMIT_US = 0.1, 5000
CORES = os.cpu_count() or 1
SCALING_MEASURABLE = CORES >= 3            # the generator keeps core 0 to itself
TWO_CORES = "1,2" if SCALING_MEASURABLE else "0,1"


def relays(smoke: bool):
    """(label, context manager factory, sends Q?) for every relay under test."""
    out = [("ours-c-1w", lambda: OurRelay("c", 1, "1"), True),
           ("ours-c-2w", lambda: OurRelay("c", 2, TWO_CORES), True)]
    if shutil.which("rtpengine"):
        out += [("rtpengine-1t", lambda: RtpEngine(1, "1"), False),
                ("rtpengine-2t", lambda: RtpEngine(2, TWO_CORES), False)]
    out.append(("ours-py", lambda: OurRelay("py", 1, "1"), True))
    if smoke:
        out = [r for r in out if r[0] in ("ours-c-1w", "rtpengine-1t", "ours-py")]
    return out


def measure(label: str, factory, sessions: int, seconds: int, query: bool, topology=None) -> dict:
    with factory() as relay:
        r = loadgen(relay.port, sessions, seconds, relay.pid, no_query=not query, topology=topology)
    forwarded = max(1, r["received"])
    r.update(relay=label, cpu_pct=100 * r["relay_cpu_s"] / r["seconds"],
             us_per_pkt=1e6 * r["relay_cpu_s"] / forwarded, sys_us_per_pkt=1e6 * r["system_cpu_s"] / forwarded,
             ok=r["loss_pct"] < LOSS_LIMIT and r["lat_p99_us"] < P99_LIMIT_US)
    return r


def kernel_relays(topo: Topology):
    """The kernel-tier comparison: all three relays in the same two-namespace topology."""
    where = dict(ns=topo.relay, host=topo.RELAY_IP)
    out = [("ns-ours-kernel", lambda: OurRelay("c", 1, "1", ("--kernel",), **where), True),
           ("ns-ours-c-1w", lambda: OurRelay("c", 1, "1", **where), True)]
    if shutil.which("rtpengine"):
        out.append(("ns-rtpengine-1t", lambda: RtpEngine(1, "1", **where), False))
    return out


def kernel_table(rows: list[dict]) -> str:
    lines = ["| relay | sessions | pps | relay µs CPU/pkt | system µs CPU/pkt | loss % | p50 µs | p99 µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['relay']} | {r['sessions']} | {r['pps']:.0f} | {r['us_per_pkt']:.2f} "
                     f"| {r['sys_us_per_pkt']:.2f} | {r['loss_pct']:.3f} | {r['lat_p50_us']} | {r['lat_p99_us']} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| relay | sessions | pps | CPU % | µs CPU/pkt | loss % | p50 µs | p99 µs | U/L p99 µs | pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['relay']} | {r['sessions']} | {r['pps']:.0f} | {r['cpu_pct']:.1f} | {r['us_per_pkt']:.2f} "
                     f"| {r['loss_pct']:.3f} | {r['lat_p50_us']} | {r['lat_p99_us']} | {r['ctl_rtt_p99_us']} "
                     f"| {'yes' if r['ok'] else 'no'} |")
    return "\n".join(lines)


def capacity(rows: list[dict], label: str) -> int:
    """Most sessions passed, counting only up to the first failure (a later pass is noise)."""
    best = 0
    for r in sorted((r for r in rows if r["relay"] == label), key=lambda r: r["sessions"]):
        if not r["ok"]:
            break
        best = r["sessions"]
    return best


def summary(rows: list[dict], at: int) -> str:
    def cpu(label):
        return next((r["us_per_pkt"] for r in rows if r["relay"] == label and r["sessions"] == at), None)
    parts = []
    for ours, theirs in (("ours-c-1w", "rtpengine-1t"), ("ours-c-2w", "rtpengine-2t")):
        a, b = cpu(ours), cpu(theirs)
        if a and b:
            parts.append(f"{ours}/{theirs}: CPU per packet at {at} sessions {a / b:.2f}x")
        ca, cb = capacity(rows, ours), capacity(rows, theirs)
        if cb:
            parts.append(f"capacity {ca}/{cb} = {ca / cb:.2f}x")
    c1, c2 = capacity(rows, "ours-c-1w"), capacity(rows, "ours-c-2w")
    if not SCALING_MEASURABLE:
        parts.append(f"ours 2 workers/1 worker: not measurable on {CORES} cores (the generator needs a core "
                     "of its own, so 2 workers would share it; needs >= 3)")
    elif c1:
        parts.append(f"ours 2 workers/1 worker capacity {c2 / c1:.2f}x")
    return "; ".join(parts) or "no comparable rows"


def kernel_section(krows: list[dict]) -> str:
    if not krows:
        return "\nKernel tier: not measured (needs root for the network namespaces).\n"
    text = ("\n## Kernel tier (generator and relay in two network namespaces; system = the whole machine's "
            "busy CPU from /proc/stat, generator included)\n\n" + kernel_table(krows) + "\n")
    by = {(r["relay"], r["sessions"]): r for r in krows}
    for n in sorted({r["sessions"] for r in krows}):
        k, u, e = by.get(("ns-ours-kernel", n)), by.get(("ns-ours-c-1w", n)), by.get(("ns-rtpengine-1t", n))
        parts = [f"{o[0]} {k['sys_us_per_pkt'] / o[1]['sys_us_per_pkt']:.2f}x" for o in
                 (("vs our userspace", u), ("vs rtpengine userspace", e)) if k and o[1]]
        if k:
            text += (f"\nAt {n} sessions the kernel tier's relay process used {k['relay_cpu_s']:.2f} CPU-s; "
                     f"system CPU per packet {', '.join(parts)}.\n")
    return text


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["relay"] for r in rows):
        pts = sorted((r["sessions"], r["us_per_pkt"], r["loss_pct"]) for r in rows if r["relay"] == label)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [max(p[2], 1e-4) for p in pts], marker="o", label=label)
    ax1.set(xlabel="sessions", ylabel="relay CPU µs per forwarded packet", title="CPU per packet")
    ax2.set(xlabel="sessions", ylabel="loss % (log; 0 shown as 1e-4)", title="Loss", yscale="log")
    ax2.axhline(LOSS_LIMIT, color="grey", linestyle=":")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, nargs="*", default=list(FULL_SWEEP))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="20 sessions for 2 s per relay")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--kernel-sessions", type=int, nargs="*", default=[1000],
                    help="session counts of the kernel-tier comparison (needs root: network namespaces)")
    args = ap.parse_args()
    if args.smoke:
        args.sessions, args.seconds, args.kernel_sessions = [20], 2, [20]
    args.out.mkdir(parents=True, exist_ok=True)
    probe_before = host_probe()
    rows = []
    for label, factory, query in relays(args.smoke):
        for n in args.sessions:
            if label == "ours-py" and n > 500:
                continue                      # the reference backend: its sweep stops early
            if any(r["relay"] == label and not r["ok"] for r in rows):
                continue                      # past its capacity: the next sizes would only fail harder
            rows.append(measure(label, factory, n, args.seconds, query))
            print(json.dumps({k: rows[-1][k] for k in ("relay", "sessions", "loss_pct", "lat_p99_us", "us_per_pkt")}),
                  flush=True)
    krows = []
    if os.geteuid() == 0 and args.kernel_sessions:
        with Topology() as topo:
            for label, factory, query in kernel_relays(topo):
                for n in args.kernel_sessions:
                    krows.append(measure(label, factory, n, args.seconds, query, topo))
                    print(json.dumps({k: krows[-1][k] for k in ("relay", "sessions", "loss_pct", "us_per_pkt",
                                                                "sys_us_per_pkt")}), flush=True)
    at = 1000 if 1000 in args.sessions else args.sessions[0]
    line = summary(rows, at)
    command = "python bench/run.py" + (" --smoke" if args.smoke else f" --seconds {args.seconds}")
    md = (f"# Relay benchmark ({time.strftime('%Y-%m-%d')}, `{command}`)\n\n{table(rows)}\n\n"
          f"Capacity (most sessions at < {LOSS_LIMIT} % loss and p99 < {P99_LIMIT_US / 1000:.0f} ms): "
          + ", ".join(f"{lab} {capacity(rows, lab)}" for lab in dict.fromkeys(r["relay"] for r in rows))
          + f"\n\nSummary: {line}\n" + kernel_section(krows)
          + f"\nBefore: {probe_before}.\nAfter: {host_probe()}.\n")
    (args.out / "latest.md").write_text(md)
    (args.out / "latest.json").write_text(json.dumps(rows + krows, indent=1))
    has_plot = plot(rows, args.out / "latest.png")
    print(md)
    print("plot:", args.out / "latest.png" if has_plot else "matplotlib not installed, no plot")


if __name__ == "__main__":
    main()
