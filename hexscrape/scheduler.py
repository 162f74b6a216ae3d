"""Scrapy glue for the shared Redis frontier (design: :mod:`hexscrape.frontier`).

``SCHEDULER = "hexscrape.scheduler.FrontierScheduler"`` is always configured;
it builds Scrapy's in-process scheduler unless ``REDIS_URL`` is set, so
``scrapy crawl ip`` without Redis behaves exactly as before.

How the worker uses the frontier:

* Pulling. A background task leases entries whenever this worker holds fewer
  than ``CONCURRENT_REQUESTS + FRONTIER_PREFETCH`` leases (queued locally, in
  flight or being processed), and hands them to the engine through
  ``engine.crawl()``. One slow URL holds one lease, nothing else waits for it.
  An empty frontier is polled with backoff up to ``FRONTIER_POLL_MAX`` seconds.
* Ack point. ``Scraper.enqueue_scrape(result, request)`` returns a Deferred
  that fires once the callback's or errback's output has been fully consumed,
  items through the pipelines included (``scrapy/core/scraper.py``); it is the
  one place both paths meet (errback output bypasses spider middlewares). The
  scheduler wraps that method of the engine's scraper and acks the request's
  lease when the Deferred fires. Requests yielded meanwhile are enqueued before
  the ack, in the same ordered write buffer, so work is never lost in between.
* Retries and redirects. A downloader middleware's replacement request is a
  copy that carries the lease id in ``meta["_hexscrape_lease"]`` while the
  original is still downloading; enqueuing it transfers the lease (one
  script: delete the lease, push the copy, or drop it if the dupefilter says
  so). Requests yielded by a callback are always new entries, even if they
  copied ``response.meta``.
* Duplicates are detected in Redis after ``enqueue_request`` returned True, so
  Scrapy's ``request_dropped`` signal is not sent for them; they are counted
  in ``dupefilter/filtered`` and ``hexscrape/frontier/duplicate``.
* Writes (pushes, transfers, acks, malformed drops) go into an ordered buffer
  flushed by one atomic script per batch, so Redis latency or an outage never
  blocks the reactor: every Redis call runs on one dedicated thread.
* Redis lost mid-crawl: logged once, retried with backoff (0.5 s doubling to
  10 s); downloads in flight finish, their acks and new requests wait in the
  buffer; leasing resumes when Redis is back. After an outage the reaper waits
  one heartbeat TTL so peers can renew their heartbeats before anyone's leases
  are taken back. Redis unreachable at start: finish reason
  ``redis_unavailable`` (exit code 4; the crawl command checks first and
  prints one line).
* Closing. The scheduler reports pending requests until the cluster has been
  empty (:class:`~hexscrape.frontier.Status`) for ``IDLE_CLOSE_SECONDS`` and
  this worker is idle, then closes the spider with reason ``finished``. On
  any close (SIGTERM: ``shutdown``) in-flight requests finish and are acked by
  the engine's own drain; the scheduler then flushes its buffer and puts its
  unstarted leases back at the front of the queue. It never deletes shared keys.

Settings, stats and keys are documented in :mod:`hexscrape.frontier`.
``FRONTIER_FALLBACK_SCHEDULER`` (default :class:`hexscrape.lean.LeanScheduler`,
Scrapy's own with ``JOBDIR``) is the scheduler used without ``REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from scrapy import FormRequest, Request
from scrapy.exceptions import CloseSpider
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.request import request_from_dict
from scrapy_redis.dupefilter import RFPDupeFilter
from scrapy_redis.scheduler import Scheduler as RedisScheduler

from hexscrape import frontier as fr
from hexscrape.config import ConfigError, redact_url
from hexscrape.middlewares import META_ASSIGNED, META_SESSION, crawler_config
from hexscrape.urls import url_problem

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from twisted.internet.defer import Deferred

logger = logging.getLogger(__name__)

T = TypeVar("T")

META_LEASE = "_hexscrape_lease"
"""Request meta: the frontier lease id of a request leased by this worker."""

# Meta keys never stored in Redis: they pin a worker, a session or a secret.
_TRANSIENT_META = (META_LEASE, META_ASSIGNED, "_auth_proxy", "download_latency")
_SECRET_HEADERS = (b"proxy-authorization",)

_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError, OSError)
BACKOFF_START = 0.5
BACKOFF_MAX = 10.0
POLL_MIN = 0.05
FLUSH_BATCH = 500
# While writes come faster than this, a flush waits this long for more: one
# Redis call per ~15 acks at full speed instead of one per ack, ~7% of a
# worker's CPU. Slower than that, each write goes out at once.
FLUSH_LINGER = 0.01
SEED_BATCH = 500
MAX_WARNINGS = 10

# Local lease states.
_QUEUED, _STARTED, _SCRAPING = 1, 2, 3

FINISH_REASON_REDIS = "redis_unavailable"
FINISH_REASON_FRONTIER = "frontier_error"
FINISH_REASON_REPLACED = "worker_replaced"


# -- settings ------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierConfig:
    redis_url: str
    prefix: str
    idle_close: float = 5.0
    heartbeat_ttl: float = 10.0
    heartbeat_interval: float = 2.0
    reap_interval: float = 3.0
    prefetch: int = 25
    batch_size: int = 100
    poll_max: float = 1.0
    timeout: float = 3.0
    close_timeout: float = 15.0
    malformed_keep: int = fr.DEFAULT_MALFORMED_KEEP


def _lookup(settings: BaseSettings | Mapping[str, Any], env: Mapping[str, str], name: str) -> Any:
    value = settings.get(name)
    if value is not None and value != "":
        return value
    value = env.get(name)
    return value if value not in (None, "") else None


def _number(name: str, raw: Any, default: float, *, minimum: float | None = 0.0,
            integer: bool = False, positive: bool = False) -> Any:
    if raw is None:
        return default
    try:
        value = int(str(raw).strip()) if integer else float(str(raw).strip())
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if positive and value <= 0:
        raise ConfigError(f"{name}={raw!r} must be > 0")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum:g}")
    return value


def frontier_config(
    settings: BaseSettings | Mapping[str, Any],
    spider_name: str,
    env: Mapping[str, str] | None = None,
) -> FrontierConfig | None:
    """The frontier settings, or None when ``REDIS_URL`` is not set.

    Raises ConfigError (one line) on a bad value.
    """
    env = os.environ if env is None else env
    url = _lookup(settings, env, "REDIS_URL")
    if url is None:
        return None
    url = str(url).strip()
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"REDIS_URL={redact_url(url)!r} must be a redis://, rediss:// or unix:// URL"
        )
    prefix = str(_lookup(settings, env, "REDIS_KEY_PREFIX") or spider_name).strip()
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(f"REDIS_KEY_PREFIX={prefix!r} must be non-empty, without spaces")

    def get(name: str) -> Any:
        return _lookup(settings, env, name)

    ttl = _number("FRONTIER_HEARTBEAT_TTL", get("FRONTIER_HEARTBEAT_TTL"), 10.0, positive=True)
    interval = _number("FRONTIER_HEARTBEAT_INTERVAL", get("FRONTIER_HEARTBEAT_INTERVAL"),
                       ttl / 5, positive=True)
    if interval >= ttl:
        raise ConfigError(
            f"FRONTIER_HEARTBEAT_INTERVAL={interval:g} must be shorter than "
            f"FRONTIER_HEARTBEAT_TTL={ttl:g}"
        )
    concurrency = int(settings.get("CONCURRENT_REQUESTS") or 16)
    return FrontierConfig(
        redis_url=url,
        prefix=prefix,
        idle_close=_number("IDLE_CLOSE_SECONDS", get("IDLE_CLOSE_SECONDS"), 5.0, minimum=None),
        heartbeat_ttl=ttl,
        heartbeat_interval=interval,
        reap_interval=_number("FRONTIER_REAP_INTERVAL", get("FRONTIER_REAP_INTERVAL"), 3.0,
                              positive=True),
        prefetch=_number("FRONTIER_PREFETCH", get("FRONTIER_PREFETCH"), concurrency,
                         integer=True),
        batch_size=_number("FRONTIER_BATCH_SIZE", get("FRONTIER_BATCH_SIZE"), 100,
                           integer=True, minimum=1),
        poll_max=_number("FRONTIER_POLL_MAX", get("FRONTIER_POLL_MAX"), 1.0, positive=True),
        timeout=_number("FRONTIER_REDIS_TIMEOUT", get("FRONTIER_REDIS_TIMEOUT"), 3.0,
                        positive=True),
        close_timeout=_number("FRONTIER_CLOSE_TIMEOUT", get("FRONTIER_CLOSE_TIMEOUT"), 15.0),
        malformed_keep=_number("FRONTIER_MALFORMED_KEEP", get("FRONTIER_MALFORMED_KEEP"),
                               fr.DEFAULT_MALFORMED_KEEP, integer=True, minimum=1),
    )


def crawler_frontier_config(crawler: Crawler) -> FrontierConfig | None:
    """The frontier config if *crawler* uses :class:`FrontierScheduler` with Redis."""
    try:
        scheduler_cls = load_object(crawler.settings["SCHEDULER"])
    except (ImportError, ValueError, NameError, AttributeError):
        return None
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, FrontierScheduler)):
        return None
    return frontier_config(crawler.settings, crawler.spidercls.name)


def redis_problem(cfg: FrontierConfig) -> str | None:
    """One line saying why Redis at ``cfg.redis_url`` cannot be reached, or None.

    Raises ConfigError if a frontier key has the wrong type (a respawn would
    not help).
    """
    try:
        client = fr.connect(cfg.redis_url, timeout=cfg.timeout)
        try:
            client.ping()
            fr.Frontier(client, cfg.prefix, "precheck").check_types()
        finally:
            client.close()
    except fr.FrontierError as exc:
        raise ConfigError(f"Redis frontier at {redact_url(cfg.redis_url)}: {exc}") from None
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"cannot reach Redis at {redact_url(cfg.redis_url)}: {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def worker_id(slot: str | None) -> str:
    """``slot-<N>`` for a supervised worker, otherwise a random id."""
    if slot is not None and str(slot).strip():
        return f"slot-{str(slot).strip()}".replace(" ", "_").replace(",", "_")
    host = socket.gethostname().split(".")[0] or "host"
    return f"w-{host}-{os.getpid()}-{fr.new_token()[:6]}".replace(",", "_")


# -- request <-> entry ---------------------------------------------------------


class Unserializable(ValueError):
    pass


def _strip_userinfo(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def request_to_entry(request: Request, spider: Spider | None) -> str:
    """JSON entry for *request*, without anything that pins a worker or a secret.

    Raises Unserializable when the callback is not a spider method or the
    meta/cb_kwargs are not JSON-compatible.
    """
    try:
        d = request.to_dict(spider=spider)
    except ValueError as exc:
        raise Unserializable(str(exc)) from None
    meta = dict(d.get("meta") or {})
    session = meta.get(META_SESSION)
    assigned = bool(meta.get(META_ASSIGNED))
    has_session = assigned or isinstance(session, str)
    if assigned:
        meta.pop(META_SESSION, None)
    if has_session:
        # The next worker's session middleware sets its own proxy and jar.
        meta.pop("proxy", None)
        meta.pop("cookiejar", None)
    elif isinstance(meta.get("proxy"), str):
        meta["proxy"] = _strip_userinfo(meta["proxy"])
    for key in _TRANSIENT_META:
        meta.pop(key, None)
    headers = []
    for name, values in request.headers.items():
        lname = name.lower()
        if lname in _SECRET_HEADERS or (has_session and lname == b"cookie"):
            continue
        headers.append([name.decode("latin-1"), [v.decode("latin-1") for v in values]])
    d["meta"] = meta
    d["headers"] = headers
    body = d.pop("body", b"")
    if body:
        d["body64"] = base64.b64encode(body).decode("ascii")
    try:
        return json.dumps({"req": d}, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise Unserializable(f"not JSON-compatible: {exc}") from None


def entry_to_request(
    data: bytes, spider: Spider | None, seed: Callable[[dict[str, Any]], Request]
) -> Request:
    """Rebuild a request from a queue entry; ValueError when malformed.

    ``{"req": {...}}`` is a full request; ``{"url": ...}`` (or a plain URL,
    for raw start URLs) a seed that *seed* turns into a request.
    """
    text = data.decode("utf-8").strip()
    if not text.startswith("{"):
        return seed({"url": text})
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("entry is not a JSON object")
    if "req" not in obj:
        return seed(obj)
    d = obj["req"]
    if not isinstance(d, dict) or not isinstance(d.get("url"), str):
        raise ValueError("request entry has no url")
    problem = url_problem(d["url"])
    if problem:
        raise ValueError(f"URL {d['url'][:200]!r} {problem}")
    if "_class" in d:
        # Only classes of modules already imported: an entry must not make a
        # worker import arbitrary code.
        module, _, name = str(d["_class"]).rpartition(".")
        cls = getattr(sys.modules.get(module), name, None) if module else None
        if not (isinstance(cls, type) and issubclass(cls, Request)):
            raise ValueError(f"{d['_class']!r} is not a known Request class")
    d = dict(d)
    d["headers"] = {
        str(name).encode("latin-1"): [str(v).encode("latin-1") for v in values]
        for name, values in d.get("headers") or []
    }
    body64 = d.pop("body64", None)
    if body64:
        d["body"] = base64.b64decode(body64, validate=True)
    return request_from_dict(d, spider=spider)


def seed_request(spider: Spider | None, obj: dict[str, Any]) -> Request:
    """A request for a seed entry: ``{"url", "meta"?, "method"?, **formdata}``.

    Like scrapy-redis: extra keys become form data. The spider's
    ``make_request(url, meta=...)`` is used when it has one.
    """
    obj = dict(obj)
    url = obj.pop("url", None)
    if not isinstance(url, str):
        raise ValueError("entry has no url")
    url = url.strip()
    problem = url_problem(url)
    if problem:
        raise ValueError(f"URL {url[:200]!r} {problem}")
    meta = obj.pop("meta", None) or {}
    if not isinstance(meta, dict):
        raise ValueError("meta is not an object")
    method = obj.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise ValueError("method is not a string")
    make = getattr(spider, "make_request", None)
    request: Request = make(url, meta=meta) if callable(make) else Request(url, meta=meta)
    if obj:
        formdata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
        return FormRequest(
            url, method=(method or "POST").upper(), formdata=formdata, meta=request.meta,
            callback=request.callback, errback=request.errback, headers=request.headers,
        )
    if method and method.upper() != request.method:
        request = request.replace(method=method.upper())
    return request


def seed_entry(url: str) -> str:
    return json.dumps({"url": url}, separators=(",", ":"), ensure_ascii=False)


# -- dupefilter ------------------------------------------------------------------


class RedisDupeFilter(RFPDupeFilter):
    """scrapy-redis's dupefilter on ``<prefix>:dupefilter`` with Scrapy's fingerprints.

    The frontier scripts do the actual check-and-add atomically with the push;
    this class supplies fingerprints and logging, and is never cleared by a
    worker (the set is shared by the whole cluster).
    """

    def __init__(self, server: Any, key: str, debug: bool = False,
                 fingerprinter: Any = None) -> None:
        super().__init__(server, key, debug)
        self.fingerprinter = fingerprinter

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RedisDupeFilter:  # type: ignore[override]
        cfg = frontier_config(crawler.settings, crawler.spidercls.name)
        if cfg is None:
            raise ConfigError("RedisDupeFilter needs REDIS_URL")
        return cls(
            fr.connect(cfg.redis_url, cfg.timeout), f"{cfg.prefix}:dupefilter",
            debug=crawler.settings.getbool("DUPEFILTER_DEBUG"),
            fingerprinter=crawler.request_fingerprinter,
        )

    def request_fingerprint(self, request: Request) -> str:
        if self.fingerprinter is not None:
            return self.fingerprinter.fingerprint(request).hex()
        return super().request_fingerprint(request)

    def close(self, reason: str = "") -> None:
        """Shared state: a finishing worker never deletes it."""

    def clear(self) -> None:
        raise RuntimeError("the shared dupefilter is never cleared by a worker")


# -- scheduler -------------------------------------------------------------------


class FrontierScheduler(RedisScheduler):
    """Leases requests from the shared frontier; see the module docstring."""

    def __init__(self, crawler: Crawler, cfg: FrontierConfig) -> None:
        self.crawler = crawler
        self.cfg = cfg
        self.client = fr.connect(cfg.redis_url, timeout=cfg.timeout)
        self.worker = worker_id(crawler_config(crawler).worker_slot)
        self.frontier = fr.Frontier(
            self.client, cfg.prefix, self.worker, heartbeat_ttl=cfg.heartbeat_ttl,
            malformed_keep=cfg.malformed_keep,
        )
        df = RedisDupeFilter(
            self.client, self.frontier.keys.dupefilter,
            debug=crawler.settings.getbool("DUPEFILTER_DEBUG"),
            fingerprinter=crawler.request_fingerprinter,
        )
        super().__init__(
            server=self.client, persist=True, flush_on_start=False,
            queue_key=self.frontier.keys.requests, dupefilter=df,
            dupefilter_key=self.frontier.keys.dupefilter,
        )
        self.stats = crawler.stats
        self.spider: Spider | None = None
        concurrency = crawler.settings.getint("CONCURRENT_REQUESTS") or 16
        self._limit = concurrency + max(0, cfg.prefetch)
        self._refill_at = max(1, min(cfg.batch_size, self._limit // 4))
        # Unstarted leases kept locally: enough to keep the downloader busy,
        # and no more (an engine that stops taking requests stops the leasing).
        self._max_unstarted = max(self._refill_at, cfg.prefetch)
        self._queue: deque[Request] = deque()
        self._leases: dict[str, int] = {}
        self._injected: set[Request] = set()
        self._outbox: list[tuple[fr.Op, str | None]] = []
        self._flush_task: asyncio.Future[None] | None = None
        self._last_flush = 0.0
        self._tasks: list[asyncio.Future[None]] = []
        self._room = asyncio.Event()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._opened = False
        self._stopping = False
        self._closing_spider = False
        self._was_running = False
        self._may_close = False
        self._empty_since: float | None = None
        self._outage_since: float | None = None
        self._give_up_at: float | None = None
        self._reap_after = 0.0
        self._warned: dict[str, int] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Any:  # type: ignore[override]
        spider_name = crawler.spider.name if crawler.spider else crawler.spidercls.name
        cfg = frontier_config(crawler.settings, spider_name)
        if cfg is None:
            fallback = crawler.settings.get("FRONTIER_FALLBACK_SCHEDULER") or (
                "hexscrape.lean.LeanScheduler"
            )
            return build_from_crawler(load_object(fallback), crawler)
        return cls(crawler, cfg)

    # -- scheduler interface --------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    def has_pending_requests(self) -> bool:
        return bool(self._queue) or not self._may_close

    def enqueue_request(self, request: Request) -> bool:
        if request in self._injected:
            self._injected.discard(request)
            self._queue.append(request)
            return True
        lid = request.meta.get(META_LEASE)
        transfer = lid is not None and self._leases.get(lid) == _STARTED
        try:
            entry = request_to_entry(request, self.spider)
        except Unserializable as exc:
            # Like Scrapy's disk queues: keep it in memory, local to this worker.
            self._inc("unserializable")
            self._warn("unserializable", "request %s cannot be stored in Redis (%s): "
                       "kept in this worker's memory only", request, exc)
            if transfer:
                self._finish(lid, fr.Op.ack(lid))
            request.meta.pop(META_LEASE, None)
            self._queue.append(request)
            return True
        fp = "" if request.dont_filter else self.df.request_fingerprint(request)
        if transfer:
            self._finish(lid, fr.Op.transfer(lid, fp, entry, request.priority), request.url)
        else:
            self._write(fr.Op.push(fp, entry, request.priority), request.url)
        self.stats.inc_value("scheduler/enqueued/redis")
        return True

    def next_request(self) -> Request | None:
        if not self._queue:
            return None
        request = self._queue.popleft()
        lid = request.meta.get(META_LEASE)
        if lid is not None and self._leases.get(lid) == _QUEUED:
            self._leases[lid] = _STARTED
        if len(self._queue) < self._refill_at:
            self._room.set()
        self.stats.inc_value("scheduler/dequeued/redis")
        return request

    def open(self, spider: Spider) -> Deferred[None]:  # type: ignore[override]
        self.spider = spider
        return deferred_from_coro(self._open())

    def close(self, reason: str) -> Deferred[None]:  # type: ignore[override]
        return deferred_from_coro(self._close(reason))

    def flush(self) -> None:
        raise RuntimeError("the shared frontier is never flushed by a worker")

    # -- seeding ----------------------------------------------------------------

    def fingerprint(self, request: Request) -> str:
        return self.df.request_fingerprint(request)

    async def seed_urls(self, urls: Iterable[str]) -> tuple[int, int]:
        """Queue start URLs (already validated) unless seen: (new, duplicate)."""
        new = dup = 0
        batch: list[tuple[str, str]] = []

        async def send() -> None:
            nonlocal new, dup
            n, d = await self._redis(self.frontier.seed, list(batch))
            new, dup = new + n, dup + d
            self._inc("seeded/new", n)
            self._inc("seeded/duplicate", d)
            batch.clear()

        for url in urls:
            request = seed_request(self.spider, {"url": url})
            batch.append((self.fingerprint(request), seed_entry(url)))
            if len(batch) >= SEED_BATCH:
                await send()
        if batch:
            await send()
        self._empty_since = None
        logger.info("seeded the frontier %s: %d new, %d duplicate", self.cfg.prefix, new, dup)
        return new, dup

    # -- open / close -----------------------------------------------------------

    async def _open(self) -> None:
        from scrapy.utils.asyncio import is_asyncio_available

        if not is_asyncio_available():
            logger.error("the Redis frontier needs the asyncio Twisted reactor")
            raise CloseSpider(FINISH_REASON_FRONTIER)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hexscrape-frontier"
        )
        try:
            await self._in_thread(self.frontier.check_types)
            reclaimed, previous = await self._in_thread(self.frontier.register)
        except fr.FrontierError as exc:
            logger.error("Redis frontier at %s: %s", redact_url(self.cfg.redis_url), exc)
            raise CloseSpider(FINISH_REASON_FRONTIER) from None
        except (redis.RedisError, OSError) as exc:
            logger.error("cannot reach Redis at %s: %s", redact_url(self.cfg.redis_url),
                         _reason(exc))
            raise CloseSpider(FINISH_REASON_REDIS) from None
        self._opened = True
        self._reap_after = time.monotonic()
        self._install_ack_hook()
        if reclaimed:
            self._inc("reclaimed", reclaimed)
        logger.info(
            "frontier %s on %s as worker %s: up to %d leases, heartbeat TTL %gs, "
            "idle close %gs", self.cfg.prefix, redact_url(self.cfg.redis_url), self.worker,
            self._limit, self.cfg.heartbeat_ttl, self.cfg.idle_close,
        )
        if reclaimed or previous:
            logger.warning(
                "worker %s restarted: put %d leases of its previous process back in the "
                "queue%s", self.worker, reclaimed,
                " (its heartbeat was still fresh)" if previous else "",
            )
        self._tasks = [
            asyncio.ensure_future(self._guard(self._pump(), "pump")),
            asyncio.ensure_future(self._guard(self._heartbeat(), "heartbeat")),
        ]

    async def _close(self, reason: str) -> None:
        if not self._opened:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            return
        self._opened = False
        self._stopping = True
        self._room.set()
        pump = self._tasks[:1]
        for task in pump:
            task.cancel()
        await asyncio.gather(*pump, return_exceptions=True)
        memory_only = sum(1 for r in self._queue if r.meta.get(META_LEASE) not in self._leases)
        if memory_only:
            logger.warning("%d unserializable requests were never crawled", memory_only)
        self._give_up_at = time.monotonic() + max(0.0, self.cfg.close_timeout)
        released = 0
        try:
            await self._flush_all()
            for task in self._tasks[1:]:
                task.cancel()  # a heartbeat already submitted still runs first
            await asyncio.gather(*self._tasks, return_exceptions=True)
            released = await self._redis(self.frontier.deregister)
        except Exception as exc:  # noqa: BLE001 - we must finish closing
            logger.error(
                "could not finish with the frontier on Redis at %s (%s): %d writes not "
                "delivered; this worker's leases return to the queue when its heartbeat "
                "expires", redact_url(self.cfg.redis_url), _reason(exc), len(self._outbox),
            )
        else:
            if released > 0:
                self._inc("released", released)
            elif released < 0:
                logger.warning("worker id %s was taken over by another process", self.worker)
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.client.close()
        logger.info("frontier worker %s closed (%s): %d unstarted leases put back",
                    self.worker, reason, max(released, 0))

    # -- the ack hook -----------------------------------------------------------

    def _install_ack_hook(self) -> None:
        engine = self.crawler.engine
        assert engine is not None
        scraper = engine.scraper
        original = scraper.enqueue_scrape

        def enqueue_scrape(result: Any, request: Request) -> Deferred[None]:
            lid = request.meta.get(META_LEASE)
            if lid is None or self._leases.get(lid) != _STARTED:
                return original(result, request)
            self._leases[lid] = _SCRAPING
            d = original(result, request)

            def done(out: T) -> T:
                self._finish(lid, fr.Op.ack(lid))
                return out

            d.addBoth(done)
            return d

        scraper.enqueue_scrape = enqueue_scrape  # type: ignore[method-assign]

    # -- leases -------------------------------------------------------------------

    def _finish(self, lid: str, op: fr.Op, note: str | None = None) -> None:
        """Lease *lid* is done locally; *op* settles it in Redis."""
        if self._leases.pop(lid, None) is not None:
            self._room.set()
        self._write(op, note)

    def _write(self, op: fr.Op, note: str | None = None) -> None:
        self._outbox.append((op, note))
        self._kick_flush()

    def _kick_flush(self) -> asyncio.Future[None]:
        """The one flush task (started if needed): ops are applied in order, once."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.ensure_future(self._flush_loop())
            self._flush_task.add_done_callback(self._flush_done)
        return self._flush_task

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._outbox:
            since = loop.time() - self._last_flush
            if since < FLUSH_LINGER and len(self._outbox) < FLUSH_BATCH and not self._stopping:
                await asyncio.sleep(FLUSH_LINGER - since)
            self._last_flush = loop.time()
            batch = self._outbox[:FLUSH_BATCH]
            results = await self._redis(self.frontier.apply, [op for op, _ in batch],
                                        fr.new_token())
            del self._outbox[: len(batch)]
            self._account(batch, results)

    def _flush_done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is None or self._stopping:
            return
        logger.error("frontier flush task failed", exc_info=task.exception())
        self._fail(FINISH_REASON_FRONTIER)

    async def _flush_all(self) -> None:
        """Wait until every buffered write is in Redis (raises if it gives up)."""
        while self._outbox or (self._flush_task is not None and not self._flush_task.done()):
            await asyncio.shield(self._kick_flush())

    def _account(self, batch: list[tuple[fr.Op, str | None]], results: list[int]) -> None:
        for (op, note), r in zip(batch, results):
            code = op.code
            if r == fr.REPLAYED:
                continue
            if code == "P":
                self._inc("enqueued" if r == fr.DONE else "duplicate")
            elif code == "T":
                if r == fr.STALE:
                    self._inc("stale")
                else:
                    self._inc("transferred")
                    if r == fr.DUPLICATE:
                        self._inc("duplicate")
            elif code == "A":
                self._inc("acked" if r == fr.DONE else "stale")
            elif code == "R" and r == fr.DONE:
                self._inc("released")
            if r == fr.DUPLICATE and code in ("P", "T"):
                self.stats.inc_value("dupefilter/filtered")
                if self.df.debug:
                    logger.debug("Filtered duplicate request <%s>", note)

    async def _pump(self) -> None:
        """Lease whenever there is room; close once the cluster is done."""
        wait = POLL_MIN
        engine = self.crawler.engine
        assert engine is not None
        while not self._stopping:
            if not engine.running:
                if self._was_running:
                    return  # the engine is stopping: lease nothing more
                await asyncio.sleep(POLL_MIN)
                continue
            self._was_running = True
            room = min(self._limit - len(self._leases), self._max_unstarted - len(self._queue))
            if room <= 0 or (room < self._refill_at and self._queue):
                await self._wait_room(self.cfg.poll_max)
                continue
            n = min(room, self.cfg.batch_size)
            leases, status = await self._redis(self.frontier.lease, n, fr.new_token())
            if self._stopping or not engine.running:
                return  # the leases stay in Redis; closing puts them back
            if leases:
                wait = POLL_MIN
                self._empty_since = None
                await self._accept(leases)
                continue
            if self._idle_locally() and status.mine:
                # Leases recorded in Redis whose reply we never got: put back.
                await self._redis(self.frontier.release_all)
                continue
            if await self._maybe_finish(status):
                return
            await self._wait_room(wait)
            wait = min(wait * 2, self.cfg.poll_max)

    def _idle_locally(self) -> bool:
        flushing = self._flush_task is not None and not self._flush_task.done()
        return not self._leases and not self._outbox and not flushing

    async def _maybe_finish(self, status: fr.Status) -> bool:
        now = time.monotonic()
        if not status.empty:
            self._empty_since = None
            return False
        if self._empty_since is None:
            self._empty_since = now
        if self.cfg.idle_close < 0 or now - self._empty_since < self.cfg.idle_close:
            return False
        if not self._idle_locally():
            return False
        engine = self.crawler.engine
        assert engine is not None
        self._may_close = True
        if not engine.spider_is_idle():
            self._may_close = False
            return False
        logger.info("the frontier %s has been empty for %.1fs cluster-wide: finishing",
                    self.cfg.prefix, now - self._empty_since)
        self._closing_spider = True
        deferred_from_coro(engine.close_spider_async(reason="finished"))
        return True

    async def _accept(self, leases: list[fr.Lease]) -> None:
        ready: list[Request] = []
        admits: list[tuple[fr.Lease, Request]] = []
        for lease in leases:
            self._leases[lease.id] = _QUEUED
            self._inc("leased")
            try:
                if lease.kind == "x":
                    raise ValueError("not a frontier queue member")
                request = entry_to_request(lease.payload, self.spider, self._seed)
            except Exception as exc:  # noqa: BLE001 - any garbage is malformed
                self._malformed(lease, exc)
                continue
            request.meta[META_LEASE] = lease.id
            if lease.kind == "s":
                admits.append((lease, request))
            else:
                ready.append(request)
        if admits:
            ops = []
            for lease, request in admits:
                fp = "" if request.dont_filter else self.fingerprint(request)
                entry = lease.payload.decode("utf-8").strip()
                if not entry.startswith("{"):
                    entry = seed_entry(entry)
                ops.append(fr.Op.admit(lease.id, fp, entry, request.priority))
            results = await self._redis(self.frontier.apply, ops, fr.new_token())
            for (lease, request), r in zip(admits, results):
                if r == fr.DONE:
                    ready.append(request)
                    continue
                self._leases.pop(lease.id, None)
                self._room.set()
                if r == fr.DUPLICATE:
                    self._inc("duplicate")
                    self.stats.inc_value("dupefilter/filtered")
                else:
                    self._inc("stale")
        engine = self.crawler.engine
        assert engine is not None
        for request in ready:
            if self._stopping or engine.spider is None:
                return  # left in Redis; closing puts them back
            self._injected.add(request)
            engine.crawl(request)
            if request in self._injected:  # dropped by a request_scheduled handler
                self._injected.discard(request)
                lid = request.meta[META_LEASE]
                self._finish(lid, fr.Op.ack(lid))

    def _seed(self, obj: dict[str, Any]) -> Request:
        return seed_request(self.spider, obj)

    def _malformed(self, lease: fr.Lease, exc: BaseException) -> None:
        self._inc("malformed")
        self._warn("malformed", "dropped a malformed frontier entry %r (%s); kept in %s",
                   lease.payload[:200], _reason(exc), self.frontier.keys.malformed)
        self._finish(lease.id, fr.Op.malformed(lease.id, lease.payload))

    async def _wait_room(self, timeout: float) -> None:
        self._room.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout)

    # -- heartbeat and reaper -------------------------------------------------------

    async def _heartbeat(self) -> None:
        next_reap = time.monotonic() + self.cfg.reap_interval
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            state = await self._redis(self.frontier.heartbeat)
            if state == 0:
                self._inc("heartbeat_lapsed")
                logger.warning(
                    "worker %s: heartbeat had lapsed; leases taken back meanwhile will "
                    "be crawled again elsewhere", self.worker)
            elif state < 0:
                logger.error("worker id %s was taken over by another process: stopping",
                             self.worker)
                self._fail(FINISH_REASON_REPLACED)
                return
            now = time.monotonic()
            if now >= next_reap and now >= self._reap_after:
                next_reap = now + self.cfg.reap_interval
                for worker, n in await self._redis(self.frontier.reap):
                    self._inc("reclaimed", n)
                    self._room.set()
                    self._empty_since = None
                    logger.warning("worker %s is gone: put its %d leases back in the queue",
                                   worker, n)

    # -- Redis calls ----------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    async def _redis(self, fn: Callable[..., T], *args: Any) -> T:
        """Call *fn* on the Redis thread, retrying connection errors with backoff.

        Every frontier call is safe to repeat (batch tokens, fingerprints).
        """
        delay = BACKOFF_START
        while True:
            try:
                result = await self._in_thread(fn, *args)
            except _RETRYABLE as exc:
                self._inc("redis_errors")
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    logger.error(
                        "lost the connection to Redis at %s (%s): retrying with backoff; "
                        "in-flight requests continue and their results are kept",
                        redact_url(self.cfg.redis_url), _reason(exc))
                if self._give_up_at is not None and now + delay > self._give_up_at:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if self._outage_since is not None:
                logger.warning("Redis at %s is back after %.1fs", redact_url(self.cfg.redis_url),
                               time.monotonic() - self._outage_since)
                self._outage_since = None
                # Let peers renew their heartbeats before reaping anyone.
                self._reap_after = time.monotonic() + self.cfg.heartbeat_ttl
            return result

    async def _guard(self, coro: Any, name: str) -> None:
        """Run a background task; a non-connection Redis error closes the spider."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._stopping:
                return
            logger.exception("frontier %s task failed", name)
            self._fail(FINISH_REASON_FRONTIER)

    def _fail(self, reason: str) -> None:
        """Stop leasing and close the spider with *reason* (once)."""
        self._stopping = True
        self._room.set()
        engine = self.crawler.engine
        if engine is not None and engine.spider is not None and not self._closing_spider:
            self._closing_spider = True
            deferred_from_coro(engine.close_spider_async(reason=reason))

    # -- helpers ----------------------------------------------------------------------

    def _inc(self, name: str, n: int = 1) -> None:
        if n:
            self.stats.inc_value(f"hexscrape/frontier/{name}", n)

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        count = self._warned.get(kind, 0) + 1
        self._warned[kind] = count
        if count <= MAX_WARNINGS:
            logger.warning(msg, *args)
        elif count == MAX_WARNINGS + 1:
            logger.warning("more %s frontier entries: further ones are only counted", kind)


__all__ = [
    "META_LEASE", "FrontierConfig", "FrontierScheduler", "RedisDupeFilter",
    "crawler_frontier_config", "entry_to_request", "frontier_config", "redact_url",
    "redis_problem", "request_to_entry", "seed_entry", "seed_request", "worker_id",
]
