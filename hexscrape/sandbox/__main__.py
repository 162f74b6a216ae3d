"""``python -m hexscrape.sandbox``: run the loopback origin + gateway until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence

from .errors import SandboxError
from .gateway import BanRule, parse_ban
from .runner import DEFAULT_PASSWORD, DEFAULT_USER, SandboxCore, check_loopback, new_event_loop

PROG = "python -m hexscrape.sandbox"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Loopback sandbox for hexscrape: an httpbin-like origin (HTTP + HTTPS with a "
            "self-signed cert) and a rotating-proxy gateway with sticky sessions "
            "(proxy user '<USER>-session-<ID>'). Nothing leaves 127.0.0.0/8: every "
            "non-loopback host is routed to the origin."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to listen on (non-loopback is refused)")
    p.add_argument("--gateway-port", type=int, default=8899, help="proxy gateway port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=8880, help="plain-HTTP origin port (0 = any free port)")
    p.add_argument("--https-port", type=int, default=8443, help="HTTPS origin port (0 = any free port)")
    p.add_argument("--user", default=DEFAULT_USER, help="proxy user; clients log in as USER-session-ID")
    p.add_argument("--password", default=DEFAULT_PASSWORD, help="proxy password")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="append one JSON line per gateway request/tunnel to FILE")
    p.add_argument("--latency-ms", type=float, default=0.0, help="gateway delay added to each request/tunnel")
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="extra uniform random gateway delay in [0, JITTER_MS]")
    p.add_argument("--origin-latency-ms", type=float, default=0.0, help="origin delay added to each response")
    p.add_argument("--origin-jitter-ms", type=float, default=0.0,
                   help="extra uniform random origin delay in [0, ORIGIN_JITTER_MS]")
    p.add_argument("--reject-password", action="store_true",
                   help="answer 407 to every request, as if the credentials were revoked")
    p.add_argument("--ban", metavar="SESSION:AFTER:MODE[:RETRY]", action="append", default=[],
                   help="after AFTER successful requests of SESSION answer MODE (403, 429 or captcha; "
                        "429 sends Retry-After: RETRY, default 30); repeatable")
    p.add_argument("--ready-file", metavar="FILE", default=None,
                   help="once listening, write a JSON file with all URLs/ports/credentials "
                        "(removed again on exit)")
    p.add_argument("--max-records", type=int, default=100_000,
                   help="request-log records kept in memory")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="echo every gateway log record to stderr")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop even if uvloop is installed")
    return p


def _error(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _banner(core: SandboxCore) -> str:
    info = core.info()
    lines = [
        f"hexscrape sandbox running (pid {info['pid']}); Ctrl-C or SIGTERM to stop",
        f"  gateway       {info['gateway_url']}   proxy user {core.user}-session-<ID>",
        f"  http origin   {info['http_origin']}",
        f"  https origin  {info['https_origin']}  (self-signed)",
        "  exit IP of session sN is 127.1.<N//250>.<N%250+1>; non-loopback hosts go to the origin",
        "use it with:",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in info["env"].items()]
    return "\n".join(lines)


def _write_ready(path: str, info: dict[str, object]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


async def _serve(core: SandboxCore, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await core.start()
    try:
        if args.verbose:
            core.gateway.log.echo = sys.stderr
        if not args.quiet:
            print(_banner(core), flush=True)
        if args.ready_file:
            _write_ready(args.ready_file, core.info())
        await stop.wait()
    finally:
        await core.stop()
        if args.ready_file:
            try:
                os.unlink(args.ready_file)
            except FileNotFoundError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        check_loopback(args.host)
        bans: list[BanRule] = [parse_ban(spec) for spec in args.ban]
    except (SandboxError, ValueError) as exc:
        return _error(str(exc), 2)
    for name in ("gateway_port", "http_port", "https_port"):
        if not 0 <= getattr(args, name) <= 65535:
            return _error(f"--{name.replace('_', '-')} must be in 0..65535", 2)
    try:
        core = SandboxCore(
            args.user, args.password, host=args.host, gateway_port=args.gateway_port,
            http_port=args.http_port, https_port=args.https_port, log_path=args.log,
            latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
            origin_latency_ms=args.origin_latency_ms, origin_jitter_ms=args.origin_jitter_ms,
            reject_password=args.reject_password, bans=bans, max_records=args.max_records,
        )
    except SandboxError as exc:
        return _error(str(exc), 2)
    try:
        loop = new_event_loop(False if args.no_uvloop else None)
    except SandboxError as exc:
        return _error(str(exc), 1)
    try:
        loop.run_until_complete(_serve(core, args))
    except SandboxError as exc:
        return _error(str(exc), 1)
    except KeyboardInterrupt:  # signal arrived before the handler was installed
        pass
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    if not args.quiet:
        print("sandbox stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
