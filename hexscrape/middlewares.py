"""Sticky-session downloader middleware.

Gives each request the next session of this process's slice and routes it
through the gateway with that session's proxy username. Credentials are put in
``meta["proxy"]`` percent-encoded; Scrapy's ``HttpProxyMiddleware`` (which runs
right after this one) turns them into the ``Proxy-Authorization`` header and
strips them from the meta. The per-session in-flight cap and the per-session
connection pools live in :mod:`hexscrape.handlers`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.downloadermiddlewares.redirect import RedirectMiddleware as BaseRedirectMiddleware
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.spidermiddlewares.referer import RefererMiddleware
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.misc import load_object

from hexscrape.config import (
    ConfigError,
    HexConfig,
    float_option,
    load_config,
    redact_url,
    setting_or_env,
)
from hexscrape.health import (
    AUTH,
    BAN,
    GATEWAY,
    OK,
    GatewayMonitor,
    HealthPolicy,
    SessionChecker,
    SessionHealth,
    retry_after_seconds,
)
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

META_VERDICT = "_hexscrape_verdict"
"""Request meta: the health verdict the download handler reached (internal)."""
_UNJUDGED = object()

FINISH_REASON_AUTH = "proxy_auth_failed"
FINISH_REASON_GATEWAY = "gateway_unavailable"


class SessionUnavailable(Exception):
    """Raised by the download handler for a request whose session was banned
    while the request waited for it; the middleware re-routes the request."""


def health_policy(get_setting: Any) -> HealthPolicy:
    return HealthPolicy(
        cooldown_base=float_option(get_setting, "SESSION_COOLDOWN", 30.0),
        cooldown_max=float_option(get_setting, "SESSION_COOLDOWN_MAX", 1800.0),
        max_requests=int(float_option(get_setting, "SESSION_MAX_REQUESTS", 0)),
        max_age=float_option(get_setting, "SESSION_MAX_AGE", 0.0),
    )


def crawler_config(crawler: Crawler) -> HexConfig:
    """The validated config of *crawler*, computed once and cached on it.

    Also validates the session-health options, so that a bad value is a
    one-line start-up error rather than a traceback.
    """
    cfg = getattr(crawler, "hexscrape_config", None)
    if cfg is None:
        cfg = load_config(crawler.settings.get)
        health_policy(crawler.settings.get)
        cfg = claim_slice(crawler, cfg)
        crawler.hexscrape_config = cfg  # type: ignore[attr-defined]
    return cfg


class RedisUnavailable(RuntimeError):
    """The configured Redis cannot be reached (one-line message)."""


def redis_prefix(crawler: Crawler) -> str:
    """Key prefix shared by every hexscrape structure in Redis."""
    return str(setting_or_env(crawler.settings.get, "REDIS_KEY_PREFIX") or crawler.spidercls.name)


def claim_slice(crawler: Crawler, cfg: HexConfig) -> HexConfig:
    """Claim this worker's session slice in Redis when a frontier is configured.

    ``SESSION_LEASE`` (default on with ``REDIS_URL``) and ``SESSION_LEASE_TTL``
    (15 s) control it; see :mod:`hexscrape.slicelease` for the protocol.
    """
    get = crawler.settings.get
    url = setting_or_env(get, "REDIS_URL")
    enabled = str(setting_or_env(get, "SESSION_LEASE", "1")).lower() not in ("0", "false", "no", "off")
    if not url or not cfg.gateway_enabled or not enabled:
        return cfg
    import redis

    from hexscrape.slicelease import SliceConflict, SliceLease

    ttl = float_option(get, "SESSION_LEASE_TTL", 15.0) or 15.0
    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        lease = SliceLease(client, redis_prefix(crawler), cfg.pool_size, slot=cfg.worker_slot, ttl=ttl)
        if cfg.auto_slice:
            cfg = cfg.with_range(*lease.claim_auto(cfg.auto_slice))
        else:
            lease.claim(cfg.range_start, cfg.range_end)
    except SliceConflict as exc:
        raise ConfigError(str(exc)) from None
    except (redis.RedisError, ValueError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    crawler.hexscrape_slice_lease = lease  # type: ignore[attr-defined]
    return cfg


class RedisHealthStore:
    """Session health in a Redis hash ``<prefix>:session_health`` (no secrets).

    Written only when a session's state changes (bans are rare), read once at
    start, so a respawned worker skips sessions that are still cooling down.
    """

    def __init__(self, url: str, key: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.key = key

    def load(self, sessions: Any) -> dict[str, str]:
        import redis

        names = list(sessions)
        try:
            values = self.client.hmget(self.key, names)
        except redis.RedisError as exc:
            logger.warning("cannot read session health from Redis: %s", exc)
            return {}
        return {n: v.decode() for n, v in zip(names, values) if v}

    def save(self, session: str, raw: str) -> None:
        import redis

        try:
            self.client.hset(self.key, session, raw)
        except redis.RedisError as exc:
            logger.warning("cannot save health of session %s to Redis: %s", session, exc)


class StickySessionMiddleware:
    """Assigns sticky proxy sessions round-robin within this process's slice,
    takes banned sessions out of rotation and retries their requests elsewhere.

    Settings (defaults): ``HEXSCRAPE_SESSIONS_ENABLED`` (True),
    ``HEXSCRAPE_SESSION_CONFIG`` (:class:`hexscrape.sessions.SessionConfig`),
    ``SESSION_CHECKER`` (:class:`hexscrape.health.SessionChecker`),
    ``SESSION_COOLDOWN`` (30 s, doubling per consecutive ban up to
    ``SESSION_COOLDOWN_MAX``, 1800 s), ``SESSION_MAX_REQUESTS`` (0 = off),
    ``SESSION_MAX_AGE`` (seconds, 0 = off), plus the proxy/slice settings of
    :mod:`hexscrape.config`.
    """

    def __init__(self, crawler: Crawler, config: HexConfig) -> None:
        self.crawler = crawler
        self.config = config
        self.stats = crawler.stats
        settings = crawler.settings
        self.pool = SessionPool(config.sessions, config.session_concurrency)
        crawler.hexscrape_pool = self.pool  # type: ignore[attr-defined]
        policy_cls = load_object(
            settings.get("HEXSCRAPE_SESSION_CONFIG") or "hexscrape.sessions.SessionConfig"
        )
        self.policy: SessionConfig = policy_cls(crawler)
        checker_cls = load_object(settings.get("SESSION_CHECKER") or "hexscrape.health.SessionChecker")
        self.checker: SessionChecker = checker_cls(crawler)
        store = None
        redis_url = setting_or_env(settings.get, "REDIS_URL")
        if redis_url:
            store = RedisHealthStore(redis_url, f"{redis_prefix(crawler)}:session_health")
        self.health = SessionHealth(self.pool.sessions, health_policy(settings.get), store=store)
        crawler.hexscrape_health = self.health  # type: ignore[attr-defined]
        crawler.hexscrape_judge = self  # type: ignore[attr-defined]
        self.auth = AuthFailureTracker(self.pool.sessions)
        self.gateway = GatewayMonitor(float_option(settings.get, "GATEWAY_DOWN_SECONDS", 30.0))
        self._proxy_urls = {s: config.proxy_url(s) for s in self.pool.sessions}
        self._keys = {
            s: {k: f"hexscrape/session/{s}/{k}" for k in ("requests", "bans", "cooldowns", "retired")}
            for s in self.pool.sessions
        }
        self._auth_warned: set[str] = set()
        self._closing = False
        self._waiting_logged = False

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
        cooling = self.health.cooling()
        if cooling:
            logger.info(
                "%d session(s) still cooling down from earlier bans: %s",
                len(cooling), ", ".join(f"{k} ({v:.0f}s)" for k, v in sorted(cooling.items())),
            )

    # -- choosing --------------------------------------------------------------

    def process_request(self, request: Request) -> Any:
        meta = request.meta
        if not self.policy.enabled(request):
            meta["proxy"] = None  # direct; HttpProxyMiddleware drops any creds
            meta.pop(META_ASSIGNED, None)
            meta[META_SESSION] = False
            return None
        if self.gateway.failures:
            return self._after_gateway_pause(request)
        return self._route(request)

    async def _after_gateway_pause(self, request: Request) -> None:
        """While the gateway refuses connections, pause instead of spinning."""
        await asyncio.sleep(self.gateway.backoff())
        routed = self._route(request)
        if routed is not None:
            await routed

    def _route(self, request: Request) -> Any:
        meta = request.meta
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
            self._assign(request, current, assigned=False)
            return None
        if self.health.earliest_return() > 0:
            return self._wait_and_assign(request)  # every session is resting
        self._assign(request, self.policy.pick(request, self.pool, self.health.usable), assigned=True)
        return None

    async def _wait_and_assign(self, request: Request) -> None:
        while (delay := self.health.earliest_return()) > 0:
            if not self._waiting_logged:
                self._waiting_logged = True
                logger.warning(
                    "all %d sessions of this slice are cooling down; waiting %.0f s "
                    "for the first to come back", len(self.pool.sessions), delay,
                )
            await asyncio.sleep(min(delay, 5.0))
        self._waiting_logged = False
        self._assign(request, self.policy.pick(request, self.pool, self.health.usable), assigned=True)

    def _assign(self, request: Request, sid: str, *, assigned: bool) -> None:
        meta = request.meta
        meta[META_SESSION] = sid
        if assigned:
            meta[META_ASSIGNED] = True
        meta["proxy"] = self._proxy_urls[sid]
        meta["cookiejar"] = self.health.jar(sid)  # cookies never cross exit IPs
        keys = self._keys[sid]
        self.stats.inc_value(keys["requests"])
        if self.health.served(sid):
            self.stats.inc_value(keys["retired"])
            logger.info("session %s retired (SESSION_MAX_REQUESTS/SESSION_MAX_AGE)", sid)

    # -- judging ---------------------------------------------------------------

    # The verdict is reached by the download handler, right before it frees the
    # session's slot (see judge_*): a request waiting for that slot must not
    # go out on a session whose ban is still travelling up the middleware chain.

    def judge_response(self, request: Request, response: Response) -> str:
        sid = request.meta[META_SESSION]
        self.gateway.ok()
        verdict = self.checker.check_response(request, response)
        if verdict == OK:
            self.auth.ok(sid)
            self.health.ok(sid)
        elif verdict == AUTH:
            self._auth_rejected(sid)
        elif verdict == BAN:
            retry_after = retry_after_seconds(response.headers.get(b"Retry-After"))
            self._banned(sid, f"HTTP {response.status}", retry_after)
        return verdict

    def judge_exception(self, request: Request, exception: BaseException) -> str | None:
        sid = request.meta[META_SESSION]
        verdict = self.checker.check_exception(request, exception)
        if verdict == AUTH:
            self._auth_rejected(sid)
        elif verdict == BAN:
            self._banned(sid, type(exception).__name__, None)
        elif verdict == GATEWAY:
            self._gateway_failed(exception)
        return verdict

    def _gateway_failed(self, exception: BaseException) -> None:
        self.stats.inc_value("hexscrape/proxy/gateway_errors")
        if self.gateway.failures == 0:
            logger.warning(
                "proxy gateway %s unreachable (%s: %s): requests wait and retry; "
                "giving up after %.0f s without success (GATEWAY_DOWN_SECONDS)",
                self.config.gateway, type(exception).__name__, exception,
                self.gateway.down_after,
            )
        if self.gateway.failed() and not self._closing:
            self._closing = True
            logger.error(
                "proxy gateway %s unreachable for %.0f s: stopping the crawl",
                self.config.gateway, self.gateway.down_after,
            )
            self._close(FINISH_REASON_GATEWAY)

    def process_response(self, request: Request, response: Response) -> Request | Response:
        sid = request.meta.get(META_SESSION)
        if not (isinstance(sid, str) and sid in self.pool):
            return response
        verdict = request.meta.pop(META_VERDICT, _UNJUDGED)
        if verdict is _UNJUDGED:  # not downloaded by our handler
            verdict = self.judge_response(request, response)
        if verdict == BAN:
            return self._retry_elsewhere(request, f"session ban (HTTP {response.status})") or response
        if verdict == AUTH:
            # not the URL's fault: put it back (in Redis, for a worker whose
            # credentials work) instead of failing it
            return self._requeue(request, "hexscrape/proxy/requeued")
        return response

    def process_exception(self, request: Request, exception: Exception) -> Request | None:
        sid = request.meta.get(META_SESSION)
        if not (isinstance(sid, str) and sid in self.pool):
            return None
        if isinstance(exception, SessionUnavailable):
            return self._requeue(request, "hexscrape/session/rerouted")
        verdict = request.meta.pop(META_VERDICT, _UNJUDGED)
        if verdict is _UNJUDGED:
            verdict = self.judge_exception(request, exception)
        if verdict == BAN:
            return self._retry_elsewhere(request, exception)
        if verdict in (GATEWAY, AUTH):
            return self._requeue(request, "hexscrape/proxy/requeued")
        return None

    def _requeue(self, request: Request, stat: str) -> Request:
        """The same request again, on a fresh session, not counted as a retry."""
        new = request.copy()
        new.dont_filter = True
        new.meta.pop(META_SESSION, None)
        new.meta.pop("cookiejar", None)
        self.stats.inc_value(stat)
        return new

    def _banned(self, sid: str, why: str, retry_after: float | None) -> None:
        keys = self._keys[sid]
        self.stats.inc_value(keys["bans"])
        if not self.health.usable(sid):
            return  # a straggler of a ban already handled
        delay = self.health.banned(sid, retry_after)
        self.stats.inc_value(keys["cooldowns"])
        logger.info("session %s cooled down for %.0f s after %s", sid, delay, why)

    def _retry_elsewhere(self, request: Request, reason: Any) -> Request | None:
        """A retry copy that will get a fresh session (counts against RETRY_TIMES)."""
        if request.meta.get("dont_retry") or not request.meta.get(META_ASSIGNED):
            return None  # opted out of retries, or pinned by the user
        spider = self.crawler.spider
        new = get_retry_request(
            request, spider=spider, reason=reason,
            max_retry_times=request.meta.get("max_retry_times", self.crawler.settings.getint("RETRY_TIMES")),
        ) if spider is not None else None
        if new is not None:
            new.meta.pop(META_SESSION, None)
            new.meta.pop("cookiejar", None)
            self.stats.inc_value("hexscrape/session/retried_elsewhere")
        return new

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
            self._close(FINISH_REASON_AUTH)

    def _close(self, reason: str) -> None:
        engine: Any = self.crawler.engine
        if engine is not None and engine.spider is not None:
            deferred_from_coro(engine.close_spider_async(reason=reason))


__all__ = ["ConfigError", "StickySessionMiddleware"]


class RedirectMiddleware(BaseRedirectMiddleware):
    """Scrapy's ``RedirectMiddleware`` without its start-up warning about Referer.

    hexscrape disables ``RefererMiddleware`` (a crawl of independent URLs sends
    no Referer, and it costs work per response), so Scrapy would warn on every
    run. Redirects behave as in Scrapy: the redirected request drops its
    Referer, or gets one from ``RefererMiddleware`` if you enable it.
    """

    def _engine_started(self) -> None:
        self._referer_spider_middleware = self.crawler.get_spider_middleware(RefererMiddleware)
