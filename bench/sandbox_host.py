"""The loopback sandbox in its own process, remote-controlled over stdin/stdout.

``python bench/sandbox_host.py [--max-records N] [--max-seconds S]`` starts a
:class:`hexscrape.sandbox.Sandbox` (origin + gateway on free 127.0.0.1 ports),
prints one JSON line with its ``info()`` and then answers one JSON command per
stdin line with one JSON line on stdout:

* ``{"cmd": "reset"}``                      clear logs, counters and faults
* ``{"cmd": "latency", "ms": 200, "jitter": 0}``   gateway latency
* ``{"cmd": "origin_latency", "ms": 50}``     origin latency
* ``{"cmd": "stats"}``                      gateway counters
* ``{"cmd": "max_in_flight"}``              origin peak in-flight per exit IP
* ``{"cmd": "records", "path": FILE}``      gateway log as compact JSON
  ``[[ts, conn, session, kind, status], ...]`` written to FILE
* ``{"cmd": "quit"}``

The benchmark keeps the sandbox here so that its CPU never counts as the
crawler's (and the crawler never shares the sandbox's GIL). It exits on stdin
EOF (the benchmark died) or after ``--max-seconds``, so it is always bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hexscrape.sandbox import Sandbox


def _compact_records(sb: Sandbox) -> list[list[object]]:
    gw = sb.gateway

    def snap() -> list[list[object]]:
        return [
            [r["ts"], r["conn"], r["session"], r["kind"], r["status"]]
            for r in gw.log._records
        ]

    return gw._call(snap)


def handle(sb: Sandbox, msg: dict[str, object]) -> dict[str, object]:
    cmd = msg.get("cmd")
    if cmd == "reset":
        sb.reset()
        return {"ok": True}
    if cmd == "latency":
        sb.gateway.set_latency(float(msg.get("ms", 0.0)), float(msg.get("jitter", 0.0)))  # type: ignore[arg-type]
        return {"ok": True}
    if cmd == "origin_latency":
        sb.origin.set_latency(float(msg.get("ms", 0.0)), float(msg.get("jitter", 0.0)))  # type: ignore[arg-type]
        return {"ok": True}
    if cmd == "stats":
        return {"ok": True, "stats": sb.gateway.stats()}
    if cmd == "max_in_flight":
        return {"ok": True, "max_in_flight": sb.origin.max_in_flight_by_ip()}
    if cmd == "records":
        recs = _compact_records(sb)
        path = str(msg["path"])
        with open(path, "w", encoding="utf-8") as f:
            json.dump(recs, f, separators=(",", ":"))
        return {"ok": True, "count": len(recs)}
    if cmd == "quit":
        return {"ok": True, "quit": True}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--user", default="benchuser")
    p.add_argument("--password", default="b3nch:p@ss/w%rd")
    p.add_argument("--max-records", type=int, default=300_000, help="gateway log records kept")
    p.add_argument("--max-seconds", type=float, default=4 * 3600, help="exit after this long whatever happens")
    args = p.parse_args()

    sb = Sandbox(user=args.user, password=args.password, max_records=args.max_records)
    sb.start()
    timer = threading.Timer(args.max_seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    out = sys.stdout
    out.write(json.dumps(sb.info()) + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                reply = handle(sb, json.loads(line))
            except Exception as exc:  # report, keep serving
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
            if reply.get("quit"):
                break
    finally:
        sb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
