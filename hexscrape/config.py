"""Proxy/session configuration, resolved from Scrapy settings or the environment.

Pure Python (no Scrapy, no Twisted) so it can be used by the primary process,
the seeding CLI and the crawler alike. A Scrapy setting wins over the
environment variable of the same name, so scrapyd jobs (``-d setting=...``) and
``scrapy crawl -s NAME=...`` can override what the environment says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlsplit

from hexscrape.sessions import session_ids

DEFAULT_GATEWAY = "http://gate.hexproxies.com:7777"
DEFAULT_POOL_SIZE = 40
DEFAULT_SESSION_CONCURRENCY = 10

# Names accepted both as environment variables and as Scrapy settings.
CONFIG_NAMES = (
    "HEX_USER",
    "HEX_PASS",
    "HEX_GATEWAY",
    "SESSION_POOL_SIZE",
    "WORKER_SLOT",
    "SESSION_RANGE_START",
    "SESSION_RANGE_END",
    "SESSION_CONCURRENCY",
    "SESSION_RANGE",
    "SESSION_SLICE_SIZE",
)
DEFAULT_SLICE_SIZE = 10


class ConfigError(ValueError):
    """Bad configuration: the message is one line that names the setting."""


@dataclass(frozen=True)
class HexConfig:
    user: str | None
    password: str | None = field(repr=False)
    gateway: str | None
    pool_size: int
    range_start: int
    range_end: int
    worker_slot: str | None
    session_concurrency: int
    auto_slice: int | None = None  # SESSION_RANGE=auto: claim this many in Redis

    def with_range(self, start: int, end: int) -> HexConfig:
        return replace(self, range_start=start, range_end=end, auto_slice=None)

    @property
    def sessions(self) -> list[str]:
        """This process's slice of the pool, as session ids."""
        return session_ids(self.pool_size)[self.range_start : self.range_end]

    @property
    def gateway_enabled(self) -> bool:
        return bool(self.gateway)

    def proxy_username(self, session_id: str) -> str:
        return f"{self.user}-session-{session_id}"

    def proxy_url(self, session_id: str) -> str:
        """Gateway URL carrying this session's credentials, percent-encoded.

        Scrapy's HttpProxyMiddleware unquotes user and password before
        building the Basic header, so any character is safe here.
        """
        assert self.gateway is not None
        parts = urlsplit(self.gateway)
        user = quote(self.proxy_username(session_id), safe="")
        password = quote(self.password or "", safe="")
        return f"{parts.scheme}://{user}:{password}@{parts.netloc}"

    def secrets(self) -> list[str]:
        """Strings that must never appear in logs, stats or items."""
        if not self.password:
            return []
        out = {self.password, quote(self.password, safe="")}
        return sorted(s for s in out if s)


def redact_url(url: str) -> str:
    """*url* with its password masked, for logs and summaries (redis://:***@host)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
    except ValueError:
        return "<unparseable URL>"


def _lookup(
    name: str, get_setting: Callable[[str], Any] | None, env: Mapping[str, str]
) -> tuple[Any, str]:
    """Return (value, where) for *name*: the Scrapy setting first, then env."""
    if get_setting is not None:
        value = get_setting(name)
        if value is not None and value != "":
            return value, "setting"
    value = env.get(name)
    if value is not None and value != "":
        return value, "environment variable"
    return None, ""


def setting_or_env(
    get_setting: Callable[[str], Any] | None,
    name: str,
    default: Any = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """A hexscrape option: the Scrapy setting if set, else the environment."""
    value, _ = _lookup(name, get_setting, os.environ if env is None else env)
    return default if value is None else value


def float_option(get_setting: Callable[[str], Any] | None, name: str, default: float) -> float:
    raw = setting_or_env(get_setting, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")
    return value


def _int(name: str, raw: Any, where: str, *, minimum: int) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} ({where}) is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} ({where}) must be >= {minimum}")
    return value


def validate_gateway(url: str, name: str = "HEX_GATEWAY") -> str:
    """Check that *url* is a usable http:// proxy URL without credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{name}={url!r} does not parse as a URL: {exc}") from None
    if parts.scheme != "http":
        raise ConfigError(
            f"{name}={url!r} must be an http:// proxy URL like {DEFAULT_GATEWAY}"
        )
    if not parts.hostname:
        raise ConfigError(f"{name}={url!r} has no host")
    if parts.username or parts.password:
        raise ConfigError(
            f"{name} must not contain credentials; use HEX_USER and HEX_PASS"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{name}={url!r} must be scheme://host:port only")
    if port is None:
        port = 80
    return f"{parts.scheme}://{parts.hostname}:{port}"


def load_config(
    get_setting: Callable[[str], Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> HexConfig:
    """Resolve and validate the configuration; raise ConfigError on bad input.

    ``HEX_GATEWAY`` set to ``none`` (or ``off``) disables the gateway: requests
    go direct, no credentials are needed.
    """
    env = os.environ if env is None else env

    def look(name: str) -> tuple[Any, str]:
        return _lookup(name, get_setting, env)

    raw_pool, where = look("SESSION_POOL_SIZE")
    pool = (
        DEFAULT_POOL_SIZE
        if raw_pool is None
        else _int("SESSION_POOL_SIZE", raw_pool, where, minimum=1)
    )

    auto_slice = None
    raw_range, _ = look("SESSION_RANGE")
    if raw_range is not None:
        if str(raw_range).strip().lower() != "auto":
            raise ConfigError(
                f"SESSION_RANGE={raw_range!r}: only 'auto' is supported "
                "(use SESSION_RANGE_START/SESSION_RANGE_END for a fixed slice)"
            )
        raw_size, where_z = look("SESSION_SLICE_SIZE")
        auto_slice = (
            min(DEFAULT_SLICE_SIZE, pool)
            if raw_size is None
            else _int("SESSION_SLICE_SIZE", raw_size, where_z, minimum=1)
        )
        if auto_slice > pool:
            raise ConfigError(
                f"SESSION_SLICE_SIZE={auto_slice} is larger than the pool (SESSION_POOL_SIZE={pool})"
            )
        if not look("REDIS_URL")[0]:
            raise ConfigError("SESSION_RANGE=auto needs REDIS_URL: slices are claimed in Redis")

    raw_start, where_s = look("SESSION_RANGE_START")
    raw_end, where_e = look("SESSION_RANGE_END")
    start = 0 if raw_start is None else _int("SESSION_RANGE_START", raw_start, where_s, minimum=0)
    end = pool if raw_end is None else _int("SESSION_RANGE_END", raw_end, where_e, minimum=1)
    if end > pool:
        raise ConfigError(
            f"SESSION_RANGE_END={end} is outside the pool (SESSION_POOL_SIZE={pool})"
        )
    if start >= end:
        raise ConfigError(
            f"SESSION_RANGE_START={start} must be < SESSION_RANGE_END={end}"
        )

    raw_conc, where_c = look("SESSION_CONCURRENCY")
    concurrency = (
        DEFAULT_SESSION_CONCURRENCY
        if raw_conc is None
        else _int("SESSION_CONCURRENCY", raw_conc, where_c, minimum=1)
    )

    slot, _ = look("WORKER_SLOT")
    slot = None if slot is None else str(slot)

    raw_gw, _ = look("HEX_GATEWAY")
    gateway: str | None
    if raw_gw is not None and str(raw_gw).strip().lower() in ("none", "off", "direct"):
        gateway = None
    else:
        gateway = validate_gateway(str(raw_gw or DEFAULT_GATEWAY).strip())

    user, _ = look("HEX_USER")
    password, _ = look("HEX_PASS")
    if gateway is not None:
        if not user:
            raise ConfigError(
                "HEX_USER is not set: the proxy gateway needs credentials "
                "(set HEX_USER and HEX_PASS, or HEX_GATEWAY=none to go direct)"
            )
        if password is None:
            raise ConfigError(
                "HEX_PASS is not set: the proxy gateway needs credentials "
                "(set HEX_USER and HEX_PASS, or HEX_GATEWAY=none to go direct)"
            )
        if any(c in str(user) for c in ":\r\n"):
            raise ConfigError("HEX_USER must not contain ':' or line breaks")

    if auto_slice is not None:
        start, end = 0, auto_slice  # placeholder until the claim in Redis
    return HexConfig(
        auto_slice=auto_slice,
        user=None if user is None else str(user),
        password=None if password is None else str(password),
        gateway=gateway,
        pool_size=pool,
        range_start=start,
        range_end=end,
        worker_slot=slot,
        session_concurrency=concurrency,
    )
