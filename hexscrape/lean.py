"""Lean replacements for Scrapy's generic per-request paths.

Scrapy 2.19 pays for generality on every request. Each stats call goes through a
deprecation wrapper. Every response and item builds a DEBUG log record that
INFO logging then drops. Every response's output goes through an
``asyncio.Queue`` and two tasks, even with ``CONCURRENT_ITEMS`` 1. Every signal
is looked up in pydispatch, listened to or not. Every request passes three
queue layers, the cookie parser, and three one-line middlewares.

Together that was roughly 15 % of a crawl's CPU (``bench/``). Each class here
keeps Scrapy's behaviour (``tests/test_lean.py`` compares them with Scrapy's
own components), drops only the overhead, and is switched on by hexscrape's
settings. Each can be switched back:

- ``STATS_CLASS = "hexscrape.lean.LeanStatsCollector"``
- ``LOG_FORMATTER = "hexscrape.lean.LeanLogFormatter"``
- ``EXTENSIONS["hexscrape.lean.LeanItemPath"]`` (``LEAN_ITEM_PATH = False`` turns
  it off).
- ``EXTENSIONS["hexscrape.lean.LeanSignals"]`` (``LEAN_SIGNALS = False`` turns it
  off).
- ``FRONTIER_FALLBACK_SCHEDULER = "hexscrape.lean.LeanScheduler"``: the in-process
  scheduler used without ``REDIS_URL``.
- ``DOWNLOADER_MIDDLEWARES["hexscrape.lean.LeanCookiesMiddleware"]`` in place of
  Scrapy's ``CookiesMiddleware``.
- ``DOWNLOADER_MIDDLEWARES["hexscrape.lean.LeanRequestDefaults"]`` in place of
  ``DownloadTimeoutMiddleware``, ``DefaultHeadersMiddleware`` and
  ``UserAgentMiddleware``.

It relies on details of Scrapy 2.19's engine, hence ``scrapy<2.20``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from pydispatch import dispatcher
from scrapy import signals
from scrapy.core.scheduler import Scheduler
from scrapy.downloadermiddlewares.cookies import CookiesMiddleware
from scrapy.exceptions import NotConfigured
from scrapy.http import Headers
from scrapy.logformatter import LogFormatter
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.defer import aiter_errback, iter_errback
from scrapy.utils.deprecate import warn_on_deprecated_spider_attribute
from scrapy.utils.job import job_dir
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.python import without_none_values

if TYPE_CHECKING:
    from typing_extensions import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.dupefilters import BaseDupeFilter
    from scrapy.http import Request, Response
    from scrapy.statscollectors import StatsCollector
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

logger = logging.getLogger(__name__)

_ENGINE_LOGGER = logging.getLogger("scrapy.core.engine")


class LeanStatsCollector(MemoryStatsCollector):
    """Scrapy's ``MemoryStatsCollector`` with plain attribute access.

    Scrapy 2.19's ``StatsCollector.__getattribute__`` wraps every stats method
    to warn about a deprecated ``spider`` argument, and looks up a cache
    attribute (raising ``AttributeError``) on every attribute read, ``_stats``
    included: several microseconds per ``inc_value``, called ~15 times per
    request. Same methods and results; only that warning is not given.
    """

    __getattribute__ = object.__getattribute__  # type: ignore[assignment]


class LeanLogFormatter(LogFormatter):
    """Skip building the per-response and per-item DEBUG records nobody sees.

    Scrapy builds "Crawled (200) ..." and "Scraped from ..." records for every
    response and item, and its root handler drops them at ``LOG_LEVEL`` INFO.
    Returning ``None`` makes Scrapy skip the record. When a handler would show
    DEBUG records (checked at the first response), they are built as before.
    """

    _debug: bool | None = None

    def _show_debug(self) -> bool:
        if self._debug is None:
            self._debug = _debug_shown()
        return self._debug

    def crawled(self, request: Request, response: Response, spider: Spider) -> Any:
        if not self._show_debug():
            return None
        return super().crawled(request, response, spider)

    def scraped(self, item: Any, response: Response | Failure | None, spider: Spider) -> Any:
        if not self._show_debug():
            return None
        return super().scraped(item, response, spider)


def _debug_shown() -> bool:
    """Whether a DEBUG record of Scrapy's engine would reach a handler that shows it.

    Scrapy leaves its loggers at DEBUG and filters in its root handler at
    ``LOG_LEVEL``, so the logger level alone does not tell.
    """
    logger_: logging.Logger | None = _ENGINE_LOGGER
    if not _ENGINE_LOGGER.isEnabledFor(logging.DEBUG):
        return False
    while logger_ is not None:
        if any(h.level <= logging.DEBUG for h in logger_.handlers):
            return True
        logger_ = logger_.parent if logger_.propagate else None
    return False


class LeanItemPath:
    """Handle a response's output inline when ``CONCURRENT_ITEMS`` is 1.

    Scrapy hands every response's output to ``_parallel_asyncio``: a queue, a
    filler task and ``CONCURRENT_ITEMS`` worker tasks per response. With one
    item slot that is the same sequential processing with three extra tasks;
    this extension processes the output in the response's own coroutine.
    Errors while iterating go to the same errback as in Scrapy.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        settings = crawler.settings
        if not settings.getbool("LEAN_ITEM_PATH", True) or settings.getint("CONCURRENT_ITEMS") != 1:
            raise NotConfigured
        ext = cls(crawler)
        crawler.signals.connect(ext.spider_opened, signal=signals.spider_opened)
        return ext

    def spider_opened(self, spider: Spider) -> None:
        engine = self.crawler.engine
        scraper = getattr(engine, "scraper", None)
        process = getattr(scraper, "_process_spidermw_output_async", None)
        if scraper is None or process is None or not hasattr(scraper, "handle_spider_output_async"):
            logger.warning("LeanItemPath: this Scrapy version's scraper is not the "
                           "expected one; keeping Scrapy's own output handling")
            return
        on_error = scraper.handle_spider_error

        async def handle_spider_output_async(
            result: Iterable[Any] | AsyncIterator[Any], request: Request,
            response: Response | Failure,
        ) -> None:
            if isinstance(result, AsyncIterator):
                async for out in aiter_errback(result, on_error, request, response):
                    await process(out, response)
                return
            for out in iter_errback(result, on_error, request, response):
                await process(out, response)

        scraper.handle_spider_output_async = handle_spider_output_async


class LeanSignals:
    """Return at once from signals nobody listens to.

    Scrapy sends about ten signals per request (request_scheduled,
    headers_received, bytes_received, response_downloaded, ...); most have no
    receiver in a crawl, yet each send walks pydispatch's receiver lookup and
    builds the result list. This checks pydispatch's connection table first;
    a signal with a receiver is sent by Scrapy exactly as before.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        if not crawler.settings.getbool("LEAN_SIGNALS", True):
            raise NotConfigured
        manager = crawler.signals
        send, send_async = manager.send_catch_log, manager.send_catch_log_async
        sender = manager.sender

        def send_catch_log(signal: Any, **kwargs: Any) -> list[tuple[Any, Any]]:
            if not _has_receivers(kwargs.get("sender", sender), signal):
                return []
            return send(signal, **kwargs)

        async def send_catch_log_async(signal: Any, **kwargs: Any) -> list[tuple[Any, Any]]:
            if not _has_receivers(kwargs.get("sender", sender), signal):
                return []
            return await send_async(signal, **kwargs)

        manager.send_catch_log = send_catch_log  # type: ignore[method-assign]
        manager.send_catch_log_async = send_catch_log_async  # type: ignore[method-assign]
        return cls(crawler)


def _has_receivers(sender: Any, signal: Any) -> bool:
    """Whether pydispatch has any receiver for *signal* from *sender*.

    Mirrors ``pydispatch.dispatcher.getAllReceivers``: receivers of this
    sender or of any sender, for this signal or for any signal.
    """
    connections = dispatcher.connections
    for key in (id(sender), id(dispatcher.Any)):
        by_signal = connections.get(key)
        if by_signal and (by_signal.get(signal) or by_signal.get(dispatcher.Any)):
            return True
    return False


class LeanScheduler:
    """In-memory scheduler with Scrapy's ordering and duplicate filter, minus its layers.

    Scrapy's default scheduler pushes each request through a
    ``DownloaderAwarePriorityQueue`` (a priority queue per downloader slot,
    each a dict of queue objects built per priority) and counts it in four
    stats; that is ~5% of a crawl's CPU. Here: one deque per priority.

    Same behaviour as Scrapy's in-memory scheduler with default queues: higher
    ``priority`` first; within a priority, requests from callbacks last-in
    first-out, before start requests, which go first-in first-out; duplicates
    dropped by ``DUPEFILTER_CLASS`` (logged and counted as in Scrapy); the same
    ``scheduler/*`` stats. With ``JOBDIR`` set (pause and resume needs disk
    queues) Scrapy's own scheduler is used instead.
    """

    def __init__(self, dupefilter: BaseDupeFilter, stats: StatsCollector | None) -> None:
        self.df = dupefilter
        self.stats = stats
        self.spider: Spider | None = None
        self._queues: dict[int, deque[Request]] = {}  # callbacks' requests, LIFO
        self._start: dict[int, deque[Request]] = {}  # start requests, FIFO
        self._top: int | None = None  # highest priority with a request
        self._len = 0
        self._peak = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Any:
        if job_dir(crawler.settings):
            return Scheduler.from_crawler(crawler)
        dupefilter = build_from_crawler(load_object(crawler.settings["DUPEFILTER_CLASS"]), crawler)
        return cls(dupefilter, crawler.stats)

    def open(self, spider: Spider) -> Deferred[None] | None:
        self.spider = spider
        return self.df.open()

    def close(self, reason: str) -> Deferred[None] | None:
        if self.stats is not None:
            self.stats.max_value("hexscrape/scheduler/peak_queued", self._peak)
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        return self.df.close(reason)

    def has_pending_requests(self) -> bool:
        return self._len > 0

    async def wait_below(self, low: int) -> None:
        """Until at most *low* requests are queued: lets start() feed lazily."""
        if self._len <= low:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((low, fut))
        await fut

    def __len__(self) -> int:
        return self._len

    def enqueue_request(self, request: Request) -> bool:
        if not request.dont_filter and self.df.request_seen(request):
            self.df.log(request, self.spider)
            return False
        prio = request.priority
        queues = self._start if request.meta.get("is_start_request") else self._queues
        q = queues.get(prio)
        if q is None:
            q = queues[prio] = deque()
        q.append(request)
        self._len += 1
        if self._len > self._peak:
            self._peak = self._len
        if self._top is None or prio > self._top:
            self._top = prio
        if self.stats is not None:
            self.stats.inc_value("scheduler/enqueued/memory")
            self.stats.inc_value("scheduler/enqueued")
        return True

    def next_request(self) -> Request | None:
        prio = self._top
        if prio is None:
            return None
        # Buckets are never left empty, so _top always has a request.
        q = self._queues.get(prio)
        if q:
            request = q.pop()
            if not q:
                del self._queues[prio]
        else:
            q = self._start[prio]
            request = q.popleft()
            if not q:
                del self._start[prio]
        if prio not in self._queues and prio not in self._start:
            self._top = max(self._queues.keys() | self._start.keys(), default=None)
        self._len -= 1
        if self._waiters:
            self._wake()
        if self.stats is not None:
            self.stats.inc_value("scheduler/dequeued/memory")
            self.stats.inc_value("scheduler/dequeued")
        return request

    def _wake(self) -> None:
        keep = []
        for low, fut in self._waiters:
            if fut.done():
                continue
            if self._len <= low:
                fut.set_result(None)
            else:
                keep.append((low, fut))
        self._waiters = keep


class LeanCookiesMiddleware(CookiesMiddleware):
    """Scrapy's ``CookiesMiddleware``, skipping the cookie jar when there is nothing to do.

    For every request Scrapy runs the standard library's cookie matching to add
    a ``Cookie`` header, and for every response its ``Set-Cookie`` parser, even
    when the jar is empty and the response sets no cookie (most of a proxy
    crawl): ~3% of a crawl's CPU. Those cases are answered directly, with the
    result Scrapy's code would give; everything else (cookies in the jar or
    the request, ``Set-Cookie`` in the response, ``COOKIES_DEBUG``) goes
    through Scrapy's code. Jars stay per ``meta["cookiejar"]``, i.e. per
    session generation (:class:`hexscrape.middlewares.StickySessionMiddleware`).
    """

    def process_request(self, request: Request) -> Any:  # type: ignore[override]
        meta = request.meta
        if request.cookies or self.debug or meta.get("dont_merge_cookies", False):
            return super().process_request(request)
        if self.jars[meta.get("cookiejar")].jar._cookies:
            return super().process_request(request)
        # Empty jar, no request cookies: Scrapy would drop any Cookie header
        # and add none.
        request.headers.pop("Cookie", None)
        return None

    def process_response(self, request: Request, response: Response) -> Any:  # type: ignore[override]
        headers = response.headers
        if not self.debug and b"Set-Cookie" not in headers and b"Set-Cookie2" not in headers:
            return response  # nothing to store
        return super().process_response(request, response)


class LeanRequestDefaults:
    """Scrapy's download-timeout, default-headers and user-agent middlewares in one step.

    Each of the three is a middleware hop per request, and each
    ``headers.setdefault`` re-normalises its header name and value. Here the
    headers are normalised once, at start, and applied in one hop with
    Scrapy's semantics: ``DOWNLOAD_TIMEOUT`` (or the spider's
    ``download_timeout``) into ``meta["download_timeout"]`` unless set;
    ``DEFAULT_REQUEST_HEADERS``, then ``USER_AGENT`` (or the spider's
    ``user_agent``), each only where the request lacks that header.
    """

    def __init__(self, timeout: float, headers: dict[str, Any], user_agent: str | None) -> None:
        self._timeout = timeout
        self._default_headers = headers
        self._user_agent = user_agent
        self._headers: list[tuple[bytes, list[bytes]]] = []
        self._build()

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        settings = crawler.settings
        o = cls(settings.getfloat("DOWNLOAD_TIMEOUT"),
                without_none_values(settings["DEFAULT_REQUEST_HEADERS"]), settings["USER_AGENT"])
        crawler.signals.connect(o.spider_opened, signal=signals.spider_opened)
        return o

    def spider_opened(self, spider: Spider) -> None:
        for attr, setting in (("download_timeout", "DOWNLOAD_TIMEOUT"), ("user_agent", "USER_AGENT")):
            if hasattr(spider, attr):  # deprecated by Scrapy; warn as its middlewares do
                warn_on_deprecated_spider_attribute(attr, setting)
        self._timeout = getattr(spider, "download_timeout", self._timeout)
        self._user_agent = getattr(spider, "user_agent", self._user_agent)
        self._build()

    def _build(self) -> None:
        norm = Headers()
        pairs = list(self._default_headers.items())
        if self._user_agent:
            pairs.append(("User-Agent", self._user_agent))
        self._headers = [(norm.normkey(k), norm.normvalue(v)) for k, v in pairs]

    def process_request(self, request: Request) -> None:
        if self._timeout:
            request.meta.setdefault("download_timeout", self._timeout)
        headers = request.headers
        for key, value in self._headers:  # keys and values already normalised
            if not dict.__contains__(headers, key):
                dict.__setitem__(headers, key, value.copy())
