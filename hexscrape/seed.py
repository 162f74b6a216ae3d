"""Seed the shared frontier: ``python -m hexscrape.seed FILE|- [--redis-url URL] [--prefix ip]``.

Each line is validated like ``scrapy crawl ip -a urls=FILE`` does (blank and
``#`` lines skipped); valid URLs are queued in ``<prefix>:requests`` only if
their fingerprint is new to ``<prefix>:dupefilter`` (one atomic script per
batch), so seeding the same file twice queues nothing the second time. Prints
``N new, N duplicate, N invalid``.

Fingerprints are Scrapy's default request fingerprint of ``GET <url>``, the
same as the crawler's (unless a project changes REQUEST_FINGERPRINTER_CLASS).

Exit codes: 0 done (even if some lines were invalid), 2 bad arguments or
unreadable file, 4 Redis unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from hexscrape.config import redact_url
from hexscrape.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_REDIS
from hexscrape.urls import check_url_file, iter_lines, url_problem

MAX_INVALID_WARNINGS = 20
DEFAULT_PREFIX = "ip"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seed",
        description="Queue URLs in the shared Redis frontier (duplicates are queued once).",
    )
    p.add_argument("source", metavar="FILE", help="URL file, one per line; '-' reads stdin")
    p.add_argument("--redis-url", default=None,
                   help="Redis of the frontier (default: env REDIS_URL)")
    p.add_argument("--prefix", default=None,
                   help=f"key prefix (default: env REDIS_KEY_PREFIX, else {DEFAULT_PREFIX!r})")
    p.add_argument("--batch", type=int, default=500, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = args.redis_url or os.environ.get("REDIS_URL")
    prefix = (args.prefix or os.environ.get("REDIS_KEY_PREFIX") or DEFAULT_PREFIX).strip()
    if not url:
        return _error("no Redis: pass --redis-url or set REDIS_URL", EXIT_CONFIG)
    if not prefix or any(c.isspace() for c in prefix):
        return _error(f"bad key prefix {prefix!r}", EXIT_CONFIG)
    problem = check_url_file(args.source)
    if problem:
        return _error(problem, EXIT_CONFIG)

    import redis

    from hexscrape.frontier import Frontier, connect

    try:
        client = connect(url)
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return _error(f"cannot reach Redis at {redact_url(url)}: {_one_line(exc)}", EXIT_REDIS)
    frontier = Frontier(client, prefix, "seed")

    from scrapy import Request
    from scrapy.utils.request import fingerprint

    from hexscrape.scheduler import seed_entry

    invalid = 0

    def skip(lineno: int, line: str, why: str) -> None:
        nonlocal invalid
        invalid += 1
        if invalid <= MAX_INVALID_WARNINGS:
            print(f"seed: skipped invalid URL on line {lineno}: {line[:200]!r} {why}",
                  file=sys.stderr)
        elif invalid == MAX_INVALID_WARNINGS + 1:
            print("seed: more invalid URLs: further ones are only counted", file=sys.stderr)

    def entries() -> Iterator[tuple[str, str]]:
        """(fingerprint, seed entry) of each valid line."""
        for lineno, line in iter_lines(args.source):
            why = url_problem(line)
            if why is None:
                try:
                    fp = fingerprint(Request(line)).hex()
                except ValueError as exc:
                    why = _one_line(exc)
                else:
                    yield fp, seed_entry(line)
                    continue
            skip(lineno, line, why)

    try:
        frontier.check_types()
        new, dup = frontier.seed(entries(), batch=max(1, args.batch))
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return _error(f"lost Redis at {redact_url(url)}: {_one_line(exc)}", EXIT_REDIS)
    except Exception as exc:  # FrontierError (wrong key type), other Redis errors
        return _error(f"Redis frontier at {redact_url(url)}: {_one_line(exc)}", EXIT_CONFIG)
    finally:
        client.close()
    print(f"{new} new, {dup} duplicate, {invalid} invalid")
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


def _error(msg: str, code: int) -> int:
    print(f"hexscrape: error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
