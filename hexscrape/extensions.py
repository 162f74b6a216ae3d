"""Scrapy extensions of hexscrape."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.asyncio import create_looping_call
from scrapy.utils.defer import deferred_from_coro
from twisted.internet.threads import deferToThread

from hexscrape.statsagg import KIND_FINAL, KIND_PROGRESS, RECORD_FIELD, build_record

if TYPE_CHECKING:
    from typing_extensions import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

logger = logging.getLogger(__name__)


class StatsDump:
    """Write the final stats as JSON to ``HEXSCRAPE_STATS_DUMP`` (off by default).

    For scripts and tests that need the figures of a finished crawl without
    parsing its log.
    """

    def __init__(self, crawler: Crawler, path: str) -> None:
        self.crawler = crawler
        self.path = Path(path)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        path = crawler.settings.get("HEXSCRAPE_STATS_DUMP")
        if not path:
            raise NotConfigured
        o = cls(crawler, path)
        crawler.signals.connect(o.spider_closed, signal=signals.spider_closed)
        return o

    def spider_closed(self, spider: Spider, reason: str) -> None:
        assert self.crawler.stats is not None
        stats: dict[str, Any] = dict(self.crawler.stats.get_stats())
        stats["finish_reason"] = reason
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(stats, default=str, sort_keys=True))
        tmp.replace(self.path)


class StatsReporter:
    """Publish this worker's figures to the cluster's Redis stats stream.

    Every ``HEXSCRAPE_STATS_INTERVAL`` seconds (default 5; 0 disables) a
    ``progress`` record, and one ``final`` record with the finish reason when
    the spider closes, are XADDed to ``HEXSCRAPE_STATS_STREAM`` (default
    ``<REDIS_KEY_PREFIX>:stats``, the prefix defaulting to the spider name),
    trimmed to about ``HEXSCRAPE_STATS_MAXLEN`` entries (default 5000). The
    record format is documented in :mod:`hexscrape.statsagg`; it holds counters
    and session ids only, never credentials. Disabled (NotConfigured) without
    ``REDIS_URL``.

    Redis is only touched from a worker thread, so a slow or lost Redis never
    stalls the crawl; the spider does not finish closing before the final
    record was sent (or failed), so a supervisor that sees this process exit
    can rely on the record being in the stream already.

    A primary that supervises this process sets ``HEXSCRAPE_RUN_ID``,
    ``HEXSCRAPE_INSTANCE`` and ``HEXSCRAPE_SUPERVISOR_PID`` (settings or
    environment variables). With the latter, a worker whose supervisor died
    (it got re-parented) drains and closes with reason ``shutdown`` instead of
    crawling on unsupervised.
    """

    def __init__(
        self,
        crawler: Crawler,
        redis_url: str,
        stream: str | None,
        interval: float,
        maxlen: int,
    ) -> None:
        self.crawler = crawler
        self.redis_url = redis_url
        self.stream = stream
        self.prefix: str | None = None
        self.interval = interval
        self.maxlen = maxlen
        self.run = self._opt("HEXSCRAPE_RUN_ID")
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.instance = self._opt("HEXSCRAPE_INSTANCE") or (
            f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        )
        supervisor = self._opt("HEXSCRAPE_SUPERVISOR_PID")
        self.supervisor_pid = int(supervisor) if supervisor and supervisor.isdigit() else None
        self.started = time.time()
        self.seq = 0
        self.task: Any = None
        self._client: Any = None
        self._frontier: Any = None
        self._sending: Any = None  # Deferred of the record being sent
        self._failures = 0
        self._orphaned = False

    def _opt(self, name: str) -> str | None:
        value = self.crawler.settings.get(name) or os.environ.get(name)
        return None if value in (None, "") else str(value)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        settings = crawler.settings
        redis_url = settings.get("REDIS_URL") or os.environ.get("REDIS_URL")
        interval = settings.getfloat("HEXSCRAPE_STATS_INTERVAL", 5.0)
        if not redis_url or interval <= 0:
            raise NotConfigured
        o = cls(
            crawler,
            redis_url,
            settings.get("HEXSCRAPE_STATS_STREAM") or None,
            interval,
            settings.getint("HEXSCRAPE_STATS_MAXLEN", 5000),
        )
        crawler.signals.connect(o.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(o.spider_closed, signal=signals.spider_closed)
        return o

    # -- signals -------------------------------------------------------------

    def spider_opened(self, spider: Spider) -> None:
        self.prefix = (
            self.crawler.settings.get("REDIS_KEY_PREFIX")
            or os.environ.get("REDIS_KEY_PREFIX")
            or spider.name
        )
        if self.stream is None:
            self.stream = f"{self.prefix}:stats"
        self.task = create_looping_call(self.tick)
        self.task.start(self.interval, now=True)

    def spider_closed(self, spider: Spider, reason: str) -> Deferred[None]:
        if self.task is not None and self.task.running:
            self.task.stop()
        return deferToThread(self._send_final, self.record(KIND_FINAL, finish_reason=reason))

    # -- reporting -----------------------------------------------------------

    def tick(self) -> None:
        self._check_supervisor()
        if self._sending is not None:
            return  # the previous record is still on its way: skip this one
        d = deferToThread(self._send, self.record(KIND_PROGRESS))

        def done(_: Any) -> None:
            self._sending = None

        d.addBoth(done)
        self._sending = d

    def record(self, kind: str, finish_reason: str | None = None) -> dict[str, Any]:
        """A record of the current stats (reactor thread: the stats are ours)."""
        assert self.crawler.stats is not None
        cfg = getattr(self.crawler, "hexscrape_config", None)
        slot = cfg.worker_slot if cfg is not None else self._opt("WORKER_SLOT")
        self.seq += 1
        rss, maxrss = _memory()
        return build_record(
            self.crawler.stats.get_stats(),
            kind=kind,
            seq=self.seq,
            instance=self.instance,
            slot=slot,
            pid=self.pid,
            host=self.host,
            started=self.started,
            now=time.time(),
            run=self.run,
            rss_bytes=rss,
            maxrss_bytes=maxrss,
            finish_reason=finish_reason,
        )

    def _send_final(self, record: dict[str, Any]) -> None:
        self._send(record)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a broken connection is not worth a traceback
                pass

    def _send(self, record: dict[str, Any]) -> bool:
        """(Worker thread) add the frontier's size, XADD; never raises."""
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(
                    self.redis_url, socket_timeout=2, socket_connect_timeout=2
                )
            record["queued"], record["leased"] = self._frontier_size()
            self._client.xadd(
                self.stream,
                {RECORD_FIELD: json.dumps(record, separators=(",", ":"))},
                maxlen=self.maxlen,
                approximate=True,
            )
        except Exception as exc:  # stats must never break the crawl
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                logger.warning(
                    "could not send a stats record to %s (%d failures so far): %s",
                    self.stream, self._failures, type(exc).__name__,
                )
            return False
        return True

    def _frontier_size(self) -> tuple[int | None, int | None]:
        """(queued, leased) of the whole cluster, if the frontier is in use."""
        if self._frontier is None:
            try:
                from hexscrape.frontier import Frontier
            except ImportError:
                return None, None
            assert self.prefix is not None
            self._frontier = Frontier(self._client, self.prefix, "stats-reporter")
        st = self._frontier.status()
        return st.queued + st.start_urls, st.leased

    def _check_supervisor(self) -> None:
        if self.supervisor_pid is None or self._orphaned:
            return
        if os.getppid() == self.supervisor_pid:
            return
        self._orphaned = True
        logger.warning(
            "supervisor (pid %d) is gone: draining and closing", self.supervisor_pid
        )
        engine: Any = self.crawler.engine
        if engine is not None and engine.spider is not None:
            deferred_from_coro(engine.close_spider_async(reason="shutdown"))


def _memory() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) in bytes.

    Current RSS comes from /proc/self/statm: unlike ru_maxrss it is not
    inflated by whatever the parent process had mapped when it spawned us.
    """
    rss: int | None = None
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform != "darwin":
        maxrss *= 1024
    return rss, int(maxrss)


class SliceLeaseKeeper:
    """Keeps this worker's session-slice lease alive and releases it on close.

    The lease itself is claimed before the crawl starts (see
    ``hexscrape.middlewares.crawler_config``); this renews it every third of
    ``SESSION_LEASE_TTL`` and, if another worker took a session over (this
    process was frozen longer than the TTL), stops the crawl rather than share.
    """

    def __init__(self, crawler: Crawler, lease: Any) -> None:
        self.crawler = crawler
        self.lease = lease
        self.task: Any = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        from hexscrape.middlewares import crawler_config

        crawler_config(crawler)  # claims the lease when Redis is configured
        lease = getattr(crawler, "hexscrape_slice_lease", None)
        if lease is None:
            raise NotConfigured
        o = cls(crawler, lease)
        crawler.signals.connect(o.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(o.spider_closed, signal=signals.spider_closed)
        return o

    def spider_opened(self, spider: Spider) -> None:
        self.task = create_looping_call(self.renew)
        self.task.start(max(0.2, self.lease.ttl / 3), now=False)

    def renew(self) -> None:
        import redis

        try:
            lost = self.lease.renew()
        except redis.RedisError as exc:
            logger.warning("cannot renew the session-slice lease: %s", exc)
            return
        if lost:
            logger.error(
                "%d session(s) of this worker's slice were taken over by another "
                "worker: stopping so that no session is shared", lost,
            )
            self.crawler.stats.set_value("hexscrape/slice/lost", lost)
            engine = self.crawler.engine
            if engine is not None and engine.spider is not None:
                deferred_from_coro(engine.close_spider_async(reason="slice_lost"))

    def spider_closed(self, spider: Spider, reason: str) -> None:
        import redis

        if self.task is not None and self.task.running:
            self.task.stop()
        try:
            self.lease.release()
        except redis.RedisError as exc:
            logger.warning("cannot release the session-slice lease (it expires by itself): %s", exc)
