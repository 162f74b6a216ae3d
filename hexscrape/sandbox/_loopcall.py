"""Run a callable on the event loop that owns an object, from any thread.

The sandbox servers mutate their state only on their own loop thread (no locks
on the hot path); the Python API used by tests and benchmarks lives on other
threads, so every public accessor/mutator hops onto the loop and waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class LoopBound:
    """Mixin: ``_call(fn, ...)`` executes ``fn`` on ``self._loop`` and returns its result."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return fn(*args)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return fn(*args)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # pragma: no cover - propagated to caller
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)
