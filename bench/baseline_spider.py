"""Plain-Scrapy baseline for the benchmark: no hexscrape code, no hexscrape settings.

Run it with ``scrapy runspider`` from a directory OUTSIDE the project, so that
no ``scrapy.cfg`` (and so no ``hexscrape.settings``) applies::

    cd /tmp && python -m scrapy runspider /path/to/bench/baseline_spider.py \\
        -a urls=URLFILE -a proxy='http://USER-session-s000:PASS@127.0.0.1:PORT' -O out.jsonl

Every request goes through one fixed proxy session (credentials in
``meta["proxy"]``, turned into ``Proxy-Authorization`` by Scrapy's own
``HttpProxyMiddleware``); the item is the same as the ``ip`` spider's. All
Scrapy settings stay at their defaults unless given with ``-s``.
"""

from __future__ import annotations

import json

import scrapy


class BaselineSpider(scrapy.Spider):
    name = "baseline"

    def __init__(self, urls: str, proxy: str, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.urls_file = urls
        self.proxy = proxy

    async def start(self):  # type: ignore[no-untyped-def]
        with open(self.urls_file, encoding="utf-8") as f:
            for line in f:
                url = line.strip()
                if url and not url.startswith("#"):
                    yield scrapy.Request(url, meta={"proxy": self.proxy})

    def parse(self, response):  # type: ignore[no-untyped-def]
        exit_ip = None
        if response.body[:1] == b"{":
            exit_ip = json.loads(response.body).get("origin")
        latency = response.meta.get("download_latency")
        yield {
            "url": response.url,
            "status": response.status,
            "session": "s000",
            "exit_ip": exit_ip,
            "latency_ms": None if latency is None else round(latency * 1000, 1),
            "worker": None,
        }
