"""Session health: which sessions are banned, cooling down, or retired.

Pure Python (no Scrapy, no Twisted). A session that the checker flags is taken
out of rotation for a cool-down that doubles on each consecutive ban (base 30 s
up to 30 min by default) or for the site's ``Retry-After`` if longer. Each
cool-down or retirement bumps the session's *generation*, which names its
cookie jar, so a session comes back with an empty jar.

The state can be mirrored to a store (Redis when a frontier is configured), so
a respawned worker does not pick a session that is still cooling down.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

OK = "ok"
BAN = "ban"
AUTH = "auth"
GATEWAY = "gateway"

Verdict = str
"""One of OK, BAN, AUTH (407: credentials rejected), GATEWAY (the gateway
itself cannot be reached: no session's fault), or None for "no opinion"."""


@dataclass
class SessionState:
    cool_until: float = 0.0
    consecutive_bans: int = 0
    generation: int = 0
    requests: int = 0
    started_at: float = 0.0  # when the current generation started serving
    banned: bool = False  # resting because of a ban (not a planned retirement)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionState:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class HealthStore(Protocol):
    """Where session state survives a worker (e.g. a Redis hash)."""

    def load(self, sessions: Iterable[str]) -> dict[str, str]: ...
    def save(self, session: str, raw: str) -> None: ...


@dataclass(frozen=True)
class HealthPolicy:
    cooldown_base: float = 30.0
    cooldown_max: float = 1800.0
    max_requests: int = 0  # 0 = never retire by count
    max_age: float = 0.0  # seconds; 0 = never retire by age


class SessionHealth:
    """Per-slice health book-keeping; the clock is injectable for tests."""

    def __init__(
        self,
        sessions: Iterable[str],
        policy: HealthPolicy | None = None,
        store: HealthStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or HealthPolicy()
        self.clock = clock
        self.store = store
        self.state: dict[str, SessionState] = {s: SessionState() for s in sessions}
        if store is not None:
            for sid, raw in store.load(self.state).items():
                try:
                    self.state[sid] = SessionState.from_json(raw)
                except (ValueError, TypeError, KeyError):
                    pass  # unreadable state: start the session fresh
        now = self.clock()
        for st in self.state.values():
            st.started_at = st.started_at or now

    def usable(self, session: str) -> bool:
        return self.state[session].cool_until <= self.clock()

    def is_banned(self, session: str) -> bool:
        """Resting because of a ban: requests already routed to it must move.

        (A retired session finishes what it was handed.)
        """
        st = self.state[session]
        return st.banned and st.cool_until > self.clock()

    def cooling(self) -> dict[str, float]:
        """Sessions still cooling down, with seconds left."""
        now = self.clock()
        return {s: st.cool_until - now for s, st in self.state.items() if st.cool_until > now}

    def earliest_return(self) -> float:
        """Seconds until the first cooling session is usable again (0 if one is)."""
        now = self.clock()
        soonest = None
        for st in self.state.values():
            if st.cool_until <= now:
                return 0.0  # checked per request: stop at the first usable session
            if soonest is None or st.cool_until < soonest:
                soonest = st.cool_until
        return 0.0 if soonest is None else soonest - now

    def jar(self, session: str) -> str:
        """The cookie jar name of the session's current generation."""
        gen = self.state[session].generation
        return session if gen == 0 else f"{session}#{gen}"

    def served(self, session: str) -> bool:
        """Count a request; True if the session just reached its retirement."""
        st = self.state[session]
        st.requests += 1
        p = self.policy
        if p.max_requests and st.requests >= p.max_requests:
            self._rest(session, p.cooldown_base, ban=False)
            return True
        if p.max_age and self.clock() - st.started_at >= p.max_age:
            self._rest(session, p.cooldown_base, ban=False)
            return True
        return False

    def ok(self, session: str) -> None:
        st = self.state[session]
        if st.consecutive_bans:
            st.consecutive_bans = 0
            self._save(session)

    def banned(self, session: str, retry_after: float | None = None) -> float:
        """Cool the session down; return the cool-down in seconds."""
        st = self.state[session]
        if st.cool_until > self.clock():
            return st.cool_until - self.clock()  # already resting: in-flight stragglers
        st.consecutive_bans += 1
        p = self.policy
        delay = min(p.cooldown_max, p.cooldown_base * 2 ** (st.consecutive_bans - 1))
        if retry_after:
            delay = max(delay, min(retry_after, p.cooldown_max))
        self._rest(session, delay, ban=True)
        return delay

    def _rest(self, session: str, delay: float, *, ban: bool) -> None:
        st = self.state[session]
        now = self.clock()
        st.cool_until = now + delay
        st.banned = ban
        st.generation += 1
        st.requests = 0
        st.started_at = now + delay
        self._save(session)

    def _save(self, session: str) -> None:
        if self.store is not None:
            self.store.save(session, self.state[session].to_json())


class SessionChecker:
    """Decides from a response or an exception whether the session is still good.

    Subclass it and name it in the ``SESSION_CHECKER`` setting, e.g. to flag a
    CAPTCHA page served with status 200::

        class CaptchaChecker(SessionChecker):
            def check_response(self, request, response):
                if b"captcha" in response.body.lower():
                    return BAN
                return super().check_response(request, response)

    Return ``OK``, ``BAN`` (cool the session down, retry the request on another
    session) or ``AUTH`` (407: the gateway rejected the credentials).
    """

    ban_statuses = frozenset({403, 429, 502, 503, 504})
    ban_exceptions = frozenset({
        "TunnelError", "TimeoutError", "TCPTimedOutError", "ConnectionLost",
        "ConnectionDone", "ResponseNeverReceived", "DownloadTimeoutError",
        "DownloadFailedError",
    })
    # Every proxied connection goes to the gateway: failing to open one says
    # the gateway is down (or misnamed), not that a session is banned.
    gateway_exceptions = frozenset({
        "ConnectionRefusedError", "DownloadConnectionRefusedError", "ConnectError",
        "CannotResolveHostError", "DNSLookupError", "NoRouteError",
    })

    def __init__(self, crawler: Any = None) -> None:
        self.crawler = crawler

    def check_response(self, request: Any, response: Any) -> Verdict:
        status = response.status
        if status == 407:
            return AUTH
        if status in self.ban_statuses:
            return BAN
        return OK

    def check_exception(self, request: Any, exception: BaseException) -> Verdict | None:
        name = type(exception).__name__
        if name == "TunnelError":
            return AUTH if "'status': 407" in str(exception) else BAN
        if name in self.ban_exceptions:
            return BAN
        if name in self.gateway_exceptions:
            return GATEWAY
        return None


class GatewayMonitor:
    """Tells a gateway outage from session trouble, and how long to back off.

    While the gateway refuses connections requests are put back (not failed)
    after a growing pause; once it has failed for ``down_after`` seconds with
    no success in between, the crawl gives up with one clear error.
    """

    def __init__(self, down_after: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.down_after = down_after
        self.clock = clock
        self.failing_since: float | None = None
        self.failures = 0

    def ok(self) -> None:
        self.failing_since = None
        self.failures = 0

    def failed(self) -> bool:
        """Record a failure; True once the outage has lasted ``down_after``."""
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        return now - self.failing_since >= self.down_after

    def backoff(self) -> float:
        """Pause before the next attempt while failing (0 when healthy)."""
        if not self.failures:
            return 0.0
        return min(5.0, 0.1 * 2 ** min(self.failures - 1, 6))


def retry_after_seconds(value: bytes | str | None) -> float | None:
    """Parse a Retry-After header given in seconds (dates are ignored)."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None
