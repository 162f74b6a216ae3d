"""HTTP/1.1 download handler that keeps proxy connections per sticky session.

Scrapy 2.19 pools plain-HTTP proxy connections under ``(proxy host, port)``
only, so a keep-alive connection opened for session s001 would be reused by
s002 — the gateway would then see two usernames on one TCP connection. Here the
pool key also carries the request's ``Proxy-Authorization`` value, i.e. the
session. CONNECT tunnels (https targets) are already keyed by it upstream.

The handler also enforces ``SESSION_CONCURRENCY``: a request waits (without
its download timeout running) until its session has a free slot. Scrapy's own
per-slot limit is not reliable under the asyncio reactor.

Relies on private classes of Scrapy's http11 handler, hence ``scrapy<2.20``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from scrapy.core.downloader.handlers.http11 import (
    HTTP11DownloadHandler,
    ResponseDataLossError,
    _ScrapyAgent,
    _ScrapyProxyAgent,
    get_dataloss_msg,
    logger as _http11_logger,
    maybe_deferred_to_future,
    wrap_twisted_exceptions,
)
from scrapy.utils.python import to_bytes
from twisted.web.client import URI
from scrapy.utils.url import add_http_if_no_scheme

from hexscrape.middlewares import (
    META_ASSIGNED,
    META_SESSION,
    META_VERDICT,
    SessionUnavailable,
    crawler_config,
)

if TYPE_CHECKING:
    from twisted.web.client import Agent

    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from hexscrape.sessions import SessionPool


class _SessionProxyAgent(_ScrapyProxyAgent):
    """Plain-HTTP proxy agent whose pool key includes the session credentials.

    It also builds the endpoint to the gateway once: Scrapy's builds one per
    request, though connections come from the pool nearly every time.
    """

    _endpoint: Any = None

    def request(self, method, uri, headers=None, bodyProducer=None):  # type: ignore[no-untyped-def,override]
        if self._endpoint is None:
            self._endpoint = self._getEndpoint(self._proxyURI)
        auth = headers.getRawHeaders(b"Proxy-Authorization") if headers else None
        return self._requestWithEndpoint(
            key=(b"http-proxy", self._proxyURI.host, self._proxyURI.port, auth[0] if auth else None),
            endpoint=self._endpoint,
            method=method,
            parsedURI=URI.fromBytes(uri),
            headers=headers,
            bodyProducer=bodyProducer,
            requestPath=uri,
        )


class _SessionScrapyAgent(_ScrapyAgent):
    """Builds per-session proxy agents, and reuses them: Scrapy builds a new
    Twisted agent (URI parsing, endpoint factory) for every request."""

    agents: dict[tuple[object, ...], Agent]

    def _get_agent(self, request: Request, timeout: float) -> Agent:
        meta = request.meta
        proxy = meta.get("proxy")
        if not proxy:
            return super()._get_agent(request, timeout)
        key = (
            proxy, request.headers.get(b"Proxy-Authorization"), timeout,
            meta.get("bindaddress"), request.url[:6] == "https:",
        )
        agent = self.agents.get(key)
        if agent is None:
            agent = self._build_agent(request, timeout)
            if len(self.agents) > 10_000:  # bounded: sessions x timeouts in practice
                self.agents.clear()
            self.agents[key] = agent
        return agent

    def _build_agent(self, request: Request, timeout: float) -> Agent:
        agent = super()._get_agent(request, timeout)
        if type(agent) is _ScrapyProxyAgent:
            from twisted.internet import reactor

            proxy = add_http_if_no_scheme(request.meta["proxy"])
            return _SessionProxyAgent(
                reactor=reactor,
                proxyURI=to_bytes(proxy, encoding="ascii"),
                contextFactory=self._contextFactory,
                connectTimeout=timeout,
                bindAddress=agent._endpointFactory._bindAddress,
                pool=self._pool,
            )
        return agent


class SessionHTTP11DownloadHandler(HTTP11DownloadHandler):
    """Scrapy's HTTP/1.1 handler with per-session connection pools and caps."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self._agents: dict[tuple[object, ...], Agent] = {}
        # Keep as many idle connections per session as it may have in flight.
        self._pool.maxPersistentPerHost = max(
            self._pool.maxPersistentPerHost,
            crawler_config(crawler).session_concurrency,
        )

    def _session_pool(self) -> SessionPool | None:
        return getattr(self._crawler, "hexscrape_pool", None)

    async def download_request(self, request: Request) -> Response:
        sid = request.meta.get(META_SESSION)
        pool = self._session_pool() if isinstance(sid, str) else None
        if pool is None or sid not in pool:
            return await self._download(request)
        if not pool.try_acquire(sid):
            await _wait_for_capacity(pool, sid)
        health = getattr(self._crawler, "hexscrape_health", None)
        if health is not None and request.meta.get(META_ASSIGNED) and health.is_banned(sid):
            # banned while this request waited for it: the middleware re-routes it
            pool.release(sid)
            raise SessionUnavailable(sid)
        judge = getattr(self._crawler, "hexscrape_judge", None)
        try:
            response = await self._download(request)
        except Exception as exc:
            if judge is not None:
                request.meta[META_VERDICT] = judge.judge_exception(request, exc)
            raise
        else:
            if judge is not None:
                request.meta[META_VERDICT] = judge.judge_response(request, response)
            return response
        finally:
            pool.release(sid)  # after the verdict: a waiter sees a fresh ban

    async def _download(self, request: Request) -> Response:
        agent = _SessionScrapyAgent(
            contextFactory=self._contextFactory,
            bindAddress=self._bind_address,
            pool=self._pool,
            maxsize=self._default_maxsize,
            warnsize=self._default_warnsize,
            fail_on_dataloss=self._fail_on_dataloss,
            crawler=self._crawler,
            tls_verbose_logging=self._tls_verbose_logging,
        )
        agent.agents = self._agents
        try:
            with wrap_twisted_exceptions():
                return await maybe_deferred_to_future(agent.download_request(request))
        except ResponseDataLossError:
            if not self._fail_on_dataloss_warned:
                _http11_logger.warning(get_dataloss_msg(request.url))
                self._fail_on_dataloss_warned = True
            raise


async def _wait_for_capacity(pool: SessionPool, sid: str) -> None:
    """Wait for a unit of *sid*'s capacity, handed over by ``pool.release``."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> bool:
        if fut.done():  # cancelled while waiting: pass the unit on
            return False
        fut.set_result(None)
        return True

    pool.wait(sid, wake)
    try:
        await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled():
            pool.release(sid)  # the unit was handed to us after all
        raise

