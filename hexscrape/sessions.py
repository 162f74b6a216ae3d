"""Sticky-session pool logic: ids, slices, round-robin choice, in-flight caps.

Pure Python on purpose (no Scrapy, no Twisted): the primary process uses the
slicing, the crawler uses the rest, and all of it is tested directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def session_width(pool_size: int) -> int:
    """Digits in a session id: 3 (``s000``) unless the pool needs more."""
    return max(3, len(str(max(pool_size - 1, 0))))


def session_id(index: int, pool_size: int) -> str:
    return f"s{index:0{session_width(pool_size)}d}"


def session_ids(pool_size: int) -> list[str]:
    width = session_width(pool_size)
    return [f"s{i:0{width}d}" for i in range(pool_size)]


def slice_bounds(slot: int, workers: int, pool_size: int) -> tuple[int, int]:
    """Worker *slot* of *workers* owns ``[floor(k*P/N), floor((k+1)*P/N))``.

    Disjoint and covering for any N <= P; each slice is non-empty then.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if workers > pool_size:
        raise ValueError(
            f"{workers} workers need at least {workers} sessions, "
            f"but SESSION_POOL_SIZE={pool_size}"
        )
    if not 0 <= slot < workers:
        raise ValueError(f"slot {slot} is outside 0..{workers - 1}")
    return (slot * pool_size) // workers, ((slot + 1) * pool_size) // workers


Waiter = Callable[[], bool]
"""Called when a capacity unit is handed over; returns False if it no longer
wants it (e.g. its request was cancelled), so the unit goes to the next one."""


class SessionPool:
    """This process's slice: round-robin choice and a per-session in-flight cap.

    The cap is enforced by whoever calls :meth:`try_acquire`/:meth:`release`
    around the actual network exchange (the download handler), because Scrapy's
    own per-slot concurrency is not enforced under the asyncio reactor.
    """

    def __init__(self, sessions: Sequence[str], max_in_flight: int) -> None:
        if not sessions:
            raise ValueError("a session pool needs at least one session")
        self.sessions: tuple[str, ...] = tuple(sessions)
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, int] = dict.fromkeys(self.sessions, 0)
        self._waiters: dict[str, deque[Waiter]] = {s: deque() for s in self.sessions}
        self._next = 0

    def __contains__(self, session: object) -> bool:
        return session in self.in_flight

    def next_session(self, usable: Callable[[str], bool] | None = None) -> str:
        """The next session in round-robin order that has spare capacity.

        Sessions rejected by *usable* (e.g. cooling down) are skipped. If every
        usable session is full, plain round-robin among the usable ones: the
        request then waits for capacity in the download handler. If none is
        usable at all, plain round-robin over the whole slice.
        """
        n = len(self.sessions)
        start = self._next
        fallback = None
        for i in range(n):
            idx = (start + i) % n
            sid = self.sessions[idx]
            if usable is not None and not usable(sid):
                continue
            if self.in_flight[sid] < self.max_in_flight:
                self._next = (idx + 1) % n
                return sid
            if fallback is None:
                fallback = idx
        if fallback is None:
            fallback = start
        self._next = (fallback + 1) % n
        return self.sessions[fallback]

    def try_acquire(self, session: str) -> bool:
        if self.in_flight[session] < self.max_in_flight and not self._waiters[session]:
            self.in_flight[session] += 1
            return True
        return False

    def wait(self, session: str, waiter: Waiter) -> None:
        """Queue *waiter* for the next capacity unit of *session* (FIFO)."""
        self._waiters[session].append(waiter)

    def release(self, session: str) -> None:
        """Give the unit to the first live waiter, or free it."""
        waiters = self._waiters[session]
        while waiters:
            if waiters.popleft()():
                return  # handed over: in_flight unchanged
        self.in_flight[session] -= 1

    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())


class AuthFailureTracker:
    """Notices when the gateway rejects the credentials for every session.

    A real gateway does not answer 407 at random: once every session of the
    slice got one and none succeeded since, retrying is a storm, not a plan.
    """

    def __init__(self, sessions: Iterable[str]) -> None:
        self._sessions = set(sessions)
        self._rejected: set[str] = set()

    def ok(self, session: str) -> None:
        self._rejected.clear()

    def rejected(self, session: str) -> bool:
        """Record a 407; True once every session of the slice was rejected."""
        self._rejected.add(session)
        return self._rejected >= self._sessions


class SessionConfig:
    """Overridable session policy; subclass it and name it in ``HEXSCRAPE_SESSION_CONFIG``.

    The default takes every request that does not opt out, pins a request to
    ``meta["hexscrape_session"]`` when that names a session of this slice, and
    otherwise picks the next session round-robin. Override :meth:`enabled` or
    :meth:`pick` to change either decision; *crawler* is passed so a subclass
    can read its own settings.
    """

    def __init__(self, crawler: Any = None) -> None:
        self.crawler = crawler

    def enabled(self, request: Any) -> bool:
        """Whether *request* goes through a sticky session at all."""
        return request.meta.get("hexscrape_session", True) is not False

    def pick(
        self, request: Any, pool: SessionPool, usable: Callable[[str], bool] | None = None
    ) -> str:
        """The session for a request that is not pinned.

        *usable* tells which sessions are healthy (not cooling down).
        """
        return pool.next_session(usable)
