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
  when a live worker reclaims them (heartbeat TTL + reap interval, ~13 s);
* 6 -- ``--scrapyd``: a node is unreachable, or the project is missing there
  and could not be deployed (nothing was seeded nor scheduled).

Scrapyd mode (``--scrapyd URL[,URL...] --workers-per-node M``): the same loop,
stats, summary and exit codes, but each slot is a scrapyd job
(:class:`ScrapydCluster`, :mod:`hexscrape.scrapyd`): scheduled with its slice
as job settings, watched through ``listjobs.json``, rescheduled (lease
released first) when it ends without a clean final stats record, cancelled
(SIGINT: a drain) on SIGTERM. Proxy credentials come from the nodes' own
environment unless ``--scrapyd-pass-credentials``. If the primary itself dies,
the jobs go on until the frontier is done (scrapyd is their supervisor).

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
from typing import IO, Any, ClassVar
from urllib.parse import urlsplit

from hexscrape.config import DEFAULT_POOL_SIZE, ConfigError, load_config, redact_url
from hexscrape.exitcodes import EXIT_CONFIG, EXIT_PROXY_AUTH, exit_code_for
from hexscrape.exitcodes import EXIT_REDIS as EXIT_REDIS_WORKER
from hexscrape.logredact import RedactSecrets
from hexscrape.scrapyd import (
    CREDENTIAL_NAMES,
    DEFAULT_PROJECT,
    JobLauncher,
    ScrapydError,
    ScrapydJob,
    build_egg,
    display_url,
    is_loopback_host,
    is_loopback_url,
    parse_node_urls,
    project_from_cfg,
    url_password,
)
from hexscrape.redisserver import terminate
from hexscrape.sessions import slice_bounds
from hexscrape.statsagg import (
    worst_sessions,
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
EXIT_NODE = 6

DEFAULT_MAX_WORKERS = 16
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_STATS_INTERVAL = 5.0
DEFAULT_MEMUSAGE_LIMIT_MB = 1024
DEFAULT_MEMUSAGE_CHECK_INTERVAL = 5.0
DEFAULT_SANDBOX_COUNT = 1000
DEFAULT_WORKERS_PER_NODE = 1
DEFAULT_NODE_TIMEOUT = 30.0
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
            "unavailable; 5 a worker had to be SIGKILLed at shutdown; 6 a scrapyd node "
            "is unreachable or the project could not be deployed to it. "
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

    g = p.add_argument_group(
        "scrapyd",
        "Run the workers as scrapyd jobs instead of local processes: one `ip` job per slot, "
        "slot k on node k // M, slices disjoint across all nodes. Proxy credentials "
        "(HEX_USER, HEX_PASS, HEX_GATEWAY) should be in each scrapyd service's environment: "
        "scrapyd records job settings in its job list and log, so by default none are sent. "
        "Items go where each node's scrapyd items_dir says (or -s FEEDS=...).",
    )
    g.add_argument("--scrapyd", metavar="URL[,URL...]", action="append", default=None,
                   help="scrapyd nodes, e.g. http://10.0.0.5:6800 (comma-separated or "
                        "repeated; user:password@ for scrapyd's basic auth)")
    g.add_argument("--workers-per-node", metavar="M", type=_positive_int, default=None,
                   help=f"jobs per scrapyd node (default {DEFAULT_WORKERS_PER_NODE}); "
                        "--workers is then nodes * M")
    g.add_argument("--deploy", action="store_true", default=None,
                   help="build this checkout's egg (scrapyd-deploy --build-egg) and upload it "
                        "to every node; by default only nodes without the project get it")
    g.add_argument("--scrapyd-project", metavar="NAME", default=None,
                   help="scrapyd project name (default: [deploy] project in scrapy.cfg, "
                        f"here {project_from_cfg(PROJECT_ROOT)!r})")
    g.add_argument("--scrapyd-pass-credentials", action="store_true", default=None,
                   help="send this environment's HEX_USER, HEX_PASS, HEX_GATEWAY (and a Redis "
                        "URL's password) to the jobs as settings; scrapyd then keeps them in "
                        "its log. Default: the nodes' own environment provides them")
    g.add_argument("--node-timeout", metavar="SECONDS", type=_positive_seconds, default=None,
                   help="a node that does not answer this long has its jobs rescheduled on "
                        f"the other nodes (default {DEFAULT_NODE_TIMEOUT:g})")

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
    scrapyd: list[str] = field(default_factory=list)
    workers_per_node: int = DEFAULT_WORKERS_PER_NODE
    deploy: bool = False
    scrapyd_project: str = DEFAULT_PROJECT
    pass_credentials: bool = False
    node_timeout: float = DEFAULT_NODE_TIMEOUT


def _scrapyd_options(ns: argparse.Namespace) -> dict[str, Any]:
    """Validate the scrapyd group; {} without --scrapyd."""
    given = [opt for opt, value in (
        ("--workers-per-node", ns.workers_per_node), ("--deploy", ns.deploy),
        ("--scrapyd-project", ns.scrapyd_project),
        ("--scrapyd-pass-credentials", ns.scrapyd_pass_credentials),
        ("--node-timeout", ns.node_timeout)) if value is not None]
    if ns.scrapyd is None:
        if given:
            raise UsageError(f"{given[0]} only applies with --scrapyd")
        return {}
    try:
        urls = parse_node_urls(ns.scrapyd)
    except ValueError as exc:
        raise UsageError(f"--scrapyd: {exc}") from None
    if ns.workers is not None:
        raise UsageError("--workers does not apply with --scrapyd: use --workers-per-node")
    remote = [u for u in urls if not is_loopback_url(u)]
    if remote and ns.sandbox:
        raise UsageError(f"--sandbox runs on this machine: scrapyd node "
                         f"{display_url(remote[0])} could not reach it")
    if remote and not ns.redis_url:
        raise UsageError(f"scrapyd node {display_url(remote[0])} is not on this machine: pass "
                         "--redis-url (or REDIS_URL) with an address the nodes can reach")
    redis_parts = urlsplit(ns.redis_url or "")
    if remote and (redis_parts.scheme == "unix" or is_loopback_host(redis_parts.hostname or "")):
        raise UsageError(f"--redis-url {redact_url(ns.redis_url)!r} is a loopback address: "
                         f"scrapyd node {display_url(remote[0])} could not reach it")
    project = ns.scrapyd_project or project_from_cfg(PROJECT_ROOT)
    if not project or any(c.isspace() or c in "/\\" for c in project):
        raise UsageError(f"--scrapyd-project {project!r} is not a project name")
    per_node = ns.workers_per_node or DEFAULT_WORKERS_PER_NODE
    return {
        "scrapyd": urls,
        "workers_per_node": per_node,
        "workers": per_node * len(urls),
        "deploy": bool(ns.deploy),
        "scrapyd_project": project,
        "pass_credentials": bool(ns.scrapyd_pass_credentials),
        "node_timeout": ns.node_timeout or DEFAULT_NODE_TIMEOUT,
    }


def parse_args(argv: Sequence[str]) -> Options:
    """Parse and validate; raise UsageError with a one-line message."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    if ns.redis_url:  # checked first: the scrapyd checks look at its host
        parts = urlsplit(ns.redis_url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise UsageError(f"--redis-url {redact_url(ns.redis_url)!r} is not a redis:// URL")
    scrapyd = _scrapyd_options(ns)
    workers = scrapyd.pop("workers", None) or _from_env(
        ns.workers, "WORKERS", _positive_int, default_workers())
    pool = _from_env(ns.pool_size, "SESSION_POOL_SIZE", _positive_int, DEFAULT_POOL_SIZE)
    idle = _from_env(ns.idle_close, "IDLE_CLOSE_SECONDS", _seconds, None)
    memlimit = _from_env(
        ns.memusage_limit_mb, "MEMUSAGE_LIMIT_MB", _non_negative_int, DEFAULT_MEMUSAGE_LIMIT_MB
    )
    if workers > pool:
        what = (f"--scrapyd nodes x --workers-per-node = {workers}" if scrapyd
                else f"--workers {workers}")
        raise UsageError(
            f"{what} is larger than the session pool "
            f"(SESSION_POOL_SIZE={pool}): each worker needs at least one session"
        )
    for slot, name, _ in ns.slot_settings:
        if slot >= workers:
            raise UsageError(f"--slot-set {slot}:{name}: slot {slot} is outside 0..{workers - 1}")
    if ns.urls:
        problem = check_url_file(ns.urls)
        if problem:
            raise UsageError(f"--urls: {problem}")
    if ns.redis_url and ns.fresh:
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
        **scrapyd,
    )


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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended.

    A local worker has an exit code or a signal. A scrapyd job has neither
    (``known`` False: scrapyd does not report them), so the finish reason of its
    final stats record tells a clean end from a crash. ``dead`` is False when we
    only lost sight of the worker (its scrapyd node stopped answering): its
    session lease must then expire by itself rather than be released.
    """

    code: int | None = None
    signal: int | None = None
    known: bool = True
    dead: bool = True
    removed: bool = False  # a queued scrapyd job cancelled before it ran
    note: str | None = None

    def text(self) -> str:
        if self.signal is not None:
            return _signal_name(self.signal)
        if self.code is not None:
            return f"code {self.code}"
        return self.note or "ended"


class Worker:
    """A slot's current worker as the loop sees it: a local process
    (:class:`LocalWorker`) or a scrapyd job (:class:`ScrapydWorker`)."""

    signal_safe = False  # may kill() run inside a signal handler?

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def label(self) -> str:
        """``worker pid 123`` / ``job ... on http://node``: for log lines."""
        raise NotImplementedError

    def poll(self) -> WorkerExit | None:
        """None while it runs (as far as we know)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask it to drain (SIGTERM, or scrapyd's cancel: SIGINT)."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """Extra fields for the summary (node, job id...)."""
        return {}

    def error(self, secrets: Sequence[str]) -> str | None:
        """The most telling line of its log, if we can read it."""
        return None


class LocalWorker(Worker):
    """A ``scrapy crawl`` child process of the primary."""

    signal_safe = True

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, log_offset: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.log_offset = log_offset

    @property
    def pid(self) -> int:
        return self.proc.pid

    def label(self) -> str:
        return f"worker pid {self.proc.pid}"

    def poll(self) -> WorkerExit | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return WorkerExit(code=rc) if rc >= 0 else WorkerExit(signal=-rc)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        # os.kill, not Popen.kill: this also runs inside signal handlers.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def error(self, secrets: Sequence[str]) -> str | None:
        return log_tail_error(self.log_path, self.log_offset, secrets)


class WorkerStartError(Exception):
    """A worker could not be started (e.g. no scrapyd node took the job)."""


@dataclass
class Slot:
    """One worker slot: its slice, its current worker and its history."""

    index: int
    start: int
    end: int
    crashes: CrashTracker
    state: str = STARTING
    worker: Worker | None = None
    instance: str | None = None
    spawned_at: float = 0.0
    respawn_at: float | None = None
    spawns: int = 0
    stop_sent: bool = False
    last_dead: bool = True  # was the previous worker known dead?
    error: str | None = None
    exits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.worker is not None

    @property
    def respawns(self) -> int:
        return max(0, self.spawns - 1)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")
_LOG_ERROR = re.compile(r"\] (ERROR|CRITICAL): ")


def log_tail_error(path: Path, offset: int, secrets: Sequence[str] = ()) -> str | None:
    """The most telling line a worker wrote to its log since *offset*
    (see :func:`telling_line`)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 32768))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    return telling_line(lines, secrets)


def telling_line(lines: Sequence[str], secrets: Sequence[str] = (),
                 fallback: bool = True) -> str | None:
    """The most telling line of a worker's log tail.

    In order: the crawl command's ``hexscrape: error: ...`` (config errors),
    the last line of a traceback, the last ERROR/CRITICAL log message, the
    last line (unless not *fallback*). Secrets are masked even so.
    """
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
    if pick is None and not fallback:
        return None
    pick = (pick or lines[-1])[:500]
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            pick = pick.replace(secret, "***")
    return pick


# -- the primary -----------------------------------------------------------------


class Cluster:
    """Supervise the worker slots until they are all done or the run is stopped.

    Workers are local ``scrapy crawl`` processes; :class:`ScrapydCluster`
    overrides :meth:`start_worker` (and a few hooks) to run them as scrapyd
    jobs under the same loop, stats, summary and exit codes.
    """

    RESPAWNING, RESPAWNED = "respawning", "respawned"  # (scrapyd: rescheduling)

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
            self._kill_all_now(in_handler=True)

    def _kill_all_now(self, in_handler: bool = False) -> None:
        for slot in self.slots:
            worker = slot.worker
            if worker is not None and (worker.signal_safe or not in_handler):
                worker.kill()

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
            if slot.worker is not None and not slot.stop_sent:
                slot.stop_sent = True
                slot.worker.stop()

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
            HEXSCRAPE_INSTANCE=self.instance_id(slot),
            HEXSCRAPE_SUPERVISOR_PID=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("SCRAPY_SETTINGS_MODULE", "hexscrape.settings")
        if self.opts.idle_close is not None:
            env["IDLE_CLOSE_SECONDS"] = repr(self.opts.idle_close)
        return env

    def instance_id(self, slot: Slot) -> str:
        """Names the worker's stats records (and, under scrapyd, its job)."""
        return f"{self.run_id}-{slot.index}-{slot.spawns}"

    def log_path(self, slot: Slot) -> Path:
        return self.opts.log_dir / f"worker-{slot.index}.log"

    def start_worker(self, slot: Slot) -> Worker:
        """Start the slot's worker process; overridden by :class:`ScrapydCluster`."""
        env = self.env_for(slot)
        path = self.log_path(slot)
        with path.open("ab") as log:
            log.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} run {self.run_id} slot "
                f"{slot.index} sessions [{slot.start}, {slot.end}) spawn {slot.spawns}\n".encode()
            )
            log.flush()
            # Own session: a terminal's Ctrl-C goes to the primary only, which
            # then drains the workers with exactly one SIGTERM each.
            proc = subprocess.Popen(
                self.worker_command(slot), cwd=PROJECT_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
            return LocalWorker(proc, path, log.tell())

    def refresh_workers(self) -> None:
        """Update what the workers' poll() reports (scrapyd: poll the nodes)."""

    def spawn(self, slot: Slot) -> None:
        if slot.spawns and slot.last_dead:
            self.release_slice(slot)
        slot.spawns += 1
        slot.instance = self.instance_id(slot)
        slot.stop_sent = False
        slot.respawn_at = None
        try:
            slot.worker = self.start_worker(slot)
        except WorkerStartError as exc:
            self._start_failed(slot, str(exc))
            return
        slot.spawned_at = time.monotonic()
        slot.state = STARTING
        logger.info(
            "slot %d: started %s with sessions [%d, %d)%s",
            slot.index, slot.worker.label(), slot.start, slot.end,
            f" (respawn {slot.respawns})" if slot.respawns else "",
        )

    def _start_failed(self, slot: Slot, why: str) -> None:
        """Counted as a crash: back off, or give the slot up."""
        now = time.monotonic()
        slot.error = why
        slot.exits.append({"pid": None, "code": None, "signal": None, "reason": None,
                           "uptime_s": 0.0, "rss_bytes": None, "note": "not started"})
        delay = slot.crashes.crashed(now)
        if delay is None:
            slot.state = GAVE_UP
            logger.error("slot %d: could not start a worker; given up after %d failures "
                         "within %.0fs: %s", slot.index, len(slot.crashes.times),
                         self.opts.policy.window, why)
            return
        slot.state = BACKOFF
        slot.respawn_at = now + delay
        logger.warning("slot %d: could not start a worker (%s); retrying in %.1fs",
                       slot.index, why, delay)

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

    def _poll_exits(self) -> list[tuple[Slot, WorkerExit]]:
        self.refresh_workers()
        exited = []
        for slot in self.slots:
            if slot.worker is not None:
                ex = slot.worker.poll()
                if ex is not None:
                    exited.append((slot, ex))
        return exited

    def reap(self) -> None:
        """Notice exited workers and decide what each exit means."""
        exited = self._poll_exits()
        if not exited:
            return
        # The final record was XADDed before the process exited: read it first.
        self.read_stats(block_ms=None)
        now = time.monotonic()
        for slot, ex in exited:
            self._on_exit(slot, ex, now)

    def _on_exit(self, slot: Slot, ex: WorkerExit, now: float) -> None:
        worker = slot.worker
        assert worker is not None and slot.instance is not None
        slot.worker = None
        slot.last_dead = ex.dead
        reason = self.agg.final_reason(slot.instance)
        info: dict[str, Any] = {
            "pid": worker.pid,
            "code": ex.code,
            "signal": _signal_name(ex.signal) if ex.signal is not None else None,
            "reason": reason,
            "uptime_s": round(now - slot.spawned_at, 1),
            "rss_bytes": self.agg.rss(slot.instance),
            **worker.details(),
        }
        if not ex.known and ex.signal is None and reason is not None:
            # scrapyd does not report it, but our crawl command exits with this
            info["code"] = exit_code_for(reason)
            info["code_from"] = "finish reason"
        if ex.note:
            info["note"] = ex.note
        slot.exits.append(info)
        who = worker.label()
        how = ex.text()
        final = f"finish reason {reason}" if reason else "no final stats record"
        if slot.state == KILLED:
            return
        if ex.known:
            clean = ex.code == 0 or ex.signal == signal.SIGTERM
        else:  # a scrapyd job: its final record is all we know
            clean = reason in ("finished", "shutdown") or ex.removed
        if self.draining:
            if clean:
                slot.state = STOPPED
                logger.info("slot %d: %s drained (%s, %s)", slot.index, who, how, final)
            elif self.forced and ex.signal == signal.SIGKILL:
                slot.state = KILLED
                logger.warning("slot %d: %s killed", slot.index, who)
            else:
                slot.state = EXITED
                slot.error = self.exit_error(slot, worker)
                logger.warning("slot %d: %s exited during shutdown (%s, %s)",
                               slot.index, who, how, final)
            return
        ok_exit = ex.code == 0 if ex.known else True
        if ex.removed:
            slot.state = STOPPED
            logger.warning("slot %d: %s was cancelled from outside the cluster before it "
                           "started; not %s", slot.index, who, self.RESPAWNED)
            return
        if ok_exit and reason == "finished":
            slot.state = FINISHED
            logger.info("slot %d: %s finished: the frontier is done", slot.index, who)
            return
        if ok_exit and reason == "shutdown":
            slot.state = STOPPED
            logger.warning(
                "slot %d: %s was stopped by a signal from outside the cluster; not %s",
                slot.index, who, self.RESPAWNED,
            )
            return
        slot.error = self.exit_error(slot, worker)
        if ex.known and ex.code in (EXIT_CONFIG, EXIT_PROXY_AUTH):
            # Respawning cannot fix a setting or a rejected password.
            slot.state = GAVE_UP
            logger.error(
                "slot %d: %s has %s; not respawned: %s",
                slot.index, who,
                "a configuration error" if ex.code == EXIT_CONFIG else "its proxy credentials rejected",
                slot.error or "(no message)",
            )
            return
        delay = slot.crashes.crashed(now)
        detail = f"{how}, {final}"
        if delay is None:
            slot.state = GAVE_UP
            logger.error(
                "slot %d: %s died (%s); given up after %d crashes within "
                "%.0fs; last message: %s (log: %s)",
                slot.index, who, detail, len(slot.crashes.times), self.opts.policy.window,
                slot.error or "-", self.log_hint(slot, info),
            )
            return
        slot.state = BACKOFF
        slot.respawn_at = now + delay
        logger.warning(
            "slot %d: %s died (%s); %s in %.1fs (crash %d of %d "
            "allowed within %.0fs)%s",
            slot.index, who, detail, self.RESPAWNING, delay, len(slot.crashes.times),
            self.opts.policy.max_crashes, self.opts.policy.window,
            f": {slot.error}" if slot.error and (not ex.known or (ex.code or 0) > 0) else "",
        )

    def exit_error(self, slot: Slot, worker: Worker) -> str | None:
        """Why the worker ended badly, in one line (from its log)."""
        return worker.error(self.secrets)

    def log_hint(self, slot: Slot, info: Mapping[str, Any]) -> str:
        """Where the slot's worker log is, for error messages."""
        return str(self.log_path(slot))

    def respawn_due(self) -> None:
        if self.draining:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == BACKOFF and slot.respawn_at is not None and now >= slot.respawn_at:
                self.spawn(slot)

    def kill_remaining(self, wait: float = 10.0) -> None:
        """The deadline passed: SIGKILL whoever is still draining."""
        for slot in self.slots:
            if slot.worker is not None and slot.worker.poll() is None:
                logger.warning("slot %d: %s did not drain in time: SIGKILL",
                               slot.index, slot.worker.label())
                slot.state = KILLED
                slot.worker.kill()
        deadline = time.monotonic() + wait
        while True:
            exited = self._poll_exits()
            if exited:
                self.read_stats(block_ms=None)
            for slot, ex in exited:
                self._on_exit(slot, ex, time.monotonic())
            left = [s for s in self.slots if s.worker is not None]
            if not left:
                return
            if time.monotonic() >= deadline:
                for slot in left:  # unkillable, or its scrapyd node is gone
                    worker = slot.worker
                    assert worker is not None
                    logger.error("slot %d: %s survives SIGKILL (or its state is unknown)",
                                 slot.index, worker.label())
                    slot.exits.append({"pid": worker.pid, "code": None, "signal": None,
                                       "reason": None, "note": "state unknown after SIGKILL",
                                       **worker.details()})
                    slot.worker = None
                    slot.last_dead = False
                    slot.state = KILLED
                return
            time.sleep(0.05)

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
                "pid": s.worker.pid if s.worker is not None else None,
                **self.slot_details(s),
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
            "worst_sessions": worst_sessions(totals.sessions),
            **self.run_details(),
            "slots": slots,
        }

    def slot_details(self, slot: Slot) -> dict[str, Any]:
        """Extra per-slot summary fields (scrapyd: node and job)."""
        return {}

    def run_details(self) -> dict[str, Any]:
        """Extra summary fields about the run (scrapyd: the nodes)."""
        return {"mode": "local"}

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
                for s, ex in self._poll_exits():
                    self._on_exit(s, ex, time.monotonic())
                time.sleep(0.05)
            self.kill_remaining()


# -- scrapyd mode ------------------------------------------------------------------


class ScrapydWorker(Worker):
    """A scrapyd job (:class:`hexscrape.scrapyd.ScrapydJob`) seen as a worker."""

    NOTES: ClassVar[dict[str, str]] = {
        "finished": "job ended",
        "removed": "removed from the scrapyd queue before it started",
        "vanished": "no longer listed by scrapyd",
        "lost": "its scrapyd node stopped answering",
    }

    def __init__(self, job: ScrapydJob) -> None:
        self.job = job

    @property
    def pid(self) -> int | None:
        return self.job.pid

    def label(self) -> str:
        pid = f" (pid {self.job.pid})" if self.job.pid else ""
        return f"job {self.job.id} on {self.job.node_name}{pid}"

    def poll(self) -> WorkerExit | None:
        end = self.job.end
        if end is None:
            return None
        return WorkerExit(
            known=False, dead=end.dead, removed=end.how == "removed",
            signal=signal.SIGKILL if self.job.kill_sent else None,
            note=self.NOTES.get(end.how, end.how),
        )

    def stop(self) -> None:
        self.job.stop()

    def kill(self) -> None:
        self.job.kill()

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.job.node_name, "job": self.job.id}
        if self.job.log_url:
            out["log"] = self.job.node_name + self.job.log_url
        return out

    def error(self, secrets: Sequence[str]) -> str | None:
        tail = self.job.log_tail()
        if tail is None:
            return ("no job log: it died before logging (see the scrapyd log on "
                    f"{self.job.node_name})")
        return telling_line(tail.splitlines(), secrets)


class ScrapydCluster(Cluster):
    """Worker slots as scrapyd jobs: slot ``k`` runs on node ``k // M``.

    The same loop as the local mode; only starting, watching and stopping a
    worker go through :class:`hexscrape.scrapyd.JobLauncher`. A job gets its
    slice and identity as job settings (which win over the node's environment);
    proxy credentials and a Redis password only with *pass_credentials*.
    """

    RESPAWNING, RESPAWNED = "rescheduling", "rescheduled"

    def __init__(self, opts: Options, *, launcher: JobLauncher, pass_credentials: bool,
                 send_redis_url: bool, **kw: Any) -> None:
        super().__init__(opts, **kw)
        self.launcher = launcher
        self.pass_credentials = pass_credentials
        self.send_redis_url = send_redis_url
        self._nodes: dict[int, str] = {}  # slot -> node of its latest job

    def job_settings(self, slot: Slot) -> list[tuple[str, str]]:
        """The job's settings: the user's, then ours (ours win: slices must stay
        disjoint). Values are never logged (they may hold credentials)."""
        o = self.opts
        out: list[tuple[str, str]] = list(o.settings)
        out += [(n, v) for k, n, v in o.slot_settings if k == slot.index]
        out += [
            ("HEXSCRAPE_STATS_INTERVAL", repr(o.stats_interval)),
            ("MEMUSAGE_ENABLED", "True" if o.memusage_limit_mb else "False"),
            ("MEMUSAGE_LIMIT_MB", str(o.memusage_limit_mb)),
            ("MEMUSAGE_CHECK_INTERVAL_SECONDS", repr(o.memusage_check_interval)),
        ]
        if o.idle_close is not None:
            out.append(("IDLE_CLOSE_SECONDS", repr(o.idle_close)))
        if self.pass_credentials:
            out += [(n, self.worker_env[n]) for n in CREDENTIAL_NAMES if self.worker_env.get(n)]
        if self.send_redis_url:
            out.append(("REDIS_URL", self.redis_url))
        out += [
            ("WORKER_SLOT", str(slot.index)),
            ("SESSION_RANGE_START", str(slot.start)),
            ("SESSION_RANGE_END", str(slot.end)),
            ("SESSION_POOL_SIZE", str(o.pool_size)),
            ("REDIS_KEY_PREFIX", o.key_prefix),
            ("HEXSCRAPE_RUN_ID", self.run_id),
            ("HEXSCRAPE_INSTANCE", self.instance_id(slot)),
        ]
        return out

    def start_worker(self, slot: Slot) -> Worker:
        preferred = min(slot.index // self.opts.workers_per_node, len(self.launcher.nodes) - 1)
        try:
            job = self.launcher.schedule(slot.index, preferred, self.instance_id(slot),
                                         self.job_settings(slot))
        except ScrapydError as exc:
            raise WorkerStartError(str(exc)) from None
        self._nodes[slot.index] = job.node_name
        return ScrapydWorker(job)

    def refresh_workers(self) -> None:
        self.launcher.refresh()

    def exit_error(self, slot: Slot, worker: Worker) -> str | None:
        """A job that never sent a stats record failed at start: its one-line
        error went to stderr, which scrapyd keeps in its own log, not the job's."""
        if not isinstance(worker, ScrapydWorker):
            return worker.error(self.secrets)
        job = worker.job
        if job.end is not None and job.end.how == "lost":  # no log to fetch
            return f"lost sight of it: {job.node.last_error or 'its node stopped answering'}"
        if slot.instance in self.agg.latest:
            return worker.error(self.secrets)
        tail = job.log_tail()
        line = telling_line(tail.splitlines(), self.secrets, fallback=False) if tail else None
        return line or (
            f"it failed at start; the reason is in the scrapyd log on {job.node_name} "
            "(a 'hexscrape: error:' line, e.g. HEX_USER/HEX_PASS missing from the scrapyd "
            "service's environment, or a traceback, e.g. setuptools>=81 without pkg_resources)"
        )

    def log_hint(self, slot: Slot, info: Mapping[str, Any]) -> str:
        return str(info.get("log") or f"the scrapyd log on {info.get('node', '?')}")

    def slot_details(self, slot: Slot) -> dict[str, Any]:
        node = self._nodes.get(slot.index)
        if node is None:
            preferred = min(slot.index // self.opts.workers_per_node, len(self.launcher.nodes) - 1)
            node = self.launcher.nodes[preferred].node.name
        job = slot.worker.job.id if isinstance(slot.worker, ScrapydWorker) else None
        return {"node": node, "job": job}

    def run_details(self) -> dict[str, Any]:
        return {
            "mode": "scrapyd",
            "project": self.launcher.project,
            "nodes": [st.node.name for st in self.launcher.nodes],
            "workers_per_node": self.opts.workers_per_node,
        }


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


def prepare_scrapyd(opts: Options) -> JobLauncher:
    """Check every scrapyd node answers and has the project (deploying the egg
    where it is missing, or everywhere with --deploy); ServiceError(EXIT_NODE)."""
    launcher = JobLauncher(opts.scrapyd, opts.scrapyd_project, SPIDER,
                           node_timeout=opts.node_timeout)
    try:
        launcher.prepare(deploy=opts.deploy, egg=lambda: build_egg(PROJECT_ROOT))
    except ScrapydError as exc:
        raise ServiceError(str(exc), EXIT_NODE) from None
    logger.info(
        "scrapyd: %d node(s) x %d job(s), project %s: %s", len(launcher.nodes),
        opts.workers_per_node, launcher.project,
        ", ".join(f"{st.node.name} (version {st.version})" for st in launcher.nodes),
    )
    return launcher


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
        terminate(self.proc)
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
    worst = summary.get("worst_sessions") or []
    if worst:
        console.print("worst sessions: " + ", ".join(
            f"{w['session']} ({w['bans']} bans, {w['failed']}/{w['requests']} failed)" for w in worst
        ))


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


def add_log_secrets(secrets: Sequence[str]) -> None:
    """Mask more strings in what we log (after :func:`setup_logging`)."""
    for handler in logging.getLogger("hexscrape").handlers:
        for f in handler.filters:
            if isinstance(f, RedactSecrets):
                f.secrets = sorted(set(f.secrets) | {x for x in secrets if x}, key=len,
                                   reverse=True)


def _secrets(env: Mapping[str, str]) -> list[str]:
    from urllib.parse import quote

    pw = env.get("HEX_PASS")
    return [s for s in {pw, quote(pw, safe="")} if s] if pw else []


def check_worker_config(env: Mapping[str, str], opts: Options) -> None:
    """Fail fast, in one line, on what every worker would fail on at start.

    Scrapyd jobs that take their credentials from their node's environment
    are not checked for credentials here (we cannot see that environment).
    """
    env = {k: v for k, v in env.items() if k not in ASSIGNED_BY_PRIMARY}
    if opts.scrapyd and not opts.pass_credentials and not opts.sandbox:
        env = {k: v for k, v in env.items() if k not in CREDENTIAL_NAMES}
        env["HEX_GATEWAY"] = "none"
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
        self.launcher: JobLauncher | None = None

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
        if opts.scrapyd:  # before Redis and seeding: a dead node stops the run here
            add_log_secrets([pw for u in opts.scrapyd if (pw := url_password(u))])
            self.launcher = prepare_scrapyd(opts)
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
        cluster = self.cluster = self._make_cluster(env, redis_url, client)
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

    def _make_cluster(self, env: dict[str, str], redis_url: str, client: Any) -> Cluster:
        opts = self.opts
        secrets = _secrets(env)
        if self.launcher is None:
            return Cluster(opts, redis_url=redis_url, worker_env=env, secrets=secrets,
                           redis_client=client)
        # Scrapyd keeps job settings (job list, log): credentials stay on the nodes
        # unless asked for; the sandbox's are throwaway ones for loopback nodes.
        passing = opts.pass_credentials or opts.sandbox
        redis_pw = url_password(redis_url)
        if redis_pw:
            secrets.append(redis_pw)
            add_log_secrets([redis_pw])
        if opts.pass_credentials:
            logger.warning(
                "--scrapyd-pass-credentials: %s go to the jobs as settings; scrapyd keeps "
                "them in its log and job list", ", ".join(n for n in CREDENTIAL_NAMES if env.get(n))
                + (" and the Redis password" if redis_pw else "") or "no credentials",
            )
        elif not opts.sandbox:
            logger.info(
                "proxy credentials: from each scrapyd node's environment (HEX_USER, HEX_PASS, "
                "HEX_GATEWAY are not sent; --scrapyd-pass-credentials would send them)"
            )
            if redis_pw:
                logger.info("the Redis URL has a password: not sent either; the nodes use "
                            "REDIS_URL from their environment")
        return ScrapydCluster(
            opts, launcher=self.launcher, pass_credentials=passing,
            send_redis_url=not redis_pw or opts.pass_credentials,
            redis_url=redis_url, worker_env=env, secrets=secrets, redis_client=client,
        )

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
