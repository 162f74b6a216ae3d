"""Test spider for hexscrape.lean: sync and async callbacks, follow-ups, errors."""

import scrapy


class LeanSpider(scrapy.Spider):
    name = "lean"

    async def start(self):
        origin = self.settings.get("TEST_ORIGIN")
        yield scrapy.Request(f"{origin}/ip?sync", dont_filter=True)
        yield scrapy.Request(f"{origin}/ip?async", callback=self.parse_async, dont_filter=True)
        yield scrapy.Request(f"{origin}/ip?boom", dont_filter=True)

    def parse(self, response):
        tag = response.url.rsplit("?", 1)[1]
        yield {"tag": tag, "n": 1}
        yield {"tag": tag, "n": 2}
        if tag == "boom":
            raise ValueError("callback failed after two items")
        if tag == "sync":
            yield response.follow("/ip?followed", dont_filter=True)

    async def parse_async(self, response):
        tag = response.url.rsplit("?", 1)[1]
        for n in (1, 2, 3):
            yield {"tag": tag, "n": n}
