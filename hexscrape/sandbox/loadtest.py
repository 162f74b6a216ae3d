"""Load generator: how many requests/s the sandbox gateway sustains.

``python -m hexscrape.sandbox.loadtest --seconds 5 --concurrency 50 --sessions 40``

Starts a sandbox in a subprocess (so the generator does not share its GIL) unless
``--gateway`` points at a running one, then drives it with raw keep-alive
asyncio connections: plain-HTTP absolute-URI requests, and HTTPS requests inside
CONNECT tunnels that are reused for many requests. Every response is checked to
carry the session's exit IP. The point is to prove the sandbox is never the
bottleneck of scraper benchmarks (those reach ~1-2k req/s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

from .gateway import exit_ip_for
from .runner import DEFAULT_PASSWORD, DEFAULT_USER, new_event_loop
from .tls import insecure_client_context

_CL_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


class _Conn(asyncio.Protocol):
    """Minimal keep-alive HTTP client connection: one outstanding request at a time."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        m = _CL_RE.search(buf, 0, end + 2)
        total = end + 4 + (int(m.group(1)) if m else 0)
        if len(buf) < total:
            return
        self.buf = buf[total:]
        w, self.waiter = self.waiter, None
        if not w.done():
            w.set_result(buf[:total])

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def roundtrip(self, data: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        if self.buf:
            self._check()
        return await self.waiter


async def _worker(mode: str, gw: tuple[str, int], auth: bytes, ip: bytes, deadline: float,
                  stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    while time.perf_counter() < deadline:
        try:
            transport, conn = await loop.create_connection(_Conn, gw[0], gw[1])
            if mode == "https":
                resp = await conn.roundtrip(
                    b"CONNECT httpbin.org:443 HTTP/1.1\r\nHost: httpbin.org:443\r\n"
                    b"Proxy-Authorization: " + auth + b"\r\n\r\n")
                if not resp.startswith(b"HTTP/1.1 200"):
                    stats["errors"] += 1
                    transport.close()
                    continue
                tls = await loop.start_tls(transport, conn, insecure_client_context(),
                                           server_hostname="httpbin.org")
                assert tls is not None
                conn.transport = tls  # type: ignore[assignment]
                transport = tls  # type: ignore[assignment]
                req = b"GET /ip?n=1 HTTP/1.1\r\nHost: httpbin.org\r\n\r\n"
            else:
                req = (b"GET http://httpbin.org/ip?n=1 HTTP/1.1\r\nHost: httpbin.org\r\n"
                       b"Proxy-Authorization: " + auth + b"\r\n\r\n")
            ok = 0
            while time.perf_counter() < deadline:
                resp = await conn.roundtrip(req)
                if resp.startswith(b"HTTP/1.1 200") and ip in resp:
                    ok += 1
                else:
                    stats["errors"] += 1
            stats["ok"] += ok
            transport.close()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            stats["errors"] += 1
            stats.setdefault("last_error", 0)
            if time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            del exc


def _run_client(args: dict[str, Any]) -> dict[str, int]:
    """One client process: ``concurrency`` workers for ``seconds``; returns counts."""
    loop = new_event_loop(False if args["no_uvloop"] else None)
    stats = {"ok": 0, "errors": 0}

    async def main() -> None:
        deadline = time.perf_counter() + args["seconds"]
        workers = []
        for i in range(args["concurrency"]):
            n = args["offset"] + i
            sid = f"s{n % args['sessions'] + 1:03d}"
            raw = f"{args['user']}-session-{sid}:{args['password']}".encode()
            auth = b"Basic " + base64.b64encode(raw)
            ip = b'"' + exit_ip_for(sid).encode() + b'"'
            workers.append(_worker(args["mode"], args["gw"], auth, ip, deadline, stats))
        await asyncio.gather(*workers)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return stats


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_load(mode: str, gw: tuple[str, int], user: str, password: str, seconds: float,
             concurrency: int, sessions: int, procs: int, no_uvloop: bool,
             server_pid: int | None) -> dict[str, Any]:
    """Drive the gateway in ``procs`` client processes; return totals and req/s."""
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    offsets = [sum(per[:i]) for i in range(procs)]
    jobs = [dict(mode=mode, gw=gw, user=user, password=password, seconds=seconds,
                 concurrency=c, sessions=sessions, offset=o, no_uvloop=no_uvloop)
            for c, o in zip(per, offsets, strict=False) if c]
    cpu0 = _cpu_seconds(server_pid) if server_pid else None
    t0 = time.perf_counter()
    if len(jobs) == 1:
        results = [_run_client(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_run_client, jobs)
    elapsed = time.perf_counter() - t0
    cpu1 = _cpu_seconds(server_pid) if server_pid else None
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    out: dict[str, Any] = {"mode": mode, "ok": ok, "errors": errors, "seconds": round(elapsed, 2),
                           "req_per_s": round(ok / seconds, 1)}
    if cpu0 is not None and cpu1 is not None:
        out["sandbox_cpu_pct"] = round(100 * (cpu1 - cpu0) / elapsed, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hexscrape.sandbox.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each mode (default 5)")
    p.add_argument("--concurrency", type=int, default=50, help="client connections (default 50)")
    p.add_argument("--sessions", type=int, default=40, help="distinct sessions s001.. (default 40)")
    p.add_argument("--mode", choices=["http", "https", "both"], default="both", help="default both")
    p.add_argument("--procs", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--gateway", default=None,
                   help="URL of a running gateway (default: start a sandbox subprocess)")
    p.add_argument("--user", default=DEFAULT_USER)
    p.add_argument("--password", default=DEFAULT_PASSWORD)
    p.add_argument("--no-uvloop", action="store_true", help="default asyncio loop in clients and sandbox")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="pass --log FILE to the spawned sandbox (measures file-logging cost)")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    args = p.parse_args(argv)

    proc: subprocess.Popen[bytes] | None = None
    tmp = tempfile.TemporaryDirectory(prefix="hexscrape-loadtest-")
    try:
        if args.gateway:
            u = urlsplit(args.gateway)
            gw = (u.hostname or "127.0.0.1", u.port or 80)
            server_pid = None
        else:
            ready = os.path.join(tmp.name, "ready.json")
            cmd = [sys.executable, "-m", "hexscrape.sandbox", "--quiet", "--gateway-port", "0",
                   "--http-port", "0", "--https-port", "0", "--ready-file", ready,
                   "--user", args.user, "--password", args.password]
            if args.no_uvloop:
                cmd.append("--no-uvloop")
            if args.log:
                cmd += ["--log", args.log]
            proc = subprocess.Popen(cmd)
            deadline = time.monotonic() + 15
            while not os.path.exists(ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("sandbox failed to start", file=sys.stderr)
                    return 1
                time.sleep(0.02)
            with open(ready) as f:
                info = json.load(f)
            gw = ("127.0.0.1", int(info["gateway_port"]))
            server_pid = proc.pid
        modes = ["http", "https"] if args.mode == "both" else [args.mode]
        for mode in modes:
            res = run_load(mode, gw, args.user, args.password, args.seconds, args.concurrency,
                           args.sessions, max(1, args.procs), args.no_uvloop, server_pid)
            if args.json:
                print(json.dumps(res), flush=True)
            else:
                cpu = f", sandbox CPU {res['sandbox_cpu_pct']}%" if "sandbox_cpu_pct" in res else ""
                print(f"{mode:5s}: {res['req_per_s']:8.1f} req/s  ({res['ok']} ok, {res['errors']} errors "
                      f"in {args.seconds:g}s, {args.concurrency} conns, {args.sessions} sessions{cpu})",
                      flush=True)
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
