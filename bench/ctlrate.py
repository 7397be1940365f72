"""Control-plane throughput while media flows: U/L/D over UDP as fast as the relay answers.

    python bench/ctlrate.py [--sessions 1000] [--seconds 10] [--window 32]

loadgen (core 0) sets up --sessions calls and plays media through them; meanwhile this script
(also core 0) runs call set-ups and tear-downs (U, L, D: three commands each) against the same
relay (core 1), keeping --window requests in flight. Reports commands/s answered, their latency
p50/p99, and the media loss loadgen saw at the same time. Appends to results/ctlrate.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import time

from common import HERE, OurRelay, RtpEngine, build

LIVE_TIMEOUT = 60


def wait_live(port: int, sessions: int) -> None:
    """Until the relay holds the load's sessions (our I command; rtpengine: a fixed wait)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        end = time.monotonic() + LIVE_TIMEOUT
        while time.monotonic() < end:
            try:
                s.sendto(b"live I", ("127.0.0.1", port))
                text = s.recv(4096).decode()
                if f"active sessions: {sessions}" in text:
                    return
            except OSError:
                pass
            time.sleep(0.2)
    raise RuntimeError("the load did not come up")


def hammer(port: int, seconds: float, window: int) -> dict:
    """U/L/D cycles with `window` commands in flight; returns counts and latencies."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.settimeout(1.0)
    s.bind(("127.0.0.1", 0))
    me = s.getsockname()[1]
    ids = itertools.count()
    inflight: dict[bytes, tuple[float, str, int]] = {}
    lat: list[float] = []
    errors = 0

    def send(kind: str, call: int) -> None:
        cookie = f"c{next(ids)}".encode()
        cmd = {"U": f"U cr{call}@bench 127.0.0.1 {me} ft", "L": f"L cr{call}@bench 127.0.0.1 {me} ft tt",
               "D": f"D cr{call}@bench ft tt"}[kind]
        inflight[cookie] = (time.perf_counter(), kind, call)
        s.sendto(cookie + b" " + cmd.encode(), ("127.0.0.1", port))

    calls = itertools.count()
    for _ in range(window):
        send("U", next(calls))
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        try:
            data = s.recv(4096)
        except TimeoutError:
            errors += len(inflight)
            break
        cookie, _, reply = data.partition(b" ")
        sent = inflight.pop(cookie, None)
        if sent is None:
            continue
        t0, kind, call = sent
        lat.append(time.perf_counter() - t0)
        if reply.startswith(b"E"):
            errors += 1
        nxt = {"U": "L", "L": "D"}.get(kind)
        if nxt:
            send(nxt, call)
        else:
            send("U", next(calls))
    elapsed = time.perf_counter() - start
    s.close()
    lat.sort()
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6)) if lat else (lambda q: 0)
    return {"commands": len(lat), "per_s": round(len(lat) / elapsed), "p50_us": pick(0.5), "p99_us": pick(0.99),
            "errors": errors}


def run(label: str, factory, sessions: int, seconds: int, window: int, query: bool) -> dict:
    with factory() as relay:
        gen = subprocess.Popen(["taskset", "-c", "0", str(build("loadgen")), "-c", f"127.0.0.1:{relay.port}",
                                "-n", str(sessions), "-t", str(seconds + 8), "-p", str(relay.pid)]
                               + ([] if query else ["-q"]), stdout=subprocess.PIPE, text=True)
        if query:
            wait_live(relay.port, sessions)
        else:
            time.sleep(3 + sessions / 1000)
        time.sleep(1)
        os.sched_setaffinity(0, {0})
        result = hammer(relay.port, seconds, window)
        media = json.loads(gen.communicate(timeout=seconds + 120)[0])
    result.update(relay=label, sessions=sessions, media_loss_pct=media["loss_pct"],
                  media_p99_us=media["lat_p99_us"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    rows = [run("ours-c-1w", lambda: OurRelay("c", 1, "1"), args.sessions, args.seconds, args.window, True)]
    import shutil  # noqa: PLC0415

    if shutil.which("rtpengine"):
        rows.append(run("rtpengine-1t", lambda: RtpEngine(1, "1"), args.sessions, args.seconds, args.window, False))
    lines = [f"# Control plane under media ({time.strftime('%Y-%m-%d')}, `python bench/ctlrate.py --sessions "
             f"{args.sessions} --seconds {args.seconds} --window {args.window}`)", "",
             "| relay | live sessions | U/L/D per s | p50 µs | p99 µs | errors | media loss % | media p99 µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['relay']} | {r['sessions']} | {r['per_s']} | {r['p50_us']} | {r['p99_us']} | {r['errors']} "
                     f"| {r['media_loss_pct']:.3f} | {r['media_p99_us']} |")
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / "ctlrate.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
