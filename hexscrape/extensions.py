"""Scrapy extensions of hexscrape."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured

if TYPE_CHECKING:
    from typing_extensions import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler

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
