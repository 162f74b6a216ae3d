"""Lean replacements for Scrapy's generic per-request paths.

Scrapy 2.19 pays for generality on every request: each stats call goes through a
deprecation wrapper that raises and catches an ``AttributeError`` per attribute
read; every response and item builds a DEBUG log record that INFO logging then
drops; every response's output is fanned out through an ``asyncio.Queue`` and
two tasks even when ``CONCURRENT_ITEMS`` is 1. Together that is roughly a tenth
of a crawl's CPU (see bench/). The classes here keep Scrapy's behaviour and
drop only that overhead; each is enabled by hexscrape's settings and can be
switched back to Scrapy's own:

- ``STATS_CLASS = "hexscrape.lean.LeanStatsCollector"``
- ``LOG_FORMATTER = "hexscrape.lean.LeanLogFormatter"``
- ``EXTENSIONS["hexscrape.lean.LeanItemPath"]`` (``LEAN_ITEM_PATH = False`` turns
  it off).
- ``EXTENSIONS["hexscrape.lean.LeanSignals"]`` (``LEAN_SIGNALS = False`` turns it
  off).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from pydispatch import dispatcher
from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.logformatter import LogFormatter
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.defer import aiter_errback, iter_errback

if TYPE_CHECKING:
    from typing_extensions import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Request, Response
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
