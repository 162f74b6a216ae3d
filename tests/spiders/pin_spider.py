"""Test spider: one pinned request, one opted out, one normal."""

import json

import scrapy


class PinSpider(scrapy.Spider):
    name = "pin"

    async def start(self):
        origin = self.settings.get("TEST_ORIGIN")
        yield scrapy.Request(f"{origin}/ip?pinned", meta={"hexscrape_session": "s002"}, dont_filter=True)
        yield scrapy.Request(f"{origin}/ip?direct", meta={"hexscrape_session": False}, dont_filter=True)
        yield scrapy.Request(f"{origin}/ip?normal", dont_filter=True)
        yield scrapy.Request(f"{origin}/ip?outside", meta={"hexscrape_session": "s039"}, dont_filter=True)

    def parse(self, response):
        yield {
            "url": response.url,
            "session": response.meta.get("hexscrape_session"),
            "origin": json.loads(response.text)["origin"],
        }
