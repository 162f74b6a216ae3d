"""Tests for the loopback sandbox (origin + sticky-session gateway) over real sockets."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hexscrape.sandbox import BanRule, Sandbox, SandboxError, exit_ip_for, parse_ban

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0


# -- fixtures & helpers ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture()
def sb(shared_sandbox: Sandbox) -> Sandbox:
    shared_sandbox.reset()
    return shared_sandbox


def gw_conn(sb: Sandbox) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", sb.gateway.port, timeout=TIMEOUT)


def proxy_get(
    sb: Sandbox,
    url: str,
    session: str | None = "s001",
    *,
    conn: http.client.HTTPConnection | None = None,
    password: str | None = None,
    auth: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    """One absolute-URI request through the gateway (on ``conn`` when given)."""
    own = conn is None
    c = conn or gw_conn(sb)
    hdrs = dict(headers or {})
    if auth is not None:
        hdrs["Proxy-Authorization"] = auth
    elif session is not None:
        hdrs["Proxy-Authorization"] = sb.proxy_auth(session, password)
    try:
        c.request(method, url, body=body, headers=hdrs)
        resp = c.getresponse()
        data = resp.read()
    finally:
        if own:
            c.close()
    return resp.status, resp, data


def tunnel_conn(sb: Sandbox, host: str, port: int, session: str) -> http.client.HTTPSConnection:
    """HTTPS connection through a CONNECT tunnel of the gateway (cert not verified)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", sb.gateway.port, timeout=TIMEOUT, context=ctx)
    c.set_tunnel(host, port, headers={"Proxy-Authorization": sb.proxy_auth(session)})
    return c


def https_get(c: http.client.HTTPSConnection, path: str) -> tuple[int, http.client.HTTPResponse, bytes]:
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r, r.read()


def raw_connect(sb: Sandbox, target: str, auth: str | None) -> tuple[int, str, socket.socket]:
    """Send CONNECT by hand; returns (status, response head, socket)."""
    s = socket.create_connection(("127.0.0.1", sb.gateway.port), timeout=TIMEOUT)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    s.sendall((head + "\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    text = buf.decode("latin-1")
    return int(text.split(" ", 2)[1]), text, s


def ip_of(data: bytes) -> str:
    return json.loads(data)["origin"]


def wait_for(pred: Any, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


# -- exit IPs and sticky sessions ------------------------------------------------


def test_exit_ip_mapping() -> None:
    assert exit_ip_for("s007") == "127.1.0.8"
    assert exit_ip_for("s000") == "127.1.0.1"
    assert exit_ip_for("s250") == "127.1.1.1"
    other = exit_ip_for("abc_DEF")
    assert other.startswith("127.2.") and other == exit_ip_for("abc_DEF")
    assert other != exit_ip_for("abc_DEG")


def test_ip_stable_per_session_and_distinct(sb: Sandbox) -> None:
    ips = {}
    for session in ("s001", "s002", "alpha_1"):
        seen = {ip_of(proxy_get(sb, f"http://httpbin.org/ip?n={i}", session)[2]) for i in range(3)}
        assert seen == {exit_ip_for(session)}
        ips[session] = seen.pop()
    assert len(set(ips.values())) == 3
    # Loopback target as given (the origin's own address) sees the same exit IP.
    status, _, data = proxy_get(sb, sb.http_origin + "/ip", "s002")
    assert status == 200 and ip_of(data) == ips["s002"]
    # And the same IP over https through a tunnel.
    c = tunnel_conn(sb, "httpbin.org", 443, "s001")
    try:
        assert ip_of(https_get(c, "/ip?n=1")[2]) == ips["s001"]
    finally:
        c.close()
    recs = sb.gateway.records()
    assert {r["exit_ip"] for r in recs if r["session"] == "s001"} == {ips["s001"]}
    assert sb.gateway.requests_by_session()["s001"] == 4


def test_special_character_credentials() -> None:
    password = "p@ss:w/rd%20 ünï€"
    with Sandbox(user="us.er+x", password=password) as box:
        status, _, data = proxy_get(box, "http://example.com/ip", "s5")
        assert status == 200 and ip_of(data) == exit_ip_for("s5")
        raw = f"us.er+x-session-s5:{password}".encode()
        auth = "Basic " + base64.b64encode(raw).decode()
        assert proxy_get(box, "http://example.com/ip", auth=auth)[0] == 200
        assert proxy_get(box, "http://example.com/ip", "s5", password=password[:-1])[0] == 407
        assert box.env() == {"HEX_GATEWAY": box.gateway_url, "HEX_USER": "us.er+x", "HEX_PASS": password}


# -- authentication ---------------------------------------------------------------


def test_407_on_bad_credentials(sb: Sandbox) -> None:
    def basic(raw: str) -> str:
        return "Basic " + base64.b64encode(raw.encode()).decode()

    cases = [
        None,  # no Proxy-Authorization at all
        sb.proxy_auth("s001", "wrong"),
        basic(f"other-session-s001:{sb.password}"),  # wrong user
        basic(f"{sb.user}:{sb.password}"),  # no session
        basic(f"{sb.user}-session-s-1:{sb.password}"),  # bad id characters
        basic(f"{sb.user}-session-:{sb.password}"),  # empty id
        "Bearer abc",
        "Basic !!!notbase64",
    ]
    for auth in cases:
        status, resp, body = proxy_get(sb, "http://httpbin.org/ip", None, auth=auth)
        assert status == 407, auth
        assert resp.getheader("Proxy-Authenticate") == 'Basic realm="hexscrape-sandbox"'
        assert body
    recs = sb.gateway.records()
    assert [r["status"] for r in recs] == [407] * len(cases)
    assert recs[0]["session"] is None and recs[1]["session"] == "s001"
    assert recs[3]["session"] is None and recs[4]["session"] is None
    assert sb.origin.request_count == 0
    assert sb.gateway.requests_by_session() == {}
    # CONNECT without credentials is refused too.
    status, head, s = raw_connect(sb, "httpbin.org:443", None)
    s.close()
    assert status == 407 and "Proxy-Authenticate" in head


def test_407_keeps_connection_usable(sb: Sandbox) -> None:
    c = gw_conn(sb)
    try:
        assert proxy_get(sb, "http://httpbin.org/ip", "s001", conn=c, password="nope")[0] == 407
        assert proxy_get(sb, "http://httpbin.org/ip", "s001", conn=c)[0] == 200
    finally:
        c.close()


def test_reject_password(sb: Sandbox) -> None:
    sb.gateway.set_reject_password(True)
    assert proxy_get(sb, "http://httpbin.org/ip", "s001")[0] == 407
    status, _, s = raw_connect(sb, "httpbin.org:443", sb.proxy_auth("s001"))
    s.close()
    assert status == 407
    sb.gateway.set_reject_password(False)
    assert proxy_get(sb, "http://httpbin.org/ip", "s001")[0] == 200


# -- header hygiene ----------------------------------------------------------------


def test_origin_never_sees_proxy_headers_http(sb: Sandbox) -> None:
    status, _, data = proxy_get(
        sb, "http://httpbin.org/headers", "s001",
        headers={"X-Custom": "yes", "Proxy-Connection": "keep-alive", "Keep-Alive": "5",
                 "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1"},
    )
    assert status == 200
    headers = {k.lower(): v for k, v in json.loads(data)["headers"].items()}
    assert headers["x-custom"] == "yes"
    assert headers["host"] == "httpbin.org"
    for hop in ("proxy-authorization", "proxy-connection", "connection", "keep-alive", "x-drop-me"):
        assert hop not in headers
    assert sb.origin.proxy_auth_seen == 0
    assert all("Proxy-Authorization" not in dict(r["headers"]) for r in sb.origin.records())


def test_origin_never_sees_proxy_headers_https(sb: Sandbox) -> None:
    c = tunnel_conn(sb, "httpbin.org", 443, "s003")
    try:
        status, _, data = https_get(c, "/headers")
    finally:
        c.close()
    assert status == 200
    assert "proxy-authorization" not in {k.lower() for k in json.loads(data)["headers"]}
    assert sb.origin.proxy_auth_seen == 0
    assert sb.origin.records()[-1]["scheme"] == "https"


def test_origin_counts_proxy_auth_when_sent_directly(sb: Sandbox) -> None:
    """Self-check of the detector the other tests rely on."""
    c = http.client.HTTPConnection("127.0.0.1", sb.origin.http_port, timeout=TIMEOUT)
    try:
        c.request("GET", "/ip", headers={"Proxy-Authorization": "Basic eDp5"})
        assert c.getresponse().read()
    finally:
        c.close()
    assert sb.origin.proxy_auth_seen == 1


# -- CONNECT -------------------------------------------------------------------------


def test_connect_to_loopback_https_origin(sb: Sandbox) -> None:
    c = tunnel_conn(sb, "127.0.0.1", sb.origin.https_port, "s010")
    try:
        for i in range(3):  # one tunnel, many requests
            status, _, data = https_get(c, f"/ip?n={i}")
            assert status == 200 and ip_of(data) == exit_ip_for("s010")
    finally:
        c.close()
    recs = sb.gateway.records()
    assert len(recs) == 1
    assert recs[0]["kind"] == "connect" and recs[0]["status"] == 200
    assert recs[0]["target"] == f"127.0.0.1:{sb.origin.https_port}"
    assert sb.origin.requests_by_ip() == {exit_ip_for("s010"): 3}


def test_connect_simulated_internet_host(sb: Sandbox) -> None:
    c = tunnel_conn(sb, "httpbin.org", 443, "s011")
    try:
        status, _, data = https_get(c, "/ip?n=1")
    finally:
        c.close()
    assert status == 200 and ip_of(data) == exit_ip_for("s011")
    assert sb.gateway.records()[0]["target"] == "httpbin.org:443"


def test_connect_verifies_with_sandbox_ca(sb: Sandbox) -> None:
    """Clients that do verify can trust ``cert_file``: each simulated host gets a signed leaf."""
    for host, port in (("httpbin.org", 443), ("localhost", sb.origin.https_port),
                       ("127.0.0.1", sb.origin.https_port)):
        ctx = ssl.create_default_context(cafile=sb.cert_file)
        c = http.client.HTTPSConnection("127.0.0.1", sb.gateway.port, timeout=TIMEOUT, context=ctx)
        c.set_tunnel(host, port, headers={"Proxy-Authorization": sb.proxy_auth("s013")})
        try:
            assert ip_of(https_get(c, "/ip")[2]) == exit_ip_for("s013")
        finally:
            c.close()


def test_non_loopback_targets_stay_on_loopback(sb: Sandbox) -> None:
    """Any 'internet' host, port or scheme is served by the sandbox origin."""
    for url in ("http://10.1.2.3:8080/ip", "http://example.com/ip", "https://httpbin.org/ip"):
        status, _, data = proxy_get(sb, url, "s014")
        assert status == 200 and ip_of(data) == exit_ip_for("s014"), url
    schemes = [r["scheme"] for r in sb.origin.records()]
    assert schemes == ["http", "http", "https"]


def test_connect_raw_bytes_and_unreachable_target(sb: Sandbox) -> None:
    # Bytes piped both ways: plain HTTP inside a tunnel to the http origin port.
    status, _, s = raw_connect(sb, f"127.0.0.1:{sb.origin.http_port}", sb.proxy_auth("s012"))
    try:
        assert status == 200
        s.sendall(b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    finally:
        s.close()
    assert exit_ip_for("s012").encode() in data
    # A closed loopback port yields 502.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    status, _, s = raw_connect(sb, f"127.0.0.1:{port}", sb.proxy_auth("s012"))
    s.close()
    assert status == 502
    assert [r["status"] for r in sb.gateway.records()] == [200, 502]


# -- keep-alive and connection/session bookkeeping --------------------------------------


def test_keepalive_requests_share_conn_id(sb: Sandbox) -> None:
    c = gw_conn(sb)
    try:
        for i in range(5):
            assert proxy_get(sb, f"http://httpbin.org/ip?n={i}", "s020", conn=c)[0] == 200
    finally:
        c.close()
    assert proxy_get(sb, "http://httpbin.org/ip", "s020")[0] == 200
    recs = sb.gateway.records()
    conn_ids = [r["conn"] for r in recs]
    assert len(set(conn_ids[:5])) == 1 and conn_ids[5] != conn_ids[0]
    assert sb.gateway.connections_by_session() == {"s020": 2}
    assert sb.gateway.connection_ids_by_session() == {"s020": set(conn_ids)}
    assert all(v == {"s020"} for v in sb.gateway.sessions_by_connection().values())


def test_second_session_on_one_connection_is_logged(sb: Sandbox) -> None:
    c = gw_conn(sb)
    try:
        a = proxy_get(sb, "http://httpbin.org/ip", "s021", conn=c)
        b = proxy_get(sb, "http://httpbin.org/ip", "s022", conn=c)
        a2 = proxy_get(sb, "http://httpbin.org/ip", "s021", conn=c)
    finally:
        c.close()
    assert (a[0], b[0], a2[0]) == (200, 200, 200)
    assert ip_of(a[2]) == ip_of(a2[2]) == exit_ip_for("s021")
    assert ip_of(b[2]) == exit_ip_for("s022")  # a fresh upstream bound to the new IP
    by_conn = sb.gateway.sessions_by_connection()
    assert list(by_conn.values()) == [{"s021", "s022"}]


def test_request_body_forwarded_and_origin_endpoints(sb: Sandbox) -> None:
    c = gw_conn(sb)
    try:
        status, _, data = proxy_get(sb, "http://httpbin.org/anything?a=1", "s030", conn=c,
                                    method="POST", body=b'{"x": 1}',
                                    headers={"Content-Type": "application/json"})
        assert status == 200
        echo = json.loads(data)
        assert echo["method"] == "POST" and echo["data"] == '{"x": 1}' and echo["args"] == {"a": "1"}
        assert proxy_get(sb, "http://httpbin.org/status/418", "s030", conn=c)[0] == 418
        assert proxy_get(sb, "http://httpbin.org/status/204", "s030", conn=c)[0] == 204
        assert proxy_get(sb, "http://httpbin.org/nope", "s030", conn=c)[0] == 404
        status, resp, _ = proxy_get(sb, "http://httpbin.org/redirect?to=/ip", "s030", conn=c)
        assert status == 302 and resp.getheader("Location") == "/ip"
        status, resp, _ = proxy_get(sb, "http://httpbin.org/cookies/set?a=1&b=two", "s030", conn=c)
        assert status == 200 and resp.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=two; Path=/"]
        _, _, data = proxy_get(sb, "http://httpbin.org/cookies", "s030", conn=c,
                               headers={"Cookie": "a=1; b=two"})
        assert json.loads(data) == {"cookies": {"a": "1", "b": "two"}}
        status, resp, data = proxy_get(sb, "http://httpbin.org/ip", "s030", conn=c, method="HEAD")
        assert status == 200 and data == b""
        assert proxy_get(sb, "http://httpbin.org/ip", "s030", conn=c)[0] == 200  # still in sync
    finally:
        c.close()
    assert len(sb.gateway.sessions_by_connection()) == 1


def test_chunked_and_close_delimited_upstream(sb: Sandbox) -> None:
    """Loopback targets other than the origin may use chunked or read-until-close bodies."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            f = conn.makefile("rb")
            for i in range(2):
                while f.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n" + f"{i + 1:x}\r\n{'!' * (i + 1)}\r\n0\r\n\r\n".encode())
        conn, _ = srv.accept()
        with conn:
            f = conn.makefile("rb")
            while f.readline() not in (b"\r\n", b""):
                pass
            conn.sendall(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nuntil-close body")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        c = gw_conn(sb)
        try:
            url = f"http://127.0.0.1:{port}/x"
            assert proxy_get(sb, url, "s031", conn=c)[2] == b"hello!"
            assert proxy_get(sb, url, "s031", conn=c)[2] == b"hello!!"
        finally:
            c.close()
        status, resp, data = proxy_get(sb, f"http://127.0.0.1:{port}/y", "s031")
        assert status == 200 and data == b"until-close body"
        t.join(TIMEOUT)
    finally:
        srv.close()


# -- concurrency measurement ---------------------------------------------------------------


def _concurrent(n: int, fn: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait(TIMEOUT)
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    return results


def test_max_in_flight_by_ip_http_and_https(sb: Sandbox) -> None:
    def http_slow(i: int) -> int:
        session = "s040" if i < 4 else "s041"
        return proxy_get(sb, f"http://httpbin.org/slow?ms=300&i={i}", session)[0]

    assert _concurrent(5, http_slow) == [200] * 5

    def https_slow(i: int) -> int:
        c = tunnel_conn(sb, "httpbin.org", 443, "s042")
        try:
            return https_get(c, "/slow?ms=300")[0]
        finally:
            c.close()

    assert _concurrent(3, https_slow) == [200] * 3
    peaks = sb.origin.max_in_flight_by_ip()
    assert peaks[exit_ip_for("s040")] == 4
    assert peaks[exit_ip_for("s041")] == 1
    assert peaks[exit_ip_for("s042")] == 3
    assert wait_for(lambda: not sb.origin.in_flight_by_ip())


# -- fault injection -------------------------------------------------------------------------


def test_ban_403_after_n_then_unban(sb: Sandbox) -> None:
    sb.gateway.ban("s050", after=2, mode="403")
    c = gw_conn(sb)
    try:
        statuses = [proxy_get(sb, "http://httpbin.org/ip", "s050", conn=c)[0] for _ in range(4)]
        assert statuses == [200, 200, 403, 403]
        assert proxy_get(sb, "http://httpbin.org/ip", "s051", conn=c)[0] == 200  # others unaffected
        sb.gateway.unban("s050")
        assert proxy_get(sb, "http://httpbin.org/ip", "s050", conn=c)[0] == 200
    finally:
        c.close()
    assert [r["status"] for r in sb.gateway.records()] == [200, 200, 403, 403, 200, 200]


def test_ban_429_retry_after(sb: Sandbox) -> None:
    sb.gateway.ban("s052", after=1, mode="429", retry_after=7)
    assert proxy_get(sb, "http://httpbin.org/ip", "s052")[0] == 200
    status, resp, _ = proxy_get(sb, "http://httpbin.org/ip", "s052")
    assert status == 429 and resp.getheader("Retry-After") == "7"


def test_ban_captcha_page(sb: Sandbox) -> None:
    sb.gateway.ban("s053", after=0, mode="captcha")
    status, resp, data = proxy_get(sb, "http://httpbin.org/ip", "s053")
    assert status == 200 and b"CAPTCHA" in data
    assert (resp.getheader("Content-Type") or "").startswith("text/html")
    # Inside an https tunnel the origin serves the captcha for the banned exit IP.
    c = tunnel_conn(sb, "httpbin.org", 443, "s053")
    try:
        status, _, data = https_get(c, "/ip")
    finally:
        c.close()
    assert status == 200 and b"CAPTCHA" in data


def test_ban_applies_to_connect_and_inside_tunnels(sb: Sandbox) -> None:
    sb.gateway.ban("s054", after=2, mode="429", retry_after=3)
    c = tunnel_conn(sb, "httpbin.org", 443, "s054")
    try:
        # Requests inside the tunnel count towards the ban (enforced by the origin).
        assert [https_get(c, "/ip")[0] for _ in range(3)] == [200, 200, 429]
    finally:
        c.close()
    status, head, s = raw_connect(sb, "httpbin.org:443", sb.proxy_auth("s054"))
    s.close()
    assert status == 429 and "Retry-After: 3" in head
    sb.gateway.ban("s055", after=0, mode="403")
    status, _, s = raw_connect(sb, "httpbin.org:443", sb.proxy_auth("s055"))
    s.close()
    assert status == 403
    assert sb.gateway.bans()["s054"]["tripped"] is True


def test_ban_spec_parsing() -> None:
    rule = parse_ban("s003:5:429:12")
    assert (rule.session, rule.after, rule.mode, rule.retry_after) == ("s003", 5, "429", 12)
    assert parse_ban("x:0:captcha").mode == "captcha"
    for bad in ("s1:2", "s1:x:403", "s1:1:teapot", "s-1:1:403"):
        with pytest.raises(ValueError):
            parse_ban(bad)
    with pytest.raises(ValueError):
        BanRule("s1", -1, "403")


def test_latency_injection_and_reset(sb: Sandbox) -> None:
    sb.gateway.set_latency(150, 0)
    t0 = time.monotonic()
    assert proxy_get(sb, "http://httpbin.org/ip", "s060")[0] == 200
    assert time.monotonic() - t0 >= 0.14
    sb.gateway.ban("s060", after=0)
    sb.reset()  # restores start-up faults: no latency, no bans
    assert sb.gateway.bans() == {} and sb.gateway.records() == []
    t0 = time.monotonic()
    assert proxy_get(sb, "http://httpbin.org/ip", "s060")[0] == 200
    assert time.monotonic() - t0 < 0.14


def test_startup_config_and_log_file(tmp_path: Path) -> None:
    log = tmp_path / "gw.jsonl"
    with Sandbox(log_path=str(log), bans=[("s070", 1, "403")], origin_latency_ms=1) as box:
        assert proxy_get(box, "http://httpbin.org/ip", "s070")[0] == 200
        assert proxy_get(box, "http://httpbin.org/ip", "s070")[0] == 403
        # Flushed per line: readable while the sandbox is still running.
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert [x["status"] for x in lines] == [200, 403]
        assert set(lines[0]) >= {"ts", "conn", "session", "user", "method", "target", "kind", "status"}
        assert lines[0]["kind"] == "http" and lines[0]["session"] == "s070"


def test_non_absolute_target_rejected(sb: Sandbox) -> None:
    status, _, _ = proxy_get(sb, "/ip", "s001")
    assert status == 400


# -- lifecycle -------------------------------------------------------------------------------------


def test_start_fast_and_stop_clean() -> None:
    before = {t.ident for t in threading.enumerate()}
    t0 = time.monotonic()
    box = Sandbox().start()
    assert time.monotonic() - t0 < 1.0
    ports = (box.gateway.port, box.origin.http_port, box.origin.https_port)
    c = gw_conn(box)  # leave a keep-alive connection open across stop()
    c.request("GET", "http://httpbin.org/ip", headers={"Proxy-Authorization": box.proxy_auth("s1")})
    assert c.getresponse().read()
    box.stop()
    box.stop()  # idempotent
    c.close()
    assert {t.ident for t in threading.enumerate()} <= before
    for port in ports:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_port_in_use_and_non_loopback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SandboxError, match="already in use"):
            Sandbox(gateway_port=busy.getsockname()[1]).start()
    with pytest.raises(SandboxError, match="loopback"):
        Sandbox(host="0.0.0.0")


# -- CLI ----------------------------------------------------------------------------------------------


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "hexscrape.sandbox", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_runs_prints_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = _cli("--gateway-port", "0", "--http-port", "0", "--https-port", "0",
                "--ready-file", str(ready), "--ban", "s9:0:429")
    try:
        assert wait_for(lambda: ready.exists() or proc.poll() is not None), "no ready file"
        assert proc.poll() is None
        info = json.loads(ready.read_text())
        c = http.client.HTTPConnection("127.0.0.1", info["gateway_port"], timeout=TIMEOUT)
        raw = f"{info['user']}-session-s9:{info['password']}".encode()
        c.request("GET", "http://httpbin.org/ip",
                  headers={"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()})
        assert c.getresponse().status == 429
        c.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert f"export HEX_GATEWAY={info['gateway_url']}" in out
    assert "export HEX_USER=sandbox" in out and "export HEX_PASS=" in out
    assert info["http_origin"] in out and info["https_origin"] in out
    assert "Traceback" not in err
    assert not ready.exists()


def test_cli_refuses_non_loopback_host() -> None:
    proc = _cli("--host", "0.0.0.0", "--gateway-port", "0")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1 and "loopback" in err


def test_cli_port_in_use_one_line_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _cli("--gateway-port", str(busy.getsockname()[1]), "--http-port", "0", "--https-port", "0")
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1 and "already in use" in err


def test_cli_help_documents_options() -> None:
    proc = _cli("--help")
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    for opt in ("--host", "--gateway-port", "--http-port", "--https-port", "--user", "--password",
                "--log", "--latency-ms", "--jitter-ms", "--reject-password", "--ban", "--ready-file",
                "--quiet"):
        assert opt in out
