"""Sandbox gateway: a rotating-proxy look-alike with sticky sessions.

Clients authenticate with ``<user>-session-<id>:<password>``; every upstream
connection of a session is bound to a loopback address derived from the id, so
the origin sees a stable "exit IP" per session, like a real residential-proxy
provider. Nothing ever leaves the loopback interface: non-loopback hosts are
routed to the sandbox origin. The request log and counters let tests check the
client's session/connection discipline; ban rules and latency let later work
exercise retry and back-off logic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import random
import re
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._loopcall import LoopBound
from .http11 import (
    MAX_HEAD,
    ChunkedTracker,
    HTTPParseError,
    content_length,
    is_chunked,
    parse_head,
    parse_request_line,
    parse_status_line,
    simple_response,
    wants_close,
)
from .log import RequestLog
from .tls import insecure_client_context

if TYPE_CHECKING:
    from .origin import Origin

REALM = b'Basic realm="hexscrape-sandbox"'
BAN_MODES = ("403", "429", "captcha")

_SID_RE = re.compile(r"[A-Za-z0-9_]+")
_SNUM_RE = re.compile(r"s(\d{1,9})")

# Hop-by-hop headers never forwarded (RFC 9110 7.6.1 plus proxy credentials).
_REQ_HOP = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"te", b"upgrade",
     b"proxy-authenticate", b"proxy-authorization"}
)
_RESP_HOP = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"upgrade", b"proxy-authenticate"}
)

CAPTCHA_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>CAPTCHA required</title></head>\n"
    b"<body><h1>Are you a robot?</h1>\n"
    b"<p>Unusual traffic detected from your network. Please solve the CAPTCHA to continue.</p>\n"
    b'<form action="/captcha" method="post"><div class="g-recaptcha" data-sitekey="sandbox">'
    b"</div><button>Verify</button></form>\n</body></html>\n"
)


def exit_ip_for(session_id: str) -> str:
    """Deterministic simulated exit IP for a session id.

    ``sNNN`` maps readably to ``127.1.<N // 250>.<N % 250 + 1>`` (so ``s007`` is
    ``127.1.0.8``); any other id hashes into ``127.2.x.y``. Linux routes all of
    127/8 to the loopback interface, so these addresses can be bound as source.
    """
    m = _SNUM_RE.fullmatch(session_id)
    if m is not None:
        n = int(m.group(1))
        if n < 250 * 256:
            return f"127.1.{n // 250}.{n % 250 + 1}"
    h = zlib.crc32(session_id.encode("utf-8"))
    return f"127.2.{(h >> 8) & 0xFF}.{h % 254 + 1}"


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)


@dataclass
class BanRule:
    """After ``after`` successful requests of a session, answer with ``mode``."""

    session: str
    after: int
    mode: str = "403"
    retry_after: int = 30
    count: int = 0
    _resp: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.mode = str(self.mode).lower()
        if self.mode not in BAN_MODES:
            raise ValueError(f"ban mode must be one of {', '.join(BAN_MODES)}, not {self.mode!r}")
        if self.after < 0:
            raise ValueError("ban 'after' must be >= 0")
        if self.mode == "403":
            self._resp = simple_response(403, b"403 Forbidden: this session is banned\n")
        elif self.mode == "429":
            self._resp = simple_response(
                429, b"429 Too Many Requests\n",
                extra=[(b"Retry-After", str(int(self.retry_after)).encode())],
            )
        else:
            self._resp = simple_response(200, CAPTCHA_HTML, b"text/html; charset=utf-8")

    @property
    def tripped(self) -> bool:
        return self.count >= self.after

    def response(self, close: bool = False) -> bytes:
        if close:
            return self._resp.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        return self._resp

    def as_dict(self) -> dict[str, Any]:
        return {"session": self.session, "after": self.after, "mode": self.mode,
                "retry_after": self.retry_after, "count": self.count, "tripped": self.tripped}


def parse_ban(spec: str) -> BanRule:
    """Parse the CLI form ``SESSION:AFTER:MODE[:RETRY_AFTER]``."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not _SID_RE.fullmatch(parts[0]):
        raise ValueError(f"bad ban spec {spec!r}, expected SESSION:AFTER:MODE[:RETRY_AFTER]")
    try:
        after = int(parts[1])
        retry = int(parts[3]) if len(parts) == 4 else 30
    except ValueError:
        raise ValueError(f"bad ban spec {spec!r}: AFTER and RETRY_AFTER must be integers") from None
    return BanRule(parts[0], after, parts[2], retry)


class _Req:
    __slots__ = ("method", "target", "version", "headers", "lower", "body", "ts",
                 "session", "user", "close", "data", "exit_ip")

    def __init__(self, method: bytes, target: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], lower: dict[bytes, bytes], body: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.lower = lower
        self.body = body
        self.ts = time.time()
        self.session: str | None = None
        self.user: str | None = None
        self.close = False
        self.data = b""
        self.exit_ip: str | None = None


class Gateway(LoopBound):
    """Forward proxy with Basic auth sticky sessions, request log and fault injection."""

    def __init__(
        self,
        user: str = "sandbox",
        password: str = "",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        origin: Origin | None = None,
        log_path: str | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        reject_password: bool = False,
        bans: Iterable[BanRule] = (),
        max_records: int = 100_000,
    ) -> None:
        self.user = user
        self.password = password
        self._password_b = password.encode("utf-8")
        self.host = host
        self.port = port
        self.origin = origin
        self.latency_ms = float(latency_ms)
        self.jitter_ms = float(jitter_ms)
        self.reject_password = bool(reject_password)
        self.log = RequestLog(log_path, max_records)
        self._initial = (self.latency_ms, self.jitter_ms, self.reject_password,
                         [(b.session, b.after, b.mode, b.retry_after) for b in bans])
        self._bans: dict[str, BanRule] = {}
        self._ban_by_ip: dict[str, BanRule] = {}
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ClientConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_conn = 0
        self._auth_cache: dict[bytes, tuple[str | None, str | None, bool]] = {}
        self._route_cache: dict[tuple[bytes, bool], tuple[str, int, bool]] = {}
        self._exit_ips: dict[str, str] = {}
        self._bind_ok = True
        self._ssl_ctx = insecure_client_context()
        self.total_requests = 0
        self._req_by_session: dict[str, int] = {}
        self._conns_by_session: dict[str, set[int]] = {}
        self._sessions_by_conn: dict[int, set[str]] = {}
        for s, a, m, r in self._initial[3]:
            self._add_ban(BanRule(s, a, m, r))
        if origin is not None:
            origin.request_hook = self._origin_hook

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        """Start listening (port 0 = pick a free one)."""
        from .errors import SandboxError, listen_error

        self._loop = loop = asyncio.get_running_loop()
        self._route_cache.clear()
        try:
            self.log.open()
        except OSError as exc:
            raise SandboxError(f"cannot open log file {self.log.path}: {exc.strerror or exc}") from None
        try:
            self._server = await loop.create_server(
                lambda: _ClientConn(self), self.host, self.port, backlog=1024
            )
        except OSError as exc:
            self.log.close()
            raise listen_error("gateway", self.host, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener, every client/upstream connection, and the log file."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    exit_ip_for = staticmethod(exit_ip_for)

    # -- public API (thread-safe) ---------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Copy of the request log (bounded to ``max_records`` most recent)."""
        return self._call(self.log.records)

    def requests_by_session(self) -> dict[str, int]:
        """Authenticated requests (http requests + CONNECT tunnels) per session."""
        return self._call(lambda: dict(self._req_by_session))

    def connections_by_session(self) -> dict[str, int]:
        """Number of distinct client connections each session was used on."""
        return self._call(lambda: {s: len(c) for s, c in self._conns_by_session.items()})

    def connection_ids_by_session(self) -> dict[str, set[int]]:
        """The client connection ids each session was used on."""
        return self._call(lambda: {s: set(c) for s, c in self._conns_by_session.items()})

    def sessions_by_connection(self) -> dict[int, set[str]]:
        """Sessions seen on each client connection (a correct client has exactly one)."""
        return self._call(lambda: {c: set(s) for c, s in self._sessions_by_conn.items()})

    def stats(self) -> dict[str, Any]:
        """Aggregate counters, cheap enough to poll from benchmarks."""
        return self._call(lambda: {
            "requests": self.total_requests,
            "connections": self._next_conn,
            "open_connections": len(self._conns),
            "sessions": len(self._req_by_session),
        })

    def ban(self, session_id: str, after: int = 0, mode: str = "403", retry_after: int = 30) -> None:
        """Ban a session after ``after`` more successful requests (403, 429 or captcha)."""
        rule = BanRule(session_id, int(after), str(mode), int(retry_after))
        self._call(self._add_ban, rule)

    def unban(self, session_id: str) -> None:
        """Remove the ban rule of a session (no-op when there is none)."""
        self._call(self._remove_ban, session_id)

    def bans(self) -> dict[str, dict[str, Any]]:
        """Current ban rules with their request counters."""
        return self._call(lambda: {s: r.as_dict() for s, r in self._bans.items()})

    def set_latency(self, latency_ms: float, jitter_ms: float = 0.0) -> None:
        """Delay each request/tunnel by latency_ms + uniform(0, jitter_ms) before handling."""

        def apply() -> None:
            self.latency_ms = float(latency_ms)
            self.jitter_ms = float(jitter_ms)

        self._call(apply)

    def set_reject_password(self, reject: bool = True) -> None:
        """When on, every request gets 407 as if the password had been revoked."""

        def apply() -> None:
            self.reject_password = bool(reject)

        self._call(apply)

    def reset(self, faults: bool = True) -> None:
        """Clear log and counters; with ``faults`` also restore the start-up fault config."""

        def apply() -> None:
            self.log.clear()
            self.total_requests = 0
            self._req_by_session.clear()
            self._conns_by_session.clear()
            self._sessions_by_conn.clear()
            if faults:
                self.latency_ms, self.jitter_ms, self.reject_password, bans = self._initial
                self._bans.clear()
                self._ban_by_ip.clear()
                for s, a, m, r in bans:
                    self._add_ban(BanRule(s, a, m, r))

        self._call(apply)

    # -- internals (loop thread) ----------------------------------------
    def _add_ban(self, rule: BanRule) -> None:
        self._remove_ban(rule.session)
        self._bans[rule.session] = rule
        self._ban_by_ip[self._exit_ip(rule.session)] = rule

    def _remove_ban(self, session_id: str) -> None:
        rule = self._bans.pop(session_id, None)
        if rule is not None:
            ip = self._exit_ip(session_id)
            if self._ban_by_ip.get(ip) is rule:
                del self._ban_by_ip[ip]

    def _origin_hook(self, ip: str) -> bytes | None:
        """Ban enforcement for https requests inside tunnels (seen by the origin only)."""
        if not self._ban_by_ip:
            return None
        rule = self._ban_by_ip.get(ip)
        if rule is None:
            return None
        if rule.tripped:
            return rule.response()
        rule.count += 1
        return None

    def _exit_ip(self, session: str) -> str:
        ip = self._exit_ips.get(session)
        if ip is None:
            ip = self._exit_ips[session] = exit_ip_for(session)
        return ip

    def _check_auth(self, value: bytes | None) -> tuple[str | None, str | None, bool]:
        if value is None:
            return None, None, False
        hit = self._auth_cache.get(value)
        if hit is None:
            hit = self._parse_auth(value)
            if len(self._auth_cache) > 50_000:
                self._auth_cache.clear()
            self._auth_cache[value] = hit
        if self.reject_password and hit[2]:
            return hit[0], hit[1], False
        return hit

    def _parse_auth(self, value: bytes) -> tuple[str | None, str | None, bool]:
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None, None, False
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None, None, False
        user_b, sep, pw = raw.partition(b":")
        if not sep:
            return None, None, False
        user = user_b.decode("utf-8", "replace")
        base, sep2, sid = user.rpartition("-session-")
        session = sid if sep2 and _SID_RE.fullmatch(sid) else None
        ok = session is not None and base == self.user and pw == self._password_b
        return session, user, ok

    def _count(self, session: str, conn_id: int) -> None:
        self.total_requests += 1
        self._req_by_session[session] = self._req_by_session.get(session, 0) + 1
        seen = self._sessions_by_conn.get(conn_id)
        if seen is None:
            seen = self._sessions_by_conn[conn_id] = set()
        if session not in seen:
            seen.add(session)
            conns = self._conns_by_session.get(session)
            if conns is None:
                conns = self._conns_by_session[session] = set()
            conns.add(conn_id)

    def _route(self, authority: bytes, tls: bool, connect: bool) -> tuple[str, int, bool]:
        """(address, port, is_origin_https) for a request authority; loopback only."""
        key = (authority, tls if not connect else None)
        hit = self._route_cache.get(key)  # type: ignore[arg-type]
        if hit is not None:
            return hit
        text = authority.decode("latin-1").rpartition("@")[2]
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, sep, port_s = text.rpartition(":")
            if not sep or not port_s.isdigit():
                host, port_s = text, ""
        host = host.lower()
        if port_s and not port_s.isdigit():
            raise HTTPParseError("bad port")
        port = int(port_s) if port_s else (443 if tls or connect else 80)
        if not host or port > 65535:
            raise HTTPParseError("bad authority")
        origin = self.origin
        if _is_loopback_host(host):
            addr = "127.0.0.1" if host == "localhost" else host
            to_origin_https = origin is not None and addr == _origin_addr(origin) and port == origin.https_port
            hit = (addr, port, to_origin_https)
        elif origin is None:
            raise HTTPParseError("no sandbox origin to route non-loopback hosts to")
        else:
            https = tls if not connect else port != 80
            hit = (_origin_addr(origin), origin.https_port if https else origin.http_port, https)
        if len(self._route_cache) > 10_000:
            self._route_cache.clear()
        self._route_cache[key] = hit  # type: ignore[index]
        return hit

    def _record(self, conn: _ClientConn, req: _Req, kind: str, status: int) -> None:
        self.log.add({
            "ts": req.ts,
            "conn": conn.conn_id,
            "session": req.session,
            "user": req.user,
            "method": req.method.decode("latin-1"),
            "target": req.target.decode("latin-1"),
            "kind": kind,
            "status": status,
            "exit_ip": req.exit_ip,
        })

    async def _open_upstream(self, key: tuple[str, str, int, bool], client: _ClientConn) -> _Upstream:
        exit_ip, addr, port, tls = key
        loop = self._loop
        assert loop is not None
        ssl_kw: dict[str, Any] = {}
        if tls:
            ssl_kw = {"ssl": self._ssl_ctx, "server_hostname": addr}
        if self._bind_ok:
            try:
                _, proto = await loop.create_connection(
                    lambda: _Upstream(client, key), addr, port, local_addr=(exit_ip, 0), **ssl_kw
                )
                return proto
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                self._bind_ok = False  # e.g. macOS: only 127.0.0.1 exists
        _, proto = await loop.create_connection(lambda: _Upstream(client, key), addr, port, **ssl_kw)
        return proto


def _origin_addr(origin: Origin) -> str:
    return "127.0.0.1" if origin.host == "localhost" else origin.host


_407 = simple_response(
    407, b"407 Proxy Authentication Required\n", extra=[(b"Proxy-Authenticate", REALM)]
)
_407_CLOSE = simple_response(
    407, b"407 Proxy Authentication Required\n", extra=[(b"Proxy-Authenticate", REALM)], close=True
)
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class _ClientConn(asyncio.Protocol):
    """One accepted client connection: HTTP proxying with keep-alive, or a tunnel."""

    __slots__ = ("gw", "loop", "transport", "conn_id", "buf", "busy", "closed", "tunnel",
                 "up", "close_after", "processing", "req")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        assert gw._loop is not None
        self.loop: asyncio.AbstractEventLoop = gw._loop
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.buf = b""
        self.busy = False
        self.closed = False
        self.tunnel = False
        self.up: _Upstream | None = None
        self.close_after = False
        self.processing = False
        self.req: _Req | None = None

    # -- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        gw = self.gw
        gw._next_conn += 1
        self.conn_id = gw._next_conn
        gw._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw._conns.discard(self)
        if self.up is not None:
            self.up.close()
            self.up = None

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            up = self.up
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        if self.tunnel and self.up is not None:
            self.up.close()  # flushes what we already wrote, then closes
        return None

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    def abort(self) -> None:
        if self.up is not None:
            self.up.abort()
        if self.transport is not None:
            self.transport.abort()

    # -- request parsing --------------------------------------------------
    def _process(self) -> None:
        self.processing = True
        try:
            while not self.busy and not self.closed and self.buf:
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
                body_start = end + 4
                if is_chunked(lower):
                    tracker = ChunkedTracker()
                    try:
                        n = tracker.feed(buf[body_start:])
                    except HTTPParseError as exc:
                        self._fail(400, str(exc).encode() + b"\n")
                        return
                    if not tracker.done:
                        return
                    total = body_start + n
                else:
                    total = body_start + (length or 0)
                    if len(buf) < total:
                        return
                req = _Req(method, target, version, headers, lower, buf[body_start:total])
                self.buf = buf[total:]
                self.busy = True
                gw = self.gw
                if gw.latency_ms or gw.jitter_ms:
                    delay = (gw.latency_ms + random.uniform(0.0, gw.jitter_ms)) / 1000.0
                    self.loop.call_later(delay, self._dispatch, req)
                else:
                    self._dispatch(req)
        finally:
            self.processing = False

    def _fail(self, status: int, msg: bytes) -> None:
        assert self.transport is not None
        self.transport.write(simple_response(status, msg, close=True))
        self.transport.close()
        self.closed = True
        self.buf = b""

    def _reply(self, resp: bytes, close: bool) -> None:
        """Send a locally generated response, then continue with the next request."""
        if self.closed:
            return
        assert self.transport is not None
        self.transport.write(resp)
        if close:
            self._close()
        else:
            self._done()

    def _done(self) -> None:
        self.busy = False
        self.req = None
        if not self.processing and self.buf and not self.closed:
            self._process()

    def _close(self) -> None:
        self.closed = True
        if self.up is not None:
            self.up.close()
            self.up = None
        if self.transport is not None:
            self.transport.close()

    # -- request handling -------------------------------------------------
    def _dispatch(self, req: _Req) -> None:
        if self.closed:
            return
        gw = self.gw
        lower = req.lower
        session, user, ok = gw._check_auth(lower.get(b"proxy-authorization"))
        req.session = session
        req.user = user
        close = wants_close(req.version, lower)
        pc = lower.get(b"proxy-connection")
        if pc is not None and b"close" in pc.lower():
            close = True
        req.close = close
        connect = req.method == b"CONNECT"
        if not ok or session is None:
            gw._record(self, req, "connect" if connect else "http", 407)
            self._reply(_407_CLOSE if close else _407, close)
            return
        gw._count(session, self.conn_id)
        req.exit_ip = exit_ip = gw._exit_ip(session)
        rule = gw._bans.get(session) if gw._bans else None
        if connect:
            self._connect(req, rule)
            return
        target = req.target
        if target.startswith(b"http://"):
            tls = False
            rest = target[7:]
        elif target.startswith(b"https://"):
            tls = True
            rest = target[8:]
        else:
            gw._record(self, req, "http", 400)
            self._reply(simple_response(400, b"proxy requests need an absolute URI\n", close=True), True)
            return
        cut = len(rest)
        for sep in (b"/", b"?", b"#"):
            i = rest.find(sep)
            if 0 <= i < cut:
                cut = i
        authority = rest[:cut]
        path = rest[cut:]
        if not path.startswith(b"/"):
            path = b"/" + path
        try:
            addr, port, _ = gw._route(authority, tls, False)
        except HTTPParseError as exc:
            gw._record(self, req, "http", 400)
            self._reply(simple_response(400, str(exc).encode() + b"\n", close=True), True)
            return
        if rule is not None:
            if rule.tripped:
                gw._record(self, req, "http", 403 if rule.mode == "403" else 429 if rule.mode == "429" else 200)
                self._reply(rule.response(close), close)
                return
            rule.count += 1
        # Build the upstream request: origin-form target, hop-by-hop headers dropped.
        drop = _REQ_HOP
        conn_hdr = lower.get(b"connection")
        if conn_hdr is not None:
            drop = drop | {t.strip().lower() for t in conn_hdr.split(b",")}
        parts = [req.method, b" ", path, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            if name.lower() not in drop:
                parts += (name, b": ", value, b"\r\n")
        if b"host" not in lower:
            parts += (b"Host: ", authority.rpartition(b"@")[2], b"\r\n")
        parts += (b"\r\n", req.body)
        req.data = b"".join(parts)
        self.req = req
        key = (exit_ip, addr, port, tls)
        up = self.up
        if up is not None and up.key == key and up.reusable and not up.closed:
            up.send(req, retry_ok=True)
            return
        if up is not None:
            up.close()
            self.up = None
        self._spawn(self._connect_then_send(key, req))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        tasks = self.gw._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _connect_then_send(self, key: tuple[str, str, int, bool], req: _Req) -> None:
        try:
            up = await self.gw._open_upstream(key, self)
        except (TimeoutError, OSError) as exc:
            if not self.closed:
                self.gw._record(self, req, "http", 502)
                msg = f"502 Bad Gateway: cannot reach {key[1]}:{key[2]}: {exc}\n".encode()
                self._reply(simple_response(502, msg, close=req.close), req.close)
            return
        if self.closed:
            up.close()
            return
        self.up = up
        up.send(req, retry_ok=False)

    def _connect(self, req: _Req, rule: BanRule | None) -> None:
        gw = self.gw
        try:
            addr, port, to_origin_https = gw._route(req.target, False, True)
        except HTTPParseError as exc:
            gw._record(self, req, "connect", 400)
            self._reply(simple_response(400, str(exc).encode() + b"\n", close=True), True)
            return
        if rule is not None:
            if rule.tripped and rule.mode != "captcha":
                gw._record(self, req, "connect", int(rule.mode))
                self._reply(rule.response(close=True), True)
                return
            # Requests inside a tunnel to the origin are counted by the origin hook.
            if not to_origin_https and not rule.tripped:
                rule.count += 1
        if self.up is not None:
            self.up.close()
            self.up = None
        assert req.exit_ip is not None
        self._spawn(self._open_tunnel((req.exit_ip, addr, port, False), req))

    async def _open_tunnel(self, key: tuple[str, str, int, bool], req: _Req) -> None:
        gw = self.gw
        try:
            up = await gw._open_upstream(key, self)
        except (TimeoutError, OSError) as exc:
            if not self.closed:
                gw._record(self, req, "connect", 502)
                msg = f"502 Bad Gateway: cannot reach {key[1]}:{key[2]}: {exc}\n".encode()
                self._reply(simple_response(502, msg, close=True), True)
            return
        if self.closed:
            up.close()
            return
        gw._record(self, req, "connect", 200)
        self.up = up
        up.state = _TUNNEL
        self.tunnel = True
        assert self.transport is not None and up.transport is not None
        self.transport.write(_ESTABLISHED)
        if self.buf:
            up.transport.write(self.buf)
            self.buf = b""

    # -- upstream callbacks -----------------------------------------------
    def _response_head(self, req: _Req, status: int, head: bytes, close: bool) -> None:
        self.gw._record(self, req, "http", status)
        if close:
            self.close_after = True
        assert self.transport is not None
        self.transport.write(head)

    def _response_done(self) -> None:
        if self.close_after or (self.req is not None and self.req.close):
            self._close()
        else:
            self._done()

    def _upstream_failed(self, up: _Upstream, req: _Req, why: str) -> None:
        if self.up is up:
            self.up = None
        up.close()
        if self.closed:
            return
        self.gw._record(self, req, "http", 502)
        self._reply(simple_response(502, f"502 Bad Gateway: {why}\n".encode(), close=req.close), req.close)

    def _retry(self, up: _Upstream, req: _Req) -> None:
        """A reused keep-alive upstream closed before answering: resend on a fresh one."""
        if self.up is up:
            self.up = None
        if not self.closed:
            self._spawn(self._connect_then_send(up.key, req))


_IDLE, _HEAD, _BODY_CL, _BODY_CHUNKED, _BODY_EOF, _TUNNEL = range(6)


class _Upstream(asyncio.Protocol):
    """Connection from the gateway (bound to the session's exit IP) to the target."""

    __slots__ = ("client", "key", "transport", "closed", "state", "buf", "remaining",
                 "tracker", "req", "got_bytes", "reusable", "sent", "retry_ok")

    def __init__(self, client: _ClientConn, key: tuple[str, str, int, bool]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.state = _IDLE
        self.buf = b""
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        self.req: _Req | None = None
        self.got_bytes = False
        self.reusable = True
        self.sent = 0
        self.retry_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, req: _Req, retry_ok: bool) -> None:
        self.req = req
        self.state = _HEAD
        self.got_bytes = False
        self.retry_ok = retry_ok and self.sent > 0
        self.sent += 1
        assert self.transport is not None
        self.transport.write(req.data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        t = self.client.transport
        if t is not None and not self.client.closed:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None and not self.client.closed:
            t.resume_reading()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _TUNNEL:
            t = self.client.transport
            if t is not None:
                t.write(data)
            return
        if state == _IDLE or self.closed:
            self.reusable = False  # unsolicited bytes: connection is unusable
            self.close()
            return
        self.got_bytes = True
        if state == _HEAD:
            self._head(data)
        else:
            self._body(data)

    def _head(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        req = self.req
        assert req is not None
        client = self.client
        if end < 0:
            self.buf = buf
            if len(buf) > MAX_HEAD:
                self.buf = b""
                client._upstream_failed(self, req, "upstream response head too large")
            return
        self.buf = b""
        try:
            start, headers, lower = parse_head(buf[:end])
            version, status = parse_status_line(start)
            length = content_length(lower)
        except HTTPParseError as exc:
            client._upstream_failed(self, req, f"bad upstream response: {exc}")
            return
        head_end = end + 4
        if 100 <= status < 200 and status != 101:  # interim response: pass on, keep waiting
            assert client.transport is not None
            client.transport.write(buf[:head_end])
            if len(buf) > head_end:
                self._head(buf[head_end:])
            return
        up_close = wants_close(version, lower)
        if req.method == b"HEAD" or status in (204, 304) or status < 200:
            mode = _IDLE
        elif is_chunked(lower):
            mode = _BODY_CHUNKED
            self.tracker = ChunkedTracker()
        elif length is not None:
            mode = _BODY_CL if length else _IDLE
            self.remaining = length
        else:
            mode = _BODY_EOF
            up_close = True
        self.reusable = not up_close
        close = client.close_after or req.close or mode == _BODY_EOF
        raw = buf[:head_end]
        if close or not lower.keys().isdisjoint(_RESP_HOP):
            raw = _rewrite_head(start, headers, lower, close)
        client._response_head(req, status, raw, close)
        if mode == _IDLE:
            self._finish()
            return
        self.state = mode
        if len(buf) > head_end:
            self._body(buf[head_end:])

    def _body(self, data: bytes) -> None:
        client = self.client
        t = client.transport
        assert t is not None
        state = self.state
        if state == _BODY_CL:
            n = len(data)
            if n >= self.remaining:
                t.write(data[: self.remaining] if n > self.remaining else data)
                self.remaining = 0
                self._finish()
            else:
                t.write(data)
                self.remaining -= n
        elif state == _BODY_CHUNKED:
            assert self.tracker is not None
            try:
                n = self.tracker.feed(data)
            except HTTPParseError:
                self.reusable = False
                self.close()
                client._close()
                return
            t.write(data[:n] if n < len(data) else data)
            if self.tracker.done:
                self.tracker = None
                self._finish()
        else:  # _BODY_EOF
            t.write(data)

    def _finish(self) -> None:
        self.state = _IDLE
        self.req = None
        if not self.reusable:
            self.close()
        self.client._response_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self.state
        client = self.client
        if state == _TUNNEL:
            if not client.closed:
                client._close()
        elif state == _HEAD:
            req = self.req
            assert req is not None
            self.state = _IDLE
            if not self.got_bytes and self.retry_ok:
                client._retry(self, req)
            else:
                client._upstream_failed(self, req, "upstream closed before responding")
        elif state == _BODY_EOF:
            self.reusable = False
            self._finish()
        elif state != _IDLE:  # truncated body: the client must see the connection drop
            self.state = _IDLE
            if not client.closed:
                client._close()
        if client.up is self:
            client.up = None


def _rewrite_head(start: bytes, headers: list[tuple[bytes, bytes]],
                  lower: dict[bytes, bytes], close: bool) -> bytes:
    drop = _RESP_HOP
    conn_hdr = lower.get(b"connection")
    if conn_hdr is not None:
        drop = drop | {t.strip().lower() for t in conn_hdr.split(b",")}
    parts = [start, b"\r\n"]
    for name, value in headers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
