"""Scrapy settings for hexscrape.

The proxy/slice settings (HEX_USER, HEX_PASS, HEX_GATEWAY, SESSION_POOL_SIZE,
WORKER_SLOT, SESSION_RANGE_START, SESSION_RANGE_END, SESSION_CONCURRENCY) are
deliberately not set here: hexscrape.config reads them from the Scrapy
settings first (-s NAME=..., scrapyd job settings) and then the environment.
"""

BOT_NAME = "hexscrape"
SPIDER_MODULES = ["hexscrape.spiders"]
NEWSPIDER_MODULE = "hexscrape.spiders"
COMMANDS_MODULE = "hexscrape.commands"

ROBOTSTXT_OBEY = False
LOG_LEVEL = "INFO"
FEED_EXPORT_ENCODING = "utf-8"

# The reference design: 25 requests in flight per process, all to one gateway.
CONCURRENT_REQUESTS = 25
CONCURRENT_REQUESTS_PER_DOMAIN = 25
# One item per response: more parallel item slots only cost CPU.
CONCURRENT_ITEMS = 1
DOWNLOAD_TIMEOUT = 30
RETRY_TIMES = 2

# Scrapy 2.19 turns these on by default; a crawler fleet must not open ports.
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False

DOWNLOADER_MIDDLEWARES = {
    # Before CookiesMiddleware (700, per-session jars) and HttpProxyMiddleware
    # (750, turns the credentials in meta["proxy"] into the header).
    "hexscrape.middlewares.StickySessionMiddleware": 650,
}
DOWNLOAD_HANDLERS = {
    "http": "hexscrape.handlers.SessionHTTP11DownloadHandler",
    "https": "hexscrape.handlers.SessionHTTP11DownloadHandler",
}

EXTENSIONS = {
    "hexscrape.extensions.StatsDump": 900,
}
