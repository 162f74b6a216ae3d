"""Sticky-session downloader middleware.

Gives each request the next session of this process's slice and routes it
through the gateway with that session's proxy username. Credentials are put in
``meta["proxy"]`` percent-encoded; Scrapy's ``HttpProxyMiddleware`` (which runs
right after this one) turns them into the ``Proxy-Authorization`` header and
strips them from the meta. The per-session in-flight cap and the per-session
connection pools live in :mod:`hexscrape.handlers`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.misc import load_object

from hexscrape.config import ConfigError, HexConfig, load_config
from hexscrape.logredact import install_redaction
from hexscrape.sessions import AuthFailureTracker, SessionConfig, SessionPool

if TYPE_CHECKING:
    from typing_extensions import Self

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response

logger = logging.getLogger(__name__)

META_SESSION = "hexscrape_session"
"""Request meta: the session used (set by us); set it yourself to ``False`` to
opt a request out of the gateway, or to a session id of this slice to pin it."""
META_ASSIGNED = "_hexscrape_assigned"
"""Request meta: True when META_SESSION was chosen by us, not pinned by the user
(so a retry or redirect copy gets a fresh choice)."""

_TUNNEL_STATUS = re.compile(r"'status': (\d{3})")

FINISH_REASON_AUTH = "proxy_auth_failed"


def tunnel_status(exc: BaseException) -> int | None:
    """The proxy's status code inside a Scrapy ``TunnelError``, if any."""
    if type(exc).__name__ != "TunnelError":
        return None
    m = _TUNNEL_STATUS.search(str(exc))
    return int(m.group(1)) if m else None


def crawler_config(crawler: Crawler) -> HexConfig:
    """The validated config of *crawler*, computed once and cached on it."""
    cfg = getattr(crawler, "hexscrape_config", None)
    if cfg is None:
        cfg = load_config(crawler.settings.get)
        crawler.hexscrape_config = cfg  # type: ignore[attr-defined]
    return cfg


class StickySessionMiddleware:
    """Assigns sticky proxy sessions round-robin within this process's slice.

    Settings: ``HEXSCRAPE_SESSIONS_ENABLED`` (default True),
    ``HEXSCRAPE_SESSION_CONFIG`` (a :class:`~hexscrape.sessions.SessionConfig`
    subclass path), plus the proxy/slice settings of :mod:`hexscrape.config`.
    """

    def __init__(self, crawler: Crawler, config: HexConfig) -> None:
        self.crawler = crawler
        self.config = config
        self.stats = crawler.stats
        self.pool = SessionPool(config.sessions, config.session_concurrency)
        crawler.hexscrape_pool = self.pool  # type: ignore[attr-defined]
        policy_cls = load_object(
            crawler.settings.get("HEXSCRAPE_SESSION_CONFIG")
            or "hexscrape.sessions.SessionConfig"
        )
        self.policy: SessionConfig = policy_cls(crawler)
        self.auth = AuthFailureTracker(self.pool.sessions)
        self._proxy_urls = {s: config.proxy_url(s) for s in self.pool.sessions}
        self._stat_keys = {
            s: f"hexscrape/session/{s}/requests" for s in self.pool.sessions
        }
        self._auth_warned: set[str] = set()
        self._closing = False

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        if not crawler.settings.getbool("HEXSCRAPE_SESSIONS_ENABLED", True):
            raise NotConfigured
        config = crawler_config(crawler)
        if not config.gateway_enabled:
            raise NotConfigured
        install_redaction(config.secrets())
        o = cls(crawler, config)
        crawler.signals.connect(o.spider_opened, signal=signals.spider_opened)
        return o

    def spider_opened(self, spider: Spider) -> None:
        s = self.pool.sessions
        logger.info(
            "sticky sessions %s..%s (%d) via %s as %s-session-<id>, "
            "max %d in flight per session",
            s[0], s[-1], len(s), self.config.gateway, self.config.user,
            self.pool.max_in_flight,
        )

    def process_request(self, request: Request) -> None:
        meta = request.meta
        if not self.policy.enabled(request):
            meta["proxy"] = None  # direct; HttpProxyMiddleware drops any creds
            meta.pop(META_ASSIGNED, None)
            meta[META_SESSION] = False
            return None
        current = meta.get(META_SESSION)
        if isinstance(current, str) and not meta.get(META_ASSIGNED):
            if current not in self.pool:
                self.stats.inc_value("hexscrape/session/pinned_outside_slice")
                logger.error(
                    "request pinned to session %s, which is outside this "
                    "worker's slice %s..%s: dropped %s",
                    current, self.pool.sessions[0], self.pool.sessions[-1],
                    request.url,
                )
                raise IgnoreRequest(f"session {current} is outside this slice")
            sid = current
        else:
            sid = self.policy.pick(request, self.pool)
            meta[META_SESSION] = sid
            meta[META_ASSIGNED] = True
        meta["proxy"] = self._proxy_urls[sid]
        meta["cookiejar"] = sid  # a site's cookies never cross exit IPs
        self.stats.inc_value(self._stat_keys[sid])
        return None

    def process_response(self, request: Request, response: Response) -> Response:
        sid = request.meta.get(META_SESSION)
        if isinstance(sid, str) and sid in self.pool:
            if response.status == 407:
                self._auth_rejected(sid)
            else:
                self.auth.ok(sid)
        return response

    def process_exception(self, request: Request, exception: Exception) -> None:
        sid = request.meta.get(META_SESSION)
        if isinstance(sid, str) and sid in self.pool and tunnel_status(exception) == 407:
            self._auth_rejected(sid)
        return None

    def _auth_rejected(self, sid: str) -> None:
        self.stats.inc_value("hexscrape/proxy/auth_rejected")
        if sid not in self._auth_warned:
            self._auth_warned.add(sid)
            logger.error(
                "proxy gateway %s rejected the credentials for %s "
                "(407 Proxy Authentication Required): check HEX_USER/HEX_PASS",
                self.config.gateway, self.config.proxy_username(sid),
            )
        if self.auth.rejected(sid) and not self._closing:
            self._closing = True
            logger.error(
                "proxy credentials rejected (407) for every session of this "
                "slice: stopping the crawl"
            )
            engine: Any = self.crawler.engine
            if engine is not None and engine.spider is not None:
                deferred_from_coro(engine.close_spider_async(reason=FINISH_REASON_AUTH))


__all__ = ["ConfigError", "StickySessionMiddleware"]
