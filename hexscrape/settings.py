"""Scrapy settings for hexscrape.

The proxy/slice settings (HEX_USER, HEX_PASS, HEX_GATEWAY, SESSION_POOL_SIZE,
WORKER_SLOT, SESSION_RANGE_START, SESSION_RANGE_END, SESSION_CONCURRENCY) are
deliberately not set here: hexscrape.config reads them from the Scrapy
settings first (-s NAME=..., scrapyd job settings) and then the environment.
"""

from importlib.util import find_spec as _find_spec

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
    # Per-request work the ip crawl never needs (allowed_domains, HTTP auth,
    # <meta refresh> scanning, byte counters); re-enable them if you do.
    "scrapy.downloadermiddlewares.offsite.OffsiteMiddleware": None,
    "scrapy.downloadermiddlewares.httpauth.HttpAuthMiddleware": None,
    "scrapy.downloadermiddlewares.redirect.MetaRefreshMiddleware": None,
    "scrapy.downloadermiddlewares.stats.DownloaderStats": None,
    # Download timeout, default headers and user agent in one hop (hexscrape.lean).
    "scrapy.downloadermiddlewares.downloadtimeout.DownloadTimeoutMiddleware": None,
    "scrapy.downloadermiddlewares.defaultheaders.DefaultHeadersMiddleware": None,
    "scrapy.downloadermiddlewares.useragent.UserAgentMiddleware": None,
    "hexscrape.lean.LeanRequestDefaults": 400,
    # Scrapy's, answering "empty jar, no Set-Cookie" without the cookie parser.
    "scrapy.downloadermiddlewares.cookies.CookiesMiddleware": None,
    "hexscrape.lean.LeanCookiesMiddleware": 700,
    # Scrapy's, minus a start-up warning about the disabled RefererMiddleware.
    "scrapy.downloadermiddlewares.redirect.RedirectMiddleware": None,
    "hexscrape.middlewares.RedirectMiddleware": 600,
}
SPIDER_MIDDLEWARES = {
    "scrapy.spidermiddlewares.referer.RefererMiddleware": None,
    "scrapy.spidermiddlewares.urllength.UrlLengthMiddleware": None,
    "scrapy.spidermiddlewares.depth.DepthMiddleware": None,
    "scrapy.spidermiddlewares.metacopy.MetaCopyDetectionMiddleware": None,
}
# Scrapy re-parses a callback's source for every response when the callback
# is a bound method (its cache is keyed by the short-lived bound method):
# ~14% of the CPU of a crawl. Our callbacks return nothing.
WARN_ON_GENERATOR_RETURN_VALUE = False
DOWNLOAD_HANDLERS = {
    "http": "hexscrape.handlers.SessionHTTP11DownloadHandler",
    "https": "hexscrape.handlers.SessionHTTP11DownloadHandler",
}

# uvloop runs the asyncio loop under Twisted's asyncio reactor ~5% cheaper.
# It must be chosen here (or with -s), before the reactor is installed; a
# spider's custom_settings is too late. Skipped where uvloop is not installed.
if _find_spec("uvloop") is not None:  # not on Windows
    ASYNCIO_EVENT_LOOP = "uvloop.Loop"

# Lean versions of Scrapy's per-request stats, log and item paths
# (hexscrape.lean): same behaviour, a tenth less CPU per request.
STATS_CLASS = "hexscrape.lean.LeanStatsCollector"
LOG_FORMATTER = "hexscrape.lean.LeanLogFormatter"

EXTENSIONS = {
    "hexscrape.lean.LeanItemPath": 0,
    "hexscrape.lean.LeanSignals": 0,
    "hexscrape.extensions.StatsDump": 900,
    "hexscrape.extensions.StatsReporter": 910,
    "hexscrape.extensions.SliceLeaseKeeper": 920,
}

# Shared frontier (hexscrape.frontier, hexscrape.scheduler). This scheduler is
# Scrapy's own in-process one unless REDIS_URL is set; then all workers lease
# from one Redis frontier. Read from the setting first, then the environment
# (so they are deliberately not set here), defaults in brackets:
#   REDIS_URL                    redis://host:port/db; enables the frontier
#   REDIS_KEY_PREFIX             [spider name] prefix of every key (ip:requests...)
#   IDLE_CLOSE_SECONDS           [5] close once the whole cluster's frontier has
#                                been empty this long; negative: never close
#   FRONTIER_HEARTBEAT_TTL       [10] s; a dead worker's leases return after this
#                                plus FRONTIER_REAP_INTERVAL
#   FRONTIER_HEARTBEAT_INTERVAL  [TTL/5] s
#   FRONTIER_REAP_INTERVAL       [3] s between checks for dead workers
#   FRONTIER_PREFETCH            [CONCURRENT_REQUESTS] leases held beyond those
#                                in flight (unstarted ones are never crawled twice)
#   FRONTIER_BATCH_SIZE          [100] max entries per lease call
#   FRONTIER_POLL_MAX            [1] s between polls of an empty frontier
#   FRONTIER_REDIS_TIMEOUT       [3] s socket connect/read timeout
#   FRONTIER_CLOSE_TIMEOUT       [15] s to keep trying Redis while closing
#   FRONTIER_MALFORMED_KEEP      [1000] malformed entries kept in <prefix>:malformed
SCHEDULER = "hexscrape.scheduler.FrontierScheduler"
