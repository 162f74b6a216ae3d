"""Sandbox origin: a tiny httpbin-like target site on plain HTTP and HTTPS.

It stands in for "the internet": the gateway routes every non-loopback host
here. Endpoints (httpbin-shaped JSON): ``/ip``, ``/headers``, ``/status/<code>``,
``/redirect?to=``, ``/slow?ms=``, ``/cookies``, ``/cookies/set?k=v``, ``/anything``
(echoes method, args, headers and body); everything else is 404.

It reports the peer IP it sees (the session's simulated exit IP) and
records per-IP concurrency, which is how tests check per-session limits for
both http and https traffic without seeing inside CONNECT tunnels.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

from ._loopcall import LoopBound
from .http11 import (
    MAX_HEAD,
    HTTPParseError,
    content_length,
    is_chunked,
    parse_head,
    parse_request_line,
    simple_response,
    status_line,
    wants_close,
)
from .tls import SelfSignedCert, generate_cert, server_context

JSON = b"application/json"

# Returns a complete serialized response to send instead of the normal one.
RequestHook = Callable[[str], "bytes | None"]


class Origin(LoopBound):
    """HTTP + HTTPS origin server with in-memory request statistics."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        http_port: int = 0,
        https_port: int = 0,
        *,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        max_records: int = 1000,
        cert: SelfSignedCert | None = None,
    ) -> None:
        self.host = host
        self.http_port = http_port
        self.https_port = https_port
        self.latency_ms = float(latency_ms)
        self.jitter_ms = float(jitter_ms)
        self.cert = cert
        self.request_count = 0
        self.proxy_auth_seen = 0
        # Set by the gateway: enforces session bans on requests inside tunnels.
        self.request_hook: RequestHook | None = None
        self._in_flight: dict[str, int] = {}
        self._max_in_flight: dict[str, int] = {}
        self._requests_by_ip: dict[str, int] = {}
        self._records: deque[tuple[Any, ...]] = deque(maxlen=max_records)
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[_OriginProtocol] = set()
        self._ip_bodies: dict[str, bytes] = {}

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        """Bind both ports (0 = pick a free one)."""
        from .errors import listen_error

        self._loop = loop = asyncio.get_running_loop()
        if self.cert is None:
            self.cert = generate_cert()
        ctx = server_context(self.cert)
        try:
            srv = await loop.create_server(
                lambda: _OriginProtocol(self, False), self.host, self.http_port, backlog=1024
            )
        except OSError as exc:
            raise listen_error("origin http", self.host, self.http_port, exc) from None
        self._servers.append(srv)
        self.http_port = srv.sockets[0].getsockname()[1]
        try:
            srv = await loop.create_server(
                lambda: _OriginProtocol(self, True), self.host, self.https_port,
                ssl=ctx, backlog=1024,
            )
        except OSError as exc:
            await self.stop()
            raise listen_error("origin https", self.host, self.https_port, exc) from None
        self._servers.append(srv)
        self.https_port = srv.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close listeners and every open connection."""
        for srv in self._servers:
            srv.close()
        for conn in list(self._conns):
            conn.abort()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.host}:{self.https_port}"

    # -- public API (thread-safe) ---------------------------------------
    def max_in_flight_by_ip(self) -> dict[str, int]:
        """Peak number of concurrent in-flight requests per peer IP since reset."""
        return self._call(lambda: dict(self._max_in_flight))

    def in_flight_by_ip(self) -> dict[str, int]:
        """Requests currently being served, per peer IP."""
        return self._call(lambda: {k: v for k, v in self._in_flight.items() if v})

    def requests_by_ip(self) -> dict[str, int]:
        """Number of requests received per peer IP since reset."""
        return self._call(lambda: dict(self._requests_by_ip))

    def records(self) -> list[dict[str, Any]]:
        """Recent requests (bounded): ts, ip, scheme, method, path, headers."""

        def snap() -> list[dict[str, Any]]:
            return [
                {
                    "ts": ts,
                    "ip": ip,
                    "scheme": "https" if tls else "http",
                    "method": method.decode("latin-1"),
                    "path": target.decode("latin-1"),
                    "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in hdrs],
                }
                for ts, ip, tls, method, target, hdrs in self._records
            ]

        return self._call(snap)

    def set_latency(self, latency_ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every response by latency_ms + uniform(0, jitter_ms)."""

        def apply() -> None:
            self.latency_ms = float(latency_ms)
            self.jitter_ms = float(jitter_ms)

        self._call(apply)

    def reset(self) -> None:
        """Forget counters and records (in-flight requests keep being tracked)."""

        def apply() -> None:
            self.request_count = 0
            self.proxy_auth_seen = 0
            self._requests_by_ip.clear()
            self._records.clear()
            self._max_in_flight = {k: v for k, v in self._in_flight.items() if v}

        self._call(apply)

    # -- request handling (loop thread) ----------------------------------
    def _respond(
        self, ip: str, tls: bool, method: bytes, target: bytes,
        headers: list[tuple[bytes, bytes]], lower: dict[bytes, bytes], body: bytes,
    ) -> tuple[bytes, float]:
        """Return (serialized response, extra delay in seconds)."""
        self.request_count += 1
        self._requests_by_ip[ip] = self._requests_by_ip.get(ip, 0) + 1
        self._records.append((time.time(), ip, tls, method, target, headers))
        if b"proxy-authorization" in lower:
            self.proxy_auth_seen += 1
        delay = 0.0
        if self.latency_ms or self.jitter_ms:
            delay = (self.latency_ms + random.uniform(0.0, self.jitter_ms)) / 1000.0
        if tls and self.request_hook is not None:
            hooked = self.request_hook(ip)
            if hooked is not None:
                return hooked, delay
        if target[:1] != b"/":  # absolute-form: drop scheme://authority
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash > 0 else b"/"
        path, _, query = target.partition(b"?")
        if path == b"/ip":
            return self._ip_body(ip), delay
        if path == b"/slow":
            ms = _int_param(query, "ms", 0)
            return self._ip_body(ip), delay + min(max(ms, 0), 600_000) / 1000.0
        if path == b"/headers":
            return simple_response(200, _json({"headers": _header_dict(headers)}), JSON), delay
        if path.startswith(b"/status/"):
            try:
                code = int(path[8:])
            except ValueError:
                code = 0
            if not 200 <= code <= 599:
                return simple_response(400, b"bad status code\n"), delay
            return _status_only(code), delay
        if path == b"/redirect":
            to = dict(_qs(query)).get("to")
            if not to:
                return simple_response(400, b"missing ?to=\n"), delay
            loc = to.encode("utf-8")
            return simple_response(302, b"", extra=[(b"Location", loc)]), delay
        if path == b"/cookies/set":
            pairs = _qs(query)
            extra = [(b"Set-Cookie", f"{k}={v}; Path=/".encode()) for k, v in pairs]
            return simple_response(200, _json({"cookies": dict(pairs)}), JSON, extra), delay
        if path == b"/anything" or path.startswith(b"/anything/"):
            echo = {
                "method": method.decode("latin-1"),
                "url": target.decode("latin-1"),
                "args": dict(_qs(query)),
                "headers": _header_dict(headers),
                "data": body.decode("utf-8", "replace"),
                "origin": ip,
            }
            return simple_response(200, _json(echo), JSON), delay
        if path == b"/cookies":
            return simple_response(200, _json({"cookies": _cookie_dict(lower)}), JSON), delay
        return simple_response(404, b"not found\n"), delay

    def _ip_body(self, ip: str) -> bytes:
        resp = self._ip_bodies.get(ip)
        if resp is None:
            if len(self._ip_bodies) > 100_000:
                self._ip_bodies.clear()
            resp = simple_response(200, _json({"origin": ip}), JSON)
            self._ip_bodies[ip] = resp
        return resp


class _OriginProtocol(asyncio.Protocol):
    """One client connection; requests are served strictly in order."""

    __slots__ = ("origin", "tls", "transport", "ip", "buf", "busy", "closed", "loop")

    def __init__(self, origin: Origin, tls: bool) -> None:
        self.origin = origin
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.buf = b""
        self.busy = False
        self.closed = False
        assert origin._loop is not None
        self.loop: asyncio.AbstractEventLoop = origin._loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = peer[0]
        self.origin._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin._conns.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def _fail(self, status: int, msg: bytes) -> None:
        assert self.transport is not None
        self.transport.write(simple_response(status, msg, close=True))
        self.transport.close()
        self.closed = True
        self.buf = b""

    def _process(self) -> None:
        while not self.busy and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(431, b"request head too large\n")
                return
            try:
                start, headers, lower = parse_head(buf[:end])
                method, target, version = parse_request_line(start)
                length = content_length(lower)
            except HTTPParseError as exc:
                self._fail(400, str(exc).encode() + b"\n")
                return
            if is_chunked(lower):
                self._fail(411, b"chunked request bodies are not supported\n")
                return
            total = end + 4 + (length or 0)
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            self._handle(method, target, version, headers, lower, body)

    def _handle(
        self, method: bytes, target: bytes, version: bytes,
        headers: list[tuple[bytes, bytes]], lower: dict[bytes, bytes], body: bytes,
    ) -> None:
        origin = self.origin
        ip = self.ip
        n = origin._in_flight.get(ip, 0) + 1
        origin._in_flight[ip] = n
        if n > origin._max_in_flight.get(ip, 0):
            origin._max_in_flight[ip] = n
        resp, delay = origin._respond(ip, self.tls, method, target, headers, lower, body)
        close = wants_close(version, lower)
        if method == b"HEAD":
            resp = resp[: resp.find(b"\r\n\r\n") + 4]
        if close:
            resp = resp.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        if delay > 0:
            self.busy = True
            self.loop.call_later(delay, self._finish, resp, close)
        else:
            self._finish(resp, close)

    def _finish(self, resp: bytes, close: bool) -> None:
        origin = self.origin
        origin._in_flight[self.ip] -= 1
        self.busy = False
        if self.closed:
            return
        assert self.transport is not None
        self.transport.write(resp)
        if close:
            self.transport.close()
            self.closed = True
        elif self.buf:
            self._process()


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8") + b"\n"


def _status_only(code: int) -> bytes:
    if code in (204, 304):
        return status_line(code) + b"\r\n"
    return simple_response(code)


def _qs(query: bytes) -> list[tuple[str, str]]:
    return parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8")


def _int_param(query: bytes, name: str, default: int) -> int:
    for k, v in _qs(query):
        if k == name:
            try:
                return int(float(v))
            except ValueError:
                return default
    return default


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        name = k.decode("latin-1")
        val = v.decode("latin-1")
        out[name] = out[name] + ", " + val if name in out else val
    return out


def _cookie_dict(lower: dict[bytes, bytes]) -> dict[str, str]:
    raw = lower.get(b"cookie", b"").decode("latin-1")
    out: dict[str, str] = {}
    for part in raw.replace(",", ";").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k:
            out[k] = unquote(v)
    return out
