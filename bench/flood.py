"""Spoofing flood against one media port: does it cost the control plane or the real calls?

    python bench/flood.py [--sessions 200] [--seconds 5] [--pps 100000]

Runs the legitimate load (loadgen: U/L for every session, then RTP both ways) twice against our
relay (C engine, 1 worker, pinned): once alone, once while `flood` sends RTP-shaped packets from
256 sources to the first session's port. Reports U/L round-trip times, legitimate loss and the
CPU of the relay's control thread (Python, asyncio) apart from its workers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from common import HERE, OurRelay, build, cpu_seconds, loadgen


def run(sessions: int, seconds: int, pps: int, flood: bool) -> dict:
    with OurRelay(extra=("-b",)) as relay:
        main0 = cpu_seconds(relay.pid, relay.pid)
        total0 = cpu_seconds(relay.pid)
        flooder = None
        if flood:
            flooder = subprocess.Popen(["taskset", "-c", "0", str(build("flood")), "-d", "127.0.0.1:20000",
                                        "-r", str(pps), "-t", str(seconds + 3)], stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(loadgen(relay.port, sessions, seconds, relay.pid)))
        t.start()
        t.join()
        main = cpu_seconds(relay.pid, relay.pid) - main0
        total = cpu_seconds(relay.pid) - total0
        flood_out = json.loads(flooder.communicate(timeout=30)[0]) if flooder else {"sent": 0}
    return {"flood": flood, "flood_pps": pps if flood else 0, "flood_sent": flood_out["sent"], **result,
            "control_thread_cpu_s": round(main, 3), "relay_cpu_s": round(total, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--pps", type=int, default=100000)
    args = ap.parse_args()
    rows = [run(args.sessions, args.seconds, args.pps, flood) for flood in (False, True)]
    lines = ["| flood | sessions | U/L rtt p50 µs | U/L rtt p99 µs | legit loss % | control thread CPU s | relay CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['flood_pps'] or 'none'} pps | {r['sessions']} | {r['ctl_rtt_p50_us']} | {r['ctl_rtt_p99_us']} "
                     f"| {r['loss_pct']:.3f} | {r['control_thread_cpu_s']} | {r['relay_cpu_s']} |")
    text = "\n".join(lines)
    out = HERE / "results" / "flood.md"
    out.write_text(f"# Spoofing flood (`python bench/flood.py --sessions {args.sessions} --seconds {args.seconds} "
                   f"--pps {args.pps}`)\n\n{text}\n\nRaw:\n\n```\n" + "\n".join(json.dumps(r) for r in rows) + "\n```\n")
    print(text)
    print(f"written to {Path(out).relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
