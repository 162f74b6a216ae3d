"""Origin + gateway wired together, runnable in-process (thread) or from the CLI."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import ssl
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

from .errors import SandboxError
from .gateway import BanRule, Gateway, exit_ip_for
from .origin import Origin
from .tls import generate_cert

DEFAULT_USER = "sandbox"
DEFAULT_PASSWORD = "s3cr:et/p@ss"  # deliberately needs escaping in proxy URLs


def check_loopback(host: str) -> str:
    """Return host if it is an IPv4 loopback address or 'localhost', else raise.

    The sandbox simulates the internet on 127/8 and must never be reachable from
    (or reach) another machine.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise SandboxError(f"--host must be a loopback IPv4 address or localhost, not {host!r}") from None
    if addr.version != 4 or not addr.is_loopback:
        raise SandboxError(f"--host must be a loopback IPv4 address or localhost, not {host!r}")
    return host


def new_event_loop(use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """uvloop when importable (and not disabled), else the default loop."""
    if use_uvloop is not False:
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            if use_uvloop:
                raise SandboxError("uvloop requested but not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop the noise of peers that vanish mid-handshake; log everything else as usual."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
        return
    loop.default_exception_handler(context)


class SandboxCore:
    """Async owner of one origin and one gateway sharing an event loop."""

    def __init__(
        self,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        *,
        host: str = "127.0.0.1",
        gateway_port: int = 0,
        http_port: int = 0,
        https_port: int = 0,
        log_path: str | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        origin_latency_ms: float = 0.0,
        origin_jitter_ms: float = 0.0,
        reject_password: bool = False,
        bans: Iterable[BanRule | tuple[str, int, str] | tuple[str, int, str, int]] = (),
        max_records: int = 100_000,
    ) -> None:
        host = check_loopback(host)
        self.user = user
        self.password = password
        self.cert = generate_cert()
        self.origin = Origin(host, http_port, https_port, latency_ms=origin_latency_ms,
                             jitter_ms=origin_jitter_ms, cert=self.cert)
        rules = [b if isinstance(b, BanRule) else BanRule(*b) for b in bans]
        self.gateway = Gateway(user, password, host=host, port=gateway_port, origin=self.origin,
                               log_path=log_path, latency_ms=latency_ms, jitter_ms=jitter_ms,
                               reject_password=reject_password, bans=rules,
                               max_records=max_records)
        self.host = host

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(_quiet_exception_handler)
        await self.origin.start()
        try:
            await self.gateway.start()
        except BaseException:
            await self.origin.stop()
            raise

    async def stop(self) -> None:
        await self.gateway.stop()
        await self.origin.stop()

    def info(self) -> dict[str, Any]:
        """Everything a script needs to use this sandbox (the ready-file content)."""
        return {
            "gateway_url": self.gateway.url,
            "http_origin": self.origin.http_url,
            "https_origin": self.origin.https_url,
            "host": self.host,
            "gateway_port": self.gateway.port,
            "http_port": self.origin.http_port,
            "https_port": self.origin.https_port,
            "user": self.user,
            "password": self.password,
            "env": self.env(),
            "pid": os.getpid(),
        }

    def env(self) -> dict[str, str]:
        return {"HEX_GATEWAY": self.gateway.url, "HEX_USER": self.user, "HEX_PASS": self.password}


class Sandbox:
    """Origin + gateway on a background thread with its own loop; for tests and benchmarks.

    Use as a context manager. All ports default to 0 (free ports), so parallel
    test runs never collide.
    """

    def __init__(
        self,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        *,
        host: str = "127.0.0.1",
        gateway_port: int = 0,
        http_port: int = 0,
        https_port: int = 0,
        log_path: str | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        origin_latency_ms: float = 0.0,
        origin_jitter_ms: float = 0.0,
        reject_password: bool = False,
        bans: Iterable[BanRule | tuple[str, int, str] | tuple[str, int, str, int]] = (),
        max_records: int = 100_000,
        use_uvloop: bool | None = None,
    ) -> None:
        self._core = SandboxCore(
            user, password, host=host, gateway_port=gateway_port, http_port=http_port,
            https_port=https_port, log_path=log_path, latency_ms=latency_ms, jitter_ms=jitter_ms,
            origin_latency_ms=origin_latency_ms, origin_jitter_ms=origin_jitter_ms,
            reject_password=reject_password, bans=bans, max_records=max_records,
        )
        self.user = user
        self.password = password
        self.origin: Origin = self._core.origin
        self.gateway: Gateway = self._core.gateway
        self._origin_latency0 = (float(origin_latency_ms), float(origin_jitter_ms))
        self._use_uvloop = use_uvloop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._cert_dir: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Sandbox:
        """Start servers on a daemon thread; returns once every port is listening."""
        if self._thread is not None:
            raise SandboxError("sandbox already started")
        self._thread = threading.Thread(target=self._run, name="hexscrape-sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise SandboxError("sandbox did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close all sockets and join the thread (idempotent)."""
        thread, loop, ev = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass
        thread.join(timeout)
        self._thread = None
        if self._cert_dir is not None:
            self._cert_dir.cleanup()
            self._cert_dir = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            loop = new_event_loop(self._use_uvloop)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        try:
            await self._core.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self._core.stop()

    # -- convenience -----------------------------------------------------
    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    @property
    def http_origin(self) -> str:
        return self.origin.http_url

    @property
    def https_origin(self) -> str:
        return self.origin.https_url

    @property
    def cert_pem(self) -> bytes:
        return self._core.cert.cert_pem

    @property
    def cert_file(self) -> str:
        """Path of the origin's self-signed cert (PEM), valid until stop(); for verifying clients."""
        if self._cert_dir is None:
            self._cert_dir = tempfile.TemporaryDirectory(prefix="hexscrape-sandbox-")
            with open(os.path.join(self._cert_dir.name, "cert.pem"), "wb") as f:
                f.write(self.cert_pem)
        return os.path.join(self._cert_dir.name, "cert.pem")

    def info(self) -> dict[str, Any]:
        return self._core.info()

    def env(self) -> dict[str, str]:
        """HEX_GATEWAY / HEX_USER / HEX_PASS for the scraper under test."""
        return self._core.env()

    def proxy_user(self, session_id: str) -> str:
        """The proxy username that selects ``session_id``."""
        return f"{self.user}-session-{session_id}"

    def proxy_auth(self, session_id: str, password: str | None = None) -> str:
        """``Proxy-Authorization`` header value for a session."""
        raw = f"{self.proxy_user(session_id)}:{self.password if password is None else password}"
        return "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")

    exit_ip_for = staticmethod(exit_ip_for)

    def reset(self, faults: bool = True) -> None:
        """Clear gateway/origin logs and counters (and runtime faults) between tests."""
        self.gateway.reset(faults)
        self.origin.reset()
        if faults:
            self.origin.set_latency(*self._origin_latency0)
