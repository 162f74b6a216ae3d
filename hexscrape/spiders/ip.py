"""The ``ip`` spider: fetch ``/ip`` style URLs, one item per response."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import scrapy
from scrapy.http import Request, Response
from twisted.python.failure import Failure

from hexscrape.config import ConfigError
from hexscrape.middlewares import META_SESSION
from hexscrape.scheduler import FrontierScheduler
from hexscrape.urls import DEFAULT_URL_TEMPLATE, check_url_file, iter_lines, url_problem

logger = logging.getLogger(__name__)

MAX_INVALID_WARNINGS = 20


async def wait_below(scheduler: Any, low: int) -> None:
    """Until *scheduler* holds at most *low* requests."""
    wait = getattr(scheduler, "wait_below", None)  # hexscrape.lean.LeanScheduler
    if wait is not None:
        await wait(low)
        return
    while len(scheduler) > low:  # another scheduler (Scrapy's, with JOBDIR)
        await asyncio.sleep(0.05)


def _parse_count(raw: Any) -> int:
    try:
        count = int(str(raw))
    except ValueError:
        raise ConfigError(f"-a count={raw!r} is not an integer") from None
    if count < 0:
        raise ConfigError(f"-a count={count} must be >= 0")
    return count


class IpSpider(scrapy.Spider):
    """Fetch URLs through the sticky-session gateway and record the exit IP.

    Arguments: ``-a urls=FILE`` (one URL per line, ``-`` for stdin; blank and
    ``#`` lines skipped; invalid URLs reported, skipped and counted), otherwise
    ``-a count=N`` (default 1000) URLs of ``https://httpbin.org/ip?n=<i>``.

    With ``REDIS_URL`` set the spider crawls the shared frontier instead
    (:mod:`hexscrape.scheduler`): ``-a urls``/``-a count`` given explicitly are
    seeded into it first (duplicates are crawled once cluster-wide); without
    them the worker only takes what others seeded.
    """

    name = "ip"

    def __init__(self, urls: str | None = None, count: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.urls_file = urls
        self.count_given = count is not None
        self.count = 1000 if count is None else _parse_count(count)
        self._invalid = 0

    @classmethod
    def check_args(cls, spargs: dict[str, Any]) -> None:
        """Validate arguments before the crawl starts (one-line errors)."""
        if spargs.get("urls"):
            problem = check_url_file(spargs["urls"])
            if problem:
                raise ConfigError(f"-a urls: {problem}")
        if "count" in spargs:
            _parse_count(spargs["count"])

    # -- start ---------------------------------------------------------------

    def iter_start_urls(self) -> Iterator[str]:
        if not self.urls_file:
            for i in range(self.count):
                yield DEFAULT_URL_TEMPLATE.format(i=i)
            return
        for lineno, line in iter_lines(self.urls_file):
            problem = url_problem(line)
            if problem is None:
                yield line
                continue
            self._invalid += 1
            self.crawler.stats.inc_value("hexscrape/urls/invalid")
            if self._invalid <= MAX_INVALID_WARNINGS:
                logger.warning("skipped invalid URL on line %d: %r %s", lineno, line[:200], problem)
            elif self._invalid == MAX_INVALID_WARNINGS + 1:
                logger.warning("more invalid URLs: further ones are only counted")

    def make_request(self, url: str, **kwargs: Any) -> Request:
        meta = kwargs.pop("meta", None) or {}
        meta.setdefault("handle_httpstatus_all", True)
        return Request(url, callback=self.parse, errback=self.failed, meta=meta, **kwargs)

    async def start(self) -> AsyncIterator[Any]:
        engine = self.crawler.engine
        scheduler = engine.scheduler if engine is not None else None
        if isinstance(scheduler, FrontierScheduler):
            # Requests come from Redis through the scheduler; only seed here.
            if self.urls_file or self.count_given:
                await scheduler.seed_urls(self.iter_start_urls())
            return
        # Scrapy keeps taking start requests while the downloader is full, so
        # a big URL file would land in memory at once. Keep at most a backlog
        # of HEXSCRAPE_START_BACKLOG queued requests (default 4 x
        # CONCURRENT_REQUESTS, at least 100); refill when half of it is gone.
        backlog = self.settings.getint("HEXSCRAPE_START_BACKLOG") or max(
            100, 4 * self.settings.getint("CONCURRENT_REQUESTS"))
        for url in self.iter_start_urls():
            yield self.make_request(url)
            if scheduler is not None and len(scheduler) >= backlog:
                await wait_below(scheduler, backlog // 2)

    # -- results -------------------------------------------------------------

    def worker(self) -> str | None:
        cfg = getattr(self.crawler, "hexscrape_config", None)
        return cfg.worker_slot if cfg is not None else self.settings.get("WORKER_SLOT")

    def parse(self, response: Response) -> Iterator[dict[str, Any]]:
        session = response.meta.get(META_SESSION)
        ok = 200 <= response.status < 300
        stats = self.crawler.stats
        stats.inc_value("hexscrape/requests/ok" if ok else "hexscrape/requests/failed")
        if isinstance(session, str):
            stats.inc_value(f"hexscrape/session/{session}/{'ok' if ok else 'failed'}")
        exit_ip = None
        if response.body[:1] == b"{":
            try:
                exit_ip = json.loads(response.body).get("origin")
            except (ValueError, AttributeError):
                exit_ip = None
        latency = response.meta.get("download_latency")
        yield {
            "url": response.url,
            "status": response.status,
            "session": session if isinstance(session, str) else None,
            "exit_ip": exit_ip,
            "latency_ms": None if latency is None else round(latency * 1000, 1),
            "worker": self.worker(),
        }

    def failed(self, failure: Failure) -> None:
        request = failure.request  # type: ignore[attr-defined]
        session = request.meta.get(META_SESSION)
        stats = self.crawler.stats
        stats.inc_value("hexscrape/requests/failed")
        if isinstance(session, str):
            stats.inc_value(f"hexscrape/session/{session}/failed")
        logger.warning(
            "failed %s via session %s: %s",
            request.url, session, failure.getErrorMessage() or failure.type.__name__,
        )
