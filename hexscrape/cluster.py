"""The primary of a hexscrape cluster: start, watch, respawn and drain crawlers.

Port of the Node.js ``cluster`` primary of the reference design. Its only jobs:
start N ``scrapy crawl ip`` processes, give each a disjoint slice of the
session pool, respawn the ones that die, turn a shutdown signal into a graceful
drain with a deadline, and report. It never scrapes, makes no HTTP request and
imports neither Scrapy nor Twisted (a test checks this), so it stays small: a
worker's peak-RSS baseline (what Scrapy's ``MemoryUsage`` measures, and which
a spawned child inherits from its parent) is not inflated by the primary.

Workers share the Redis frontier (``hexscrape.frontier``); each runs in its own
process session, so a terminal's Ctrl-C reaches the primary only, which then
sends each worker exactly one SIGTERM (Scrapy's graceful close). Workers report
to the Redis stream ``<prefix>:stats`` (``hexscrape.extensions.StatsReporter``,
record format in :mod:`hexscrape.statsagg`); the primary folds the records into
a live progress line (or one log line per interval), a summary table, a JSON
summary file and, optionally, Prometheus metrics.

Exit codes of the primary (``run_cluster.py``):

* 0 -- every worker finished because the frontier is done, or every worker
  drained in time after SIGTERM/SIGINT/SIGHUP;
* 1 -- unexpected error in the primary, or a worker failed (instead of
  draining) after the shutdown signal;
* 2 -- bad arguments or configuration (one-line message, nothing crawled);
* 3 -- at least one slot was given up (crash loop, or a worker configuration
  error); the run stops early when no worker is left;
* 4 -- Redis unavailable (no ``redis-server`` binary for the embedded one, or
  the given ``--redis-url`` does not answer);
* 5 -- the shutdown deadline passed (or a second signal came) and at least one
  worker had to be SIGKILLed. Nothing queued in Redis is lost: the requests it
  had leased go back to the queue when its slot starts again (next run) or
  when a live worker reclaims them (heartbeat TTL + reap interval, ~13 s).

Embedded Redis: without ``--redis-url``/``REDIS_URL`` the primary runs a
private ``redis-server`` whose append-only data lives in ``<output>/redis``.
An interrupted run keeps it, so running ``run_cluster.py`` again with the same
``--output`` resumes the frontier where it stopped; a run that ends with the
frontier done deletes it (``--fresh`` deletes it at start). A lock file keeps
two primaries off the same output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from hexscrape.config import DEFAULT_POOL_SIZE, ConfigError, load_config
from hexscrape.exitcodes import EXIT_CONFIG
from hexscrape.exitcodes import EXIT_REDIS as EXIT_REDIS_WORKER
from hexscrape.logredact import RedactSecrets
from hexscrape.sessions import slice_bounds
from hexscrape.statsagg import (
    RECORD_FIELD,
    SUMMARY_HEADERS,
    CrashTracker,
    RateMeter,
    RespawnPolicy,
    StatsAggregator,
    logfmt,
    progress_fields,
    progress_text,
    summary_rows,
)
from hexscrape.urls import check_url_file

logger = logging.getLogger("hexscrape.cluster")

PROG = "run_cluster.py"
SPIDER = "ip"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GAVE_UP = 3
EXIT_REDIS = 4
EXIT_KILLED = 5

DEFAULT_MAX_WORKERS = 16
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_STATS_INTERVAL = 5.0
DEFAULT_MEMUSAGE_LIMIT_MB = 1024
DEFAULT_MEMUSAGE_CHECK_INTERVAL = 5.0
DEFAULT_SANDBOX_COUNT = 1000
SANDBOX_HOST = "sandbox.hexscrape.test"
"""Host of the sandbox demo URLs: non-loopback, so the sandbox gateway routes it
to its origin whatever ports a later sandbox gets (a resumed run still works);
``.test`` never resolves on the real internet."""

ASSIGNED_BY_PRIMARY = ("SESSION_RANGE", "SESSION_SLICE_SIZE", "WORKER_SLOT",
                       "SESSION_RANGE_START", "SESSION_RANGE_END")
"""Environment variables the primary sets per worker (whatever the user had)."""

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TICK = 0.2  # seconds: the main loop's longest wait, i.e. its reaction time


def default_workers() -> int:
    """``min(cpu count, 16)``, like the reference design."""
    return max(1, min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS))


# -- feeds -------------------------------------------------------------------


class FlushPerItem:
    """Feed post-processing plugin: flush the item file after every write.

    Scrapy's file feed storage is a buffered file, so the last few KB of items
    would die with a SIGKILLed worker although their requests were done. With
    this, every item line is in the OS before the next one is produced.
    """

    def __init__(self, file: IO[bytes], feed_options: dict[str, Any]) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        n = self.file.write(data)
        self.file.flush()
        return n

    def close(self) -> None:
        self.file.close()


def feeds_setting(path: Path) -> str:
    """FEEDS for one worker: append JSON lines to *path*, flushed per item."""
    return json.dumps({
        str(path): {
            "format": "jsonlines",
            "encoding": "utf-8",
            "overwrite": False,
            "postprocessing": [f"{__name__}.FlushPerItem"],
        }
    })


# -- arguments ---------------------------------------------------------------


class UsageError(Exception):
    """A bad argument or environment value: one line, exit 2."""


def _env_default(name: str, default: Any) -> Any:
    value = os.environ.get(name)
    return default if value in (None, "") else value


def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= *minimum*."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return convert


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535)")
    return value


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value


def _slot_setting(text: str) -> tuple[int, str, str]:
    slot, sep, rest = text.partition(":")
    if not sep or not slot.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not SLOT:NAME=VALUE")
    name, value = _setting(rest)
    return int(slot), name, value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Show each default once: appended unless the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _from_env(value: Any, env_name: str, conv: Any, default: Any) -> Any:
    """The option's value, else the environment variable's (checked), else default."""
    if value is not None:
        return value
    raw = os.environ.get(env_name)
    if raw in (None, ""):
        return default
    try:
        return conv(raw)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"environment variable {env_name}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "Run a hexscrape cluster: N `scrapy crawl ip` workers sharing one Redis "
            "frontier, each with a disjoint slice of the proxy session pool; dead "
            "workers are respawned, SIGTERM/Ctrl-C drains them gracefully. "
            f"`{PROG} seed --help` seeds the frontier without crawling."
        ),
        epilog=(
            "Environment: WORKERS, SESSION_POOL_SIZE, REDIS_URL, REDIS_KEY_PREFIX, "
            "IDLE_CLOSE_SECONDS and MEMUSAGE_LIMIT_MB stand in for the options of the "
            "same meaning; HEX_USER, HEX_PASS and HEX_GATEWAY are passed to the "
            "workers (--sandbox sets them). "
            "Exit codes: 0 frontier done, or drained in time after a signal; 1 internal "
            "error or a worker failed while draining; 2 bad arguments or configuration; "
            "3 a slot was given up; 4 Redis "
            "unavailable; 5 a worker had to be SIGKILLed at shutdown. "
            "Without --redis-url an embedded redis-server keeps the frontier in "
            "OUTPUT/redis: an interrupted run resumes when started again with the same "
            "--output, and the directory is deleted once a run completes the frontier."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("workers")
    g.add_argument("--workers", "-n", metavar="N", type=_positive_int, default=None,
                   help="crawler processes (env WORKERS; default min(cpu count, 16), "
                        f"here {default_workers()})")
    g.add_argument("--pool-size", metavar="P", type=_positive_int, default=None,
                   help="sticky sessions to split among the workers (env SESSION_POOL_SIZE; "
                        f"default {DEFAULT_POOL_SIZE})")
    g.add_argument("--shutdown-timeout", metavar="SECONDS", type=_seconds,
                   default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help="time workers get to drain after SIGTERM/Ctrl-C before SIGKILL")
    g.add_argument("--idle-close", metavar="SECONDS", type=_seconds, default=None,
                   help="how long the whole frontier must stay empty before the workers "
                        "finish (env IDLE_CLOSE_SECONDS; default: the crawler's default)")
    g.add_argument("--memusage-limit-mb", metavar="MB", type=_non_negative_int, default=None,
                   help="a worker above this much memory closes with memusage_exceeded and "
                        "is respawned; 0 disables (env MEMUSAGE_LIMIT_MB; default "
                        f"{DEFAULT_MEMUSAGE_LIMIT_MB})")
    g.add_argument("--memusage-check-interval", metavar="SECONDS", type=_positive_seconds,
                   default=DEFAULT_MEMUSAGE_CHECK_INTERVAL,
                   help="time between a worker's memory checks")
    g.add_argument("--max-crashes", metavar="K", type=_non_negative_int, default=5,
                   help="crashes a slot may have within --crash-window; one more gives it up")
    g.add_argument("--crash-window", metavar="SECONDS", type=_positive_seconds, default=60.0,
                   help="time over which a slot's crashes are counted")
    g.add_argument("--respawn-delay", metavar="SECONDS", type=_seconds, default=0.5,
                   help="backoff before respawning a crashed worker; doubles with each "
                        "further crash within the window")
    g.add_argument("--max-respawn-delay", metavar="SECONDS", type=_seconds, default=30.0,
                   help="cap on the respawn backoff")
    g.add_argument("--set", "-s", dest="settings", metavar="NAME=VALUE", type=_setting,
                   action="append", default=[],
                   help="Scrapy setting for every worker; repeatable")
    g.add_argument("--slot-set", dest="slot_settings", metavar="SLOT:NAME=VALUE",
                   type=_slot_setting, action="append", default=[],
                   help="Scrapy setting for one slot only; repeatable (for experiments)")

    g = p.add_argument_group("frontier")
    g.add_argument("--urls", metavar="FILE",
                   help="seed the frontier with the URLs in FILE (one a line, '-' = stdin) "
                        "before the workers start")
    g.add_argument("--redis-url", metavar="URL", default=_env_default("REDIS_URL", None),
                   help="Redis holding the frontier (env REDIS_URL; default: an embedded "
                        "redis-server with its data in OUTPUT/redis)")
    g.add_argument("--key-prefix", metavar="PREFIX",
                   default=_env_default("REDIS_KEY_PREFIX", SPIDER),
                   help="Redis key prefix (env REDIS_KEY_PREFIX)")
    g.add_argument("--fresh", action="store_true",
                   help="embedded Redis only: delete the frontier an interrupted run left "
                        "in OUTPUT/redis instead of resuming it")

    g = p.add_argument_group("sandbox")
    g.add_argument("--sandbox", action="store_true",
                   help="zero-configuration demo: start the local sandbox (python -m "
                        "hexscrape.sandbox), point HEX_GATEWAY/HEX_USER/HEX_PASS at it and "
                        "seed --count sandbox URLs")
    g.add_argument("--count", metavar="N", type=_non_negative_int, default=DEFAULT_SANDBOX_COUNT,
                   help=f"with --sandbox: seed N URLs http(s)://{SANDBOX_HOST}/ip?n=<i>")

    g = p.add_argument_group("output and stats")
    g.add_argument("--output", "-o", metavar="DIR", type=Path, default=Path("output"),
                   help="directory for items-<slot>.jsonl (JSON lines, appended across "
                        "respawns and runs), logs and the summary")
    g.add_argument("--stats-file", metavar="FILE", type=Path, default=None,
                   help="JSON summary written at the end (default DIR/summary.json)")
    g.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the worker logs worker-<slot>.log go (default OUTPUT/logs)")
    g.add_argument("--stats-interval", metavar="SECONDS", type=_positive_seconds,
                   default=DEFAULT_STATS_INTERVAL,
                   help="time between worker stats records and progress log lines")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress line on stderr (default: when stderr is a terminal; "
                        "otherwise one log line per interval)")
    g.add_argument("--metrics-port", metavar="PORT", type=_port, default=None,
                   help="serve Prometheus metrics on this port (default: off)")
    g.add_argument("--metrics-host", metavar="HOST", default="127.0.0.1",
                   help="address for --metrics-port")
    return p


@dataclass
class Options:
    """Validated command line."""

    workers: int
    pool_size: int
    shutdown_timeout: float
    idle_close: float | None
    memusage_limit_mb: int
    memusage_check_interval: float
    policy: RespawnPolicy
    settings: list[tuple[str, str]]
    slot_settings: list[tuple[int, str, str]]
    urls: str | None
    redis_url: str | None
    key_prefix: str
    fresh: bool
    sandbox: bool
    count: int
    output: Path
    stats_file: Path
    log_dir: Path
    stats_interval: float
    progress: bool | None
    metrics_port: int | None
    metrics_host: str


def parse_args(argv: Sequence[str]) -> Options:
    """Parse and validate; raise UsageError with a one-line message."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    workers = _from_env(ns.workers, "WORKERS", _positive_int, default_workers())
    pool = _from_env(ns.pool_size, "SESSION_POOL_SIZE", _positive_int, DEFAULT_POOL_SIZE)
    idle = _from_env(ns.idle_close, "IDLE_CLOSE_SECONDS", _seconds, None)
    memlimit = _from_env(
        ns.memusage_limit_mb, "MEMUSAGE_LIMIT_MB", _non_negative_int, DEFAULT_MEMUSAGE_LIMIT_MB
    )
    if workers > pool:
        raise UsageError(
            f"--workers {workers} is larger than the session pool "
            f"(SESSION_POOL_SIZE={pool}): each worker needs at least one session"
        )
    for slot, name, _ in ns.slot_settings:
        if slot >= workers:
            raise UsageError(f"--slot-set {slot}:{name}: slot {slot} is outside 0..{workers - 1}")
    if ns.urls:
        problem = check_url_file(ns.urls)
        if problem:
            raise UsageError(f"--urls: {problem}")
    if ns.redis_url:
        parts = urlsplit(ns.redis_url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise UsageError(f"--redis-url {redact_url(ns.redis_url)!r} is not a redis:// URL")
        if ns.fresh:
            raise UsageError("--fresh only applies to the embedded Redis (no --redis-url)")
    if not ns.key_prefix or any(c.isspace() for c in ns.key_prefix):
        raise UsageError(f"--key-prefix {ns.key_prefix!r} must be a non-empty word")
    if ns.max_respawn_delay < ns.respawn_delay:
        raise UsageError("--max-respawn-delay must be >= --respawn-delay")
    output = ns.output.resolve()  # redis-server chdirs to its data dir
    return Options(
        workers=workers,
        pool_size=pool,
        shutdown_timeout=ns.shutdown_timeout,
        idle_close=idle,
        memusage_limit_mb=memlimit,
        memusage_check_interval=ns.memusage_check_interval,
        policy=RespawnPolicy(
            max_crashes=ns.max_crashes,
            window=ns.crash_window,
            base_delay=ns.respawn_delay,
            max_delay=ns.max_respawn_delay,
        ),
        settings=ns.settings,
        slot_settings=ns.slot_settings,
        urls=ns.urls if ns.urls in (None, "-") else str(Path(ns.urls).resolve()),
        redis_url=ns.redis_url,
        key_prefix=ns.key_prefix,
        fresh=ns.fresh,
        sandbox=ns.sandbox,
        count=ns.count,
        output=output,
        stats_file=ns.stats_file or output / "summary.json",
        log_dir=ns.log_dir or output / "logs",
        stats_interval=ns.stats_interval,
        progress=ns.progress,
        metrics_port=ns.metrics_port,
        metrics_host=ns.metrics_host,
    )


def redact_url(url: str) -> str:
    """*url* without its password (for logs and the summary)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable URL>"


# -- worker slots ----------------------------------------------------------------

STARTING = "starting"  # spawned, no stats record yet
RUNNING = "running"
BACKOFF = "backoff"  # crashed, waiting to be respawned
FINISHED = "finished"  # exited 0 because the frontier is done: not respawned
STOPPED = "stopped"  # drained on a signal (ours at shutdown, or someone else's)
GAVE_UP = "gave_up"
KILLED = "killed"  # SIGKILLed at the shutdown deadline
EXITED = "exited"  # ended abnormally while the cluster shut down

ALL_STATES = (STARTING, RUNNING, BACKOFF, FINISHED, STOPPED, GAVE_UP, KILLED, EXITED)


@dataclass
class Slot:
    """One worker slot: its slice, its current process and its history."""

    index: int
    start: int
    end: int
    crashes: CrashTracker
    state: str = STARTING
    proc: subprocess.Popen[bytes] | None = None
    instance: str | None = None
    spawned_at: float = 0.0
    log_offset: int = 0
    respawn_at: float | None = None
    spawns: int = 0
    sigterm_sent: bool = False
    error: str | None = None
    exits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None

    @property
    def respawns(self) -> int:
        return max(0, self.spawns - 1)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")
_LOG_ERROR = re.compile(r"\] (ERROR|CRITICAL): ")


def log_tail_error(path: Path, offset: int, secrets: Sequence[str] = ()) -> str | None:
    """The most telling line a worker wrote to its log since *offset*.

    In order: the crawl command's ``hexscrape: error: ...`` (config errors),
    the last line of a traceback, the last ERROR/CRITICAL log message, the
    last line. Secrets are masked even so.
    """
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 32768))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return None
    pick = next((ln for ln in reversed(lines) if ln.startswith("hexscrape: error:")), None)
    if pick is None:
        pick = next((ln for ln in reversed(lines) if _EXC_LINE.match(ln)), None)
    if pick is None:
        for ln in reversed(lines):
            m = _LOG_ERROR.search(ln)
            if m:
                pick = ln[m.end():]
                break
    pick = (pick or lines[-1])[:500]
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            pick = pick.replace(secret, "***")
    return pick


# -- the primary -----------------------------------------------------------------


class Cluster:
    """Supervise the worker slots until they are all done or the run is stopped."""

    def __init__(
        self,
        opts: Options,
        *,
        redis_url: str,
        worker_env: Mapping[str, str],
        secrets: Sequence[str] = (),
        redis_client: Any = None,
    ) -> None:
        self.opts = opts
        self.redis_url = redis_url
        self.worker_env = dict(worker_env)
        self.secrets = list(secrets)
        self.run_id = uuid.uuid4().hex[:12]
        self.stream = f"{opts.key_prefix}:stats"
        self.agg = StatsAggregator(run=self.run_id)
        self.rate = RateMeter(window=max(10.0, 3 * opts.stats_interval))
        self.slots = [
            Slot(k, *slice_bounds(k, opts.workers, opts.pool_size), CrashTracker(opts.policy))
            for k in range(opts.workers)
        ]
        self.redis = redis_client
        self.last_id = "0-0"
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.draining = False
        self.drain_signal: str | None = None
        self.deadline: float | None = None
        self.forced = False
        self.pending_signals: list[int] = []
        self.snapshot: dict[str, Any] = {}
        self.frontier_status: Any = None
        self._next_poll = 0.0
        self._next_live = 0.0
        self.want_snapshot = False  # set by the metrics server
        self._frontier: Any = None
        self._redis_warned = False
        self._next_report = 0.0
        self._live: Any = None
        opts.log_dir.mkdir(parents=True, exist_ok=True)

    # -- signals ---------------------------------------------------------------

    def on_signal(self, signum: int, frame: Any) -> None:
        """Signal handler: only records the signal; the loop acts on it."""
        self.pending_signals.append(signum)
        if len(self.pending_signals) >= 2 or self.draining:
            # Second signal: SIGKILL at once, even if the loop is busy.
            self._kill_all_now()

    def _kill_all_now(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    def handle_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            if not self.draining:
                self.begin_drain(_signal_name(signum))
            elif not self.forced:
                self.forced = True
                logger.warning("%s again: killing all workers now", _signal_name(signum))
                self._kill_all_now()

    def begin_drain(self, why: str) -> None:
        """First shutdown signal: one SIGTERM per worker, no more respawns."""
        self.draining = True
        self.drain_signal = why
        self.deadline = time.monotonic() + self.opts.shutdown_timeout
        alive = [s for s in self.slots if s.alive]
        logger.info(
            "%s: draining %d worker(s), %.0fs before SIGKILL; send it again to kill now",
            why, len(alive), self.opts.shutdown_timeout,
        )
        for slot in self.slots:
            if slot.state == BACKOFF:
                slot.state = STOPPED
                slot.respawn_at = None
            if slot.alive and not slot.sigterm_sent:
                slot.sigterm_sent = True
                assert slot.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)

    # -- workers ---------------------------------------------------------------

    def worker_command(self, slot: Slot) -> list[str]:
        o = self.opts
        items = (o.output / f"items-{slot.index}.jsonl").resolve()
        settings: list[tuple[str, str]] = [
            ("FEEDS", feeds_setting(items)),
            ("HEXSCRAPE_STATS_INTERVAL", repr(o.stats_interval)),
            ("MEMUSAGE_ENABLED", "True" if o.memusage_limit_mb else "False"),
            ("MEMUSAGE_LIMIT_MB", str(o.memusage_limit_mb)),
            ("MEMUSAGE_CHECK_INTERVAL_SECONDS", repr(o.memusage_check_interval)),
        ]
        settings += o.settings
        settings += [(n, v) for k, n, v in o.slot_settings if k == slot.index]
        cmd = [sys.executable, "-m", "scrapy", "crawl", SPIDER]
        for name, value in settings:
            cmd += ["-s", f"{name}={value}"]
        return cmd

    def env_for(self, slot: Slot) -> dict[str, str]:
        env = dict(self.worker_env)
        for name in ASSIGNED_BY_PRIMARY:
            env.pop(name, None)
        env.update(
            WORKER_SLOT=str(slot.index),
            SESSION_RANGE_START=str(slot.start),
            SESSION_RANGE_END=str(slot.end),
            SESSION_POOL_SIZE=str(self.opts.pool_size),
            REDIS_URL=self.redis_url,
            REDIS_KEY_PREFIX=self.opts.key_prefix,
            HEXSCRAPE_RUN_ID=self.run_id,
            HEXSCRAPE_INSTANCE=f"{self.run_id}-{slot.index}-{slot.spawns}",
            HEXSCRAPE_SUPERVISOR_PID=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("SCRAPY_SETTINGS_MODULE", "hexscrape.settings")
        if self.opts.idle_close is not None:
            env["IDLE_CLOSE_SECONDS"] = repr(self.opts.idle_close)
        return env

    def log_path(self, slot: Slot) -> Path:
        return self.opts.log_dir / f"worker-{slot.index}.log"

    def spawn(self, slot: Slot) -> None:
        if slot.spawns:
            self.release_slice(slot)
        slot.spawns += 1
        env = self.env_for(slot)
        path = self.log_path(slot)
        with path.open("ab") as log:
            log.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} run {self.run_id} slot "
                f"{slot.index} sessions [{slot.start}, {slot.end}) spawn {slot.spawns}\n".encode()
            )
            log.flush()
            slot.log_offset = log.tell()
            # Own session: a terminal's Ctrl-C goes to the primary only, which
            # then drains the workers with exactly one SIGTERM each.
            slot.proc = subprocess.Popen(
                self.worker_command(slot), cwd=PROJECT_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        slot.instance = env["HEXSCRAPE_INSTANCE"]
        slot.spawned_at = time.monotonic()
        slot.state = STARTING
        slot.sigterm_sent = False
        slot.respawn_at = None
        logger.info(
            "slot %d: started worker pid %d with sessions [%d, %d)%s",
            slot.index, slot.proc.pid, slot.start, slot.end,
            f" (respawn {slot.respawns})" if slot.respawns else "",
        )

    def release_slice(self, slot: Slot) -> None:
        """The slot's previous worker is dead: free its session-slice lease now,
        so the successor need not wait for the lease to expire."""
        if self.redis is None:
            return
        try:
            from hexscrape.slicelease import release_slot
        except ImportError:
            return
        try:
            release_slot(self.redis, self.opts.key_prefix, str(slot.index), self.opts.pool_size)
        except Exception as exc:  # the successor then waits for the lease TTL
            logger.warning("slot %d: could not release its session leases: %s", slot.index, exc)

    def reap(self) -> None:
        """Notice exited workers and decide what each exit means."""
        exited = []
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                exited.append(slot)
        if not exited:
            return
        # The final record was XADDed before the process exited: read it first.
        self.read_stats(block_ms=None)
        now = time.monotonic()
        for slot in exited:
            self._on_exit(slot, now)

    def _on_exit(self, slot: Slot, now: float) -> None:
        assert slot.proc is not None and slot.instance is not None
        rc = slot.proc.returncode
        pid = slot.proc.pid
        slot.proc = None
        reason = self.agg.final_reason(slot.instance)
        rss = self.agg.rss(slot.instance)
        info: dict[str, Any] = {
            "pid": pid,
            "code": rc if rc >= 0 else None,
            "signal": _signal_name(-rc) if rc < 0 else None,
            "reason": reason,
            "uptime_s": round(now - slot.spawned_at, 1),
            "rss_bytes": rss,
        }
        slot.exits.append(info)
        how = info["signal"] or f"code {rc}"
        final = f"finish reason {reason}" if reason else "no final stats record"
        if slot.state == KILLED:
            return
        if self.draining:
            if self.forced and rc == -signal.SIGKILL:
                slot.state = KILLED
                logger.warning("slot %d: worker pid %d killed", slot.index, pid)
            elif rc == 0 or rc == -signal.SIGTERM:
                slot.state = STOPPED
                logger.info("slot %d: worker pid %d drained (%s, %s)", slot.index, pid, how, final)
            else:
                slot.state = EXITED
                slot.error = log_tail_error(self.log_path(slot), slot.log_offset, self.secrets)
                logger.warning(
                    "slot %d: worker pid %d exited during shutdown (%s, %s)",
                    slot.index, pid, how, final,
                )
            return
        if rc == 0 and reason == "finished":
            slot.state = FINISHED
            logger.info("slot %d: worker pid %d finished: the frontier is done", slot.index, pid)
            return
        if rc == 0 and reason == "shutdown":
            slot.state = STOPPED
            logger.warning(
                "slot %d: worker pid %d was stopped by a signal from outside the "
                "cluster; not respawned", slot.index, pid,
            )
            return
        slot.error = log_tail_error(self.log_path(slot), slot.log_offset, self.secrets)
        if rc == EXIT_CONFIG:
            slot.state = GAVE_UP
            logger.error(
                "slot %d: worker pid %d has a configuration error; not respawned: %s",
                slot.index, pid, slot.error or "(no message)",
            )
            return
        delay = slot.crashes.crashed(now)
        detail = f"{how}, {final}"
        if delay is None:
            slot.state = GAVE_UP
            logger.error(
                "slot %d: worker pid %d died (%s); given up after %d crashes within "
                "%.0fs; last message: %s (log: %s)",
                slot.index, pid, detail, len(slot.crashes.times), self.opts.policy.window,
                slot.error or "-", self.log_path(slot),
            )
            return
        slot.state = BACKOFF
        slot.respawn_at = now + delay
        logger.warning(
            "slot %d: worker pid %d died (%s); respawning in %.1fs (crash %d of %d "
            "allowed within %.0fs)%s",
            slot.index, pid, detail, delay, len(slot.crashes.times),
            self.opts.policy.max_crashes, self.opts.policy.window,
            f": {slot.error}" if slot.error and rc > 0 else "",
        )

    def respawn_due(self) -> None:
        if self.draining:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == BACKOFF and slot.respawn_at is not None and now >= slot.respawn_at:
                self.spawn(slot)

    def kill_remaining(self) -> None:
        """The deadline passed: SIGKILL whoever is still draining."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                logger.warning(
                    "slot %d: worker pid %d did not drain in time: SIGKILL",
                    slot.index, slot.proc.pid,
                )
                slot.state = KILLED
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
        for slot in self.slots:
            if slot.proc is not None:
                try:
                    slot.proc.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
                    logger.error("slot %d: pid %d survives SIGKILL", slot.index, slot.proc.pid)
                    continue
                if slot.state != KILLED:
                    slot.state = KILLED
                self._on_exit(slot, time.monotonic())

    # -- stats -----------------------------------------------------------------

    def init_stream(self) -> None:
        """Read only records written after this point (the stream outlives runs)."""
        if self.redis is None:
            return
        try:
            last = self.redis.xrevrange(self.stream, count=1)
            if last:
                self.last_id = _text(last[0][0])
        except Exception as exc:
            self._redis_problem(exc)

    def read_stats(self, block_ms: int | None) -> None:
        """Fold new stream records in; block up to *block_ms* (None: don't)."""
        if self.redis is None:
            if block_ms:
                time.sleep(block_ms / 1000)
            return
        try:
            while True:
                resp = self.redis.xread({self.stream: self.last_id}, count=500, block=block_ms)
                if not resp:
                    return
                for _key, entries in resp:
                    for entry_id, fields in entries:
                        self.last_id = _text(entry_id)
                        raw = fields.get(RECORD_FIELD.encode()) or fields.get(RECORD_FIELD)
                        if raw is None:
                            continue
                        try:
                            record = json.loads(raw)
                        except ValueError:
                            continue
                        if self.agg.add(record):
                            self._on_record(record)
                block_ms = None  # got something: drain the rest without waiting
                if len(entries) < 500:
                    return
        except Exception as exc:  # redis.RedisError, OSError: keep supervising
            self._redis_problem(exc)
            time.sleep(TICK)

    def _redis_problem(self, exc: BaseException) -> None:
        if not self._redis_warned:
            self._redis_warned = True
            logger.warning(
                "cannot read worker stats from Redis (%s: %s); still supervising",
                type(exc).__name__, exc,
            )

    def _on_record(self, record: Mapping[str, Any]) -> None:
        if self._redis_warned:
            self._redis_warned = False
        inst = record.get("instance")
        for slot in self.slots:
            if slot.instance == inst and slot.state == STARTING:
                slot.state = RUNNING

    def poll_frontier(self) -> None:
        """Ask the frontier itself how much is queued and leased (cheap Lua call)."""
        if self.redis is None:
            return
        try:
            if self._frontier is None:
                from hexscrape.frontier import Frontier

                self._frontier = Frontier(self.redis, self.opts.key_prefix, "primary")
            st = self._frontier.status()
        except Exception as exc:  # ImportError, redis errors: fall back on reports
            self._redis_problem(exc)
            self.frontier_status = None
            return
        self.frontier_status = st

    def frontier_figures(self) -> tuple[int | None, int | None]:
        """(queued, leased): from the frontier if we could ask it, else as reported."""
        st = self.frontier_status
        if st is not None:
            return st.queued + st.start_urls, st.leased
        return self.agg.frontier()

    def frontier_done(self) -> bool:
        st = self.frontier_status
        return st is not None and st.empty

    def alive_count(self) -> int:
        return sum(1 for s in self.slots if s.alive)

    def fields(self) -> dict[str, Any]:
        totals = self.agg.totals()
        queued, leased = self.frontier_figures()
        return progress_fields(
            totals, queued=queued, leased=leased, rate=self.rate.rate(),
            alive=self.alive_count(), workers=len(self.slots),
            respawns=sum(s.respawns for s in self.slots),
            gave_up=sum(1 for s in self.slots if s.state == GAVE_UP),
        )

    def update_progress(self, force: bool = False) -> None:
        """Refresh what we show: frontier size and metrics snapshot at most once
        a second, the live line twice a second, a log line once per interval."""
        now = time.monotonic()
        if force or now >= self._next_poll:
            self._next_poll = now + min(1.0, self.opts.stats_interval)
            self.poll_frontier()
            self.rate.sample(now, self.agg.totals().done)
            if self.want_snapshot:
                self.snapshot = self.build_summary(None)
        if self._live is not None:
            if force or now >= self._next_live:
                self._next_live = now + 0.5
                self._live.update(progress_text(self.fields()), refresh=True)
        elif force or now >= self._next_report:
            logger.info("%s", logfmt("progress", self.fields()))
        if now >= self._next_report:
            self._next_report = now + self.opts.stats_interval

    # -- summary ---------------------------------------------------------------

    def outcome(self) -> tuple[str, int]:
        """(outcome word, exit code) of the run as it stands."""
        gave_up = any(s.state == GAVE_UP for s in self.slots)
        if self.forced or any(s.state == KILLED for s in self.slots):
            return "killed", EXIT_KILLED
        if gave_up:
            return "gave_up", EXIT_GAVE_UP
        if any(s.state == EXITED for s in self.slots):
            return "failed_while_draining", EXIT_ERROR
        if self.draining:
            return "drained", EXIT_OK
        if all(s.state == FINISHED for s in self.slots):
            return "finished", EXIT_OK
        if all(s.state in (FINISHED, STOPPED) for s in self.slots):
            return "stopped", EXIT_OK
        return "running", EXIT_OK

    def build_summary(self, exit_code: int | None) -> dict[str, Any]:
        outcome, code = self.outcome()
        totals = self.agg.totals()
        queued, leased = self.frontier_figures()
        slots = []
        for s in self.slots:
            fig = self.agg.slot_figures(str(s.index))
            newest = self.agg.newest(str(s.index))
            slots.append({
                "slot": s.index,
                "session_range": [s.start, s.end],
                "state": s.state,
                "pid": s.proc.pid if s.proc is not None else None,
                "spawns": s.spawns,
                "respawns": s.respawns,
                "crashes": s.crashes.total,
                **fig.as_dict(),
                "rss_bytes": newest.get("rss_bytes") if newest else None,
                "exits": list(s.exits),
                "error": s.error,
            })
        return {
            "run_id": self.run_id,
            "started": _iso(self.started_wall),
            "ended": _iso(time.time()) if exit_code is not None else None,
            "duration_s": round(time.monotonic() - self.started, 1),
            "outcome": outcome,
            "exit_code": code if exit_code is None else exit_code,
            "shutdown_signal": self.drain_signal,
            "workers": len(self.slots),
            "pool_size": self.opts.pool_size,
            "redis": redact_url(self.redis_url),
            "stream": self.stream,
            "output": str(self.opts.output),
            "totals": totals.as_dict(),
            "queued": queued,
            "leased": leased,
            "respawns": sum(s.respawns for s in self.slots),
            "gave_up": [s.index for s in self.slots if s.state == GAVE_UP],
            "slots": slots,
        }

    # -- main loop ---------------------------------------------------------------

    def finished(self) -> bool:
        if self.draining:
            return not any(s.alive for s in self.slots)
        return all(s.state in (FINISHED, STOPPED, GAVE_UP) for s in self.slots)

    def run(self) -> int:
        self.init_stream()
        for slot in self.slots:
            if self.pending_signals:
                break
            self.spawn(slot)
        self._next_report = time.monotonic() + self.opts.stats_interval
        while True:
            self.handle_signals()
            self.reap()
            if self.finished():
                break
            if self.draining and self.deadline is not None and time.monotonic() >= self.deadline:
                self.kill_remaining()
                break
            self.respawn_due()
            self.read_stats(block_ms=int(TICK * 1000))
            self.update_progress()
        self.read_stats(block_ms=None)
        self.update_progress(force=True)
        outcome, code = self.outcome()
        if outcome == "gave_up" and not any(s.state in (FINISHED, STOPPED) for s in self.slots):
            logger.error("no worker left: every slot was given up")
        return code

    def shutdown_now(self) -> None:
        """Last resort on an internal error: drain, then kill, what is left."""
        if any(s.alive for s in self.slots):
            if not self.draining:
                self.begin_drain("internal error")
            deadline = self.deadline or time.monotonic()
            while any(s.alive for s in self.slots) and time.monotonic() < deadline:
                for s in self.slots:
                    if s.proc is not None and s.proc.poll() is not None:
                        self._on_exit(s, time.monotonic())
                time.sleep(0.05)
            self.kill_remaining()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


# -- services: lock, Redis, sandbox, seeding, metrics -------------------------------


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Keep a second primary off this output dir (and its embedded Redis)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / ".run_cluster.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UsageError(
                    f"another {PROG} is using {output} (lock {path}); wait for it or "
                    "pick another --output"
                ) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ServiceError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def connect_redis(url: str) -> Any:
    """A redis-py client that answered PING, or ServiceError(EXIT_REDIS)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        msg = f"Redis at {redact_url(url)} does not answer: {exc}"
        raise ServiceError(msg, EXIT_REDIS) from None
    return client


def start_embedded_redis(data_dir: Path, fresh: bool) -> Any:
    """A private, persistent redis-server keeping its data in *data_dir*."""
    from hexscrape.redisserver import INSTALL_HINT, RedisServer, RedisServerError, find_redis_server

    if find_redis_server() is None:
        raise ServiceError(INSTALL_HINT, EXIT_REDIS)
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
        logger.info("--fresh: deleted the previous frontier in %s", data_dir)
    resumed = data_dir.exists() and any(data_dir.glob("appendonly*"))
    try:
        server = RedisServer(data_dir=data_dir, persistent=True).start()
    except (RedisServerError, OSError) as exc:
        raise ServiceError(f"embedded redis-server: {exc}", EXIT_REDIS) from None
    logger.info(
        "embedded redis-server on %s, data in %s%s", server.url, data_dir,
        " (resuming the frontier of an earlier run)" if resumed else "",
    )
    return server


class SandboxProcess:
    """``python -m hexscrape.sandbox`` as a child process (keeps its CPU off ours)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 20.0) -> SandboxProcess:
        tmp = Path(tempfile.mkdtemp(prefix="hexscrape-sandbox-"))
        ready = tmp / "ready.json"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hexscrape.sandbox", "--gateway-port", "0",
                 "--http-port", "0", "--https-port", "0", "--ready-file", str(ready),
                 "--quiet"],
                cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if ready.exists():
                    self.info = json.loads(ready.read_text())
                    return self
                if self.proc.poll() is not None:
                    raise ServiceError(
                        f"the sandbox exited at start (code {self.proc.returncode}); "
                        f"see {self.log_path}", EXIT_ERROR,
                    )
                time.sleep(0.05)
            self.stop()
            raise ServiceError("the sandbox did not start in time", EXIT_ERROR)
        finally:
            with contextlib.suppress(OSError):
                ready.unlink()
            with contextlib.suppress(OSError):
                tmp.rmdir()

    def env(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.info.get("env", {}).items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def sandbox_urls(count: int) -> Iterator[str]:
    """Demo URLs: http and https alternately, so both paths get exercised."""
    for i in range(count):
        scheme = "https" if i % 2 else "http"
        yield f"{scheme}://{SANDBOX_HOST}/ip?n={i}"


def run_seed(source: str, env: Mapping[str, str], prefix: str, stdin: str | None = None) -> None:
    """Seed the frontier with :func:`hexscrape.seed.main` in a child process
    (the seeder imports Scrapy, the primary must not); raise ServiceError."""
    code = "import sys; from hexscrape.seed import main; sys.exit(main(sys.argv[1:]))"
    kw: dict[str, Any] = {}
    if stdin is not None:
        kw["input"] = stdin.encode()
    elif source != "-":  # '-': the URLs come from our own stdin
        kw["stdin"] = subprocess.DEVNULL
    proc = subprocess.run(  # own session: a Ctrl-C meanwhile lets seeding finish
        [sys.executable, "-c", code, source, "--prefix", prefix], cwd=PROJECT_ROOT,
        env=dict(env), capture_output=True, start_new_session=True, **kw,
    )
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0:
        msg = err[-1] if err else f"exit {proc.returncode}"
        msg = msg.removeprefix("hexscrape: error: ")
        code_ = {EXIT_CONFIG: EXIT_USAGE, EXIT_REDIS_WORKER: EXIT_REDIS}.get(
            proc.returncode, EXIT_ERROR
        )
        raise ServiceError(f"seeding from {source}: {msg}", code_)
    for line in err:
        logger.warning("%s", line)
    out = proc.stdout.decode("utf-8", "replace").strip()
    what = "the sandbox URLs" if stdin is not None else source
    logger.info("seeded the frontier from %s: %s", what, out or "done")


class MetricsServer:
    """Prometheus exposition of the primary's latest snapshot (own thread)."""

    def __init__(self, cluster: Cluster, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.cluster = cluster
        cluster.want_snapshot = True
        cluster.snapshot = cluster.build_summary(None)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ServiceError(
                f"--metrics-port {port} on {host}: {exc.strerror or exc}", EXIT_USAGE
            ) from None
        self.port = self.server.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.cluster.snapshot  # replaced atomically by the main loop
        if not snap:
            return
        c = CounterMetricFamily("hexscrape_requests", "Requests with an outcome, by slot",
                                labels=["slot", "outcome"])
        items = CounterMetricFamily("hexscrape_items", "Items scraped, by slot", labels=["slot"])
        retries = CounterMetricFamily("hexscrape_retries", "Retries, by slot", labels=["slot"])
        respawns = CounterMetricFamily("hexscrape_respawns", "Worker respawns, by slot",
                                       labels=["slot"])
        rss = GaugeMetricFamily("hexscrape_worker_rss_bytes", "Worker RSS", labels=["slot"])
        up = GaugeMetricFamily("hexscrape_worker_up", "1 if the slot has a live worker",
                               labels=["slot"])
        states = GaugeMetricFamily("hexscrape_slots", "Worker slots by state", labels=["state"])
        sess = CounterMetricFamily("hexscrape_session_requests",
                                   "Requests per sticky session", labels=["session", "outcome"])
        for s in snap["slots"]:
            slot = str(s["slot"])
            c.add_metric([slot, "ok"], s["requests_ok"])
            c.add_metric([slot, "failed"], s["requests_failed"])
            items.add_metric([slot], s["items"])
            retries.add_metric([slot], s["retries"])
            respawns.add_metric([slot], s["respawns"])
            if s.get("rss_bytes") is not None:
                rss.add_metric([slot], s["rss_bytes"])
            up.add_metric([slot], 1 if s["pid"] else 0)
        for state in ALL_STATES:
            states.add_metric([state], sum(1 for s in snap["slots"] if s["state"] == state))
        for sid, counts in snap["totals"].get("sessions", {}).items():
            for outcome in ("ok", "failed"):
                sess.add_metric([sid, outcome], counts.get(outcome, 0))
        yield from (c, items, retries, respawns, rss, up, states, sess)
        for name, key, doc in (
            ("hexscrape_frontier_queued", "queued", "Requests queued in the frontier"),
            ("hexscrape_frontier_leased", "leased", "Requests leased by workers"),
        ):
            if snap.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=snap[key])
        yield GaugeMetricFamily("hexscrape_workers", "Configured worker slots",
                                value=snap["workers"])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- output ------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def print_summary(summary: Mapping[str, Any], console: Any) -> None:
    """The end-of-run table; fits 80 columns (the last column wraps)."""
    from rich import box
    from rich.table import Table

    rows = summary_rows(summary)
    table = Table(
        title=f"hexscrape run {summary['run_id']}: {summary['outcome']} "
              f"(exit {summary['exit_code']}, {summary['duration_s']}s)",
        box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, collapse_padding=True,
        pad_edge=False,
    )
    for j, h in enumerate(SUMMARY_HEADERS):
        last = j == len(SUMMARY_HEADERS) - 1
        table.add_column(
            h, justify="left" if h in ("sessions", "state", "last exit") else "right",
            no_wrap=not last, overflow="fold" if last else "ellipsis",
            min_width=None if last else max(len(h), *(len(r[j]) for r in rows)),
        )
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=i == len(rows) - 2)
    console.print(table)


def setup_logging(progress: bool, secrets: Sequence[str]) -> Any:
    """Log to stderr: rich when it is a terminal, plain lines otherwise."""
    root = logging.getLogger("hexscrape")
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    console = None
    handler: logging.Handler
    if progress:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s [%(name)s] %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        ))
    handler.addFilter(RedactSecrets(secrets))
    root.addHandler(handler)
    return console


def _secrets(env: Mapping[str, str]) -> list[str]:
    from urllib.parse import quote

    pw = env.get("HEX_PASS")
    return [s for s in {pw, quote(pw, safe="")} if s] if pw else []


def check_worker_config(env: Mapping[str, str], opts: Options) -> None:
    """Fail fast, in one line, on what every worker would fail on at start."""
    env = {k: v for k, v in env.items() if k not in ASSIGNED_BY_PRIMARY}
    try:
        load_config(env={**env, "SESSION_POOL_SIZE": str(opts.pool_size),
                         "SESSION_RANGE_START": "0", "SESSION_RANGE_END": "1"})
    except ConfigError as exc:
        raise ServiceError(str(exc), EXIT_USAGE) from None


# -- entry point ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``run_cluster.py``; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["seed"]:
        from hexscrape.seed import main as seed_main

        return seed_main(argv[1:])
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return Primary(opts).run()


class Primary:
    """Sets up the services around a :class:`Cluster`, runs it, cleans up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.pending: list[int] = []
        self.cluster: Cluster | None = None
        self.server: Any = None  # embedded RedisServer
        self.sandbox: SandboxProcess | None = None
        self.metrics: MetricsServer | None = None
        self.summary: dict[str, Any] | None = None
        self.frontier_done = False

    def _early_signal(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)

    def run(self) -> int:
        opts = self.opts
        progress = opts.progress if opts.progress is not None else sys.stderr.isatty()
        env = dict(os.environ)
        console = setup_logging(progress, _secrets(env))
        previous = {s: signal.signal(s, self._early_signal) for s in SHUTDOWN_SIGNALS}
        try:
            with output_lock(opts.output):
                try:
                    code = self._run(env, progress, console)
                except ServiceError as exc:
                    print(f"{PROG}: error: {exc}", file=sys.stderr)
                    code = exc.code
                except Exception:
                    logger.exception("internal error in the primary")
                    code = EXIT_ERROR
                finally:
                    self._cleanup()
        except UsageError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            code = EXIT_USAGE
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.summary is not None:
            self._report(code)
        return code

    def _run(self, env: dict[str, str], progress: bool, console: Any) -> int:
        opts = self.opts
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        if not opts.sandbox:
            check_worker_config(env, opts)
        # Redis: given, or embedded with its data under the output dir.
        if opts.redis_url:
            redis_url = opts.redis_url
        else:
            self.server = start_embedded_redis(opts.output / "redis", opts.fresh)
            redis_url = self.server.url
        client = connect_redis(redis_url)
        if opts.sandbox:
            self.sandbox = SandboxProcess(opts.log_dir / "sandbox.log").start()
            env.update(self.sandbox.env())
            setup_logging(progress, _secrets(env))
            logger.info("sandbox gateway on %s", env.get("HEX_GATEWAY"))
            check_worker_config(env, opts)
        cluster = self.cluster = Cluster(
            opts, redis_url=redis_url, worker_env=env, secrets=_secrets(env),
            redis_client=client,
        )
        if opts.metrics_port is not None:
            self.metrics = MetricsServer(cluster, opts.metrics_host, opts.metrics_port)
        seed_env = {**env, "REDIS_URL": redis_url}
        if opts.urls and not self.pending:
            run_seed(opts.urls, seed_env, opts.key_prefix)
        if opts.sandbox and opts.count and not self.pending:
            urls = "\n".join(sandbox_urls(opts.count)) + "\n"
            run_seed("-", seed_env, opts.key_prefix, stdin=urls)
        for s in SHUTDOWN_SIGNALS:
            signal.signal(s, cluster.on_signal)
        cluster.pending_signals[:0] = self.pending  # a signal during the set-up
        if progress and console is not None:
            from rich.live import Live

            with Live("starting workers", console=console, auto_refresh=False) as live:
                cluster._live = live
                try:
                    code = cluster.run()
                finally:
                    cluster._live = None
        else:
            code = cluster.run()
        # Polled after the last worker exited: nothing queued, nothing leased.
        self.frontier_done = cluster.frontier_done()
        self.summary = cluster.build_summary(code)
        self.summary["frontier_done"] = self.frontier_done
        write_json(opts.stats_file, self.summary)
        return code

    def _cleanup(self) -> None:
        """Stop whatever we started; workers first, Redis last."""
        if self.cluster is not None:
            self.cluster.shutdown_now()
        if self.metrics is not None:
            self.metrics.stop()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.server is not None:
            self.server.stop()
            if self.frontier_done:
                shutil.rmtree(self.server.data_dir, ignore_errors=True)
                logger.info("frontier done: removed %s", self.server.data_dir)

    def _report(self, code: int) -> None:
        from rich.console import Console

        summary = self.summary
        assert summary is not None
        print_summary(summary, Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160))
        logger.info("%s", logfmt("summary", {
            "outcome": summary["outcome"], "exit_code": code,
            **{k: v for k, v in summary["totals"].items() if k != "sessions"},
            "respawns": summary["respawns"], "stats_file": str(self.opts.stats_file),
        }))
        if self.server is not None and not self.frontier_done:
            logger.info(
                "the frontier is kept in %s: run again with --output %s to go on",
                self.server.data_dir, self.opts.output,
            )
