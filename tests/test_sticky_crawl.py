"""`scrapy crawl ip` through the sandbox gateway: real processes, real sockets."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from urllib.parse import quote

from conftest import PASSWORD, REPO, crawl_cmd, crawler_env, read_jsonl, run_crawl


def url_file(tmp_path, urls, name="urls.txt"):
    p = tmp_path / name
    p.write_text("\n".join(urls) + "\n")
    return str(p)


def ip_urls(base, n, path="/ip"):
    return [f"{base}{path}?n={i}" for i in range(n)]


def assert_no_secret(*texts):
    for text in texts:
        assert PASSWORD not in text
        assert quote(PASSWORD, safe="") not in text


def test_round_robin_within_slice_and_items(sandbox, crawl, tmp_path):
    from hexscrape.sandbox import exit_ip_for

    urls = ip_urls(sandbox.http_origin, 20)
    env = crawler_env(sandbox, SESSION_RANGE_START=5, SESSION_RANGE_END=9, WORKER_SLOT=3)
    # The in-process scheduler drops repeated URLs, as Scrapy's does.
    res = crawl("-a", f"urls={url_file(tmp_path, urls + urls[:3])}", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stats["dupefilter/filtered"] == 3

    sessions = [r["session"] for r in sandbox.gateway.records() if r["kind"] == "http"]
    assert Counter(sessions) == {"s005": 5, "s006": 5, "s007": 5, "s008": 5}

    assert sorted(i["url"] for i in res.items) == sorted(urls)
    for item in res.items:
        assert item["status"] == 200
        assert item["exit_ip"] == exit_ip_for(item["session"])
        assert item["worker"] == "3"
        assert item["latency_ms"] >= 0
    assert res.stats["hexscrape/requests/ok"] == 20
    assert res.stats["hexscrape/session/s005/requests"] == 5
    assert res.stats["finish_reason"] == "finished"


def test_each_connection_and_tunnel_carries_one_session(sandbox, crawl, tmp_path):
    urls = ip_urls(sandbox.http_origin, 60) + ip_urls(sandbox.https_origin, 60)
    env = crawler_env(sandbox, SESSION_RANGE_START=0, SESSION_RANGE_END=4)
    res = crawl("-a", f"urls={url_file(tmp_path, urls)}", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.items) == 120 and all(i["status"] == 200 for i in res.items)

    records = sandbox.gateway.records()
    by_conn: dict = {}
    for r in records:
        by_conn.setdefault(r["conn"], set()).add(r["session"])
    assert by_conn and all(len(s) == 1 for s in by_conn.values()), by_conn
    kinds = Counter(r["kind"] for r in records)
    assert kinds["http"] == 60
    # keep-alive: http connections are reused within a session
    http_conns = {r["conn"] for r in records if r["kind"] == "http"}
    assert len(http_conns) < 60
    # https: tunnels are reused too (fewer CONNECTs than https requests)
    assert 0 < kinds["connect"] < 60
    assert sandbox.origin.proxy_auth_seen == 0


def test_per_session_in_flight_cap_is_enforced(sandbox, crawl, tmp_path):
    from hexscrape.sandbox import exit_ip_for

    urls = [f"{sandbox.http_origin}/slow?ms=150&n={i}" for i in range(12)]
    urls += [f"{sandbox.https_origin}/slow?ms=150&n={i}" for i in range(12)]
    env = crawler_env(sandbox, SESSION_RANGE_START=0, SESSION_RANGE_END=1, SESSION_CONCURRENCY=3)
    res = crawl("-a", f"urls={url_file(tmp_path, urls)}", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.items) == 24
    peak = sandbox.origin.max_in_flight_by_ip()[exit_ip_for("s000")]
    assert peak == 3  # never more than the cap, and the cap is actually used


def test_password_never_in_logs_stats_or_items(sandbox, crawl, tmp_path):
    urls = ip_urls(sandbox.http_origin, 5) + ip_urls(sandbox.https_origin, 5)
    env = crawler_env(sandbox)
    res = crawl("-a", f"urls={url_file(tmp_path, urls)}", "-s", "LOG_LEVEL=DEBUG", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.items) == 10
    items_text = (tmp_path / "items.jsonl").read_text()
    stats_text = (tmp_path / "stats.json").read_text()
    assert_no_secret(res.stdout, res.stderr, items_text, stats_text)
    assert sandbox.origin.proxy_auth_seen == 0


def test_password_given_as_setting_is_not_logged(sandbox, crawl, tmp_path):
    env = crawler_env(sandbox, HEX_PASS=None)
    res = crawl("-a", f"urls={url_file(tmp_path, ip_urls(sandbox.http_origin, 3))}",
                "-s", f"HEX_PASS={PASSWORD}", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.items) == 3
    assert_no_secret(res.stdout, res.stderr)


def test_wrong_password_fails_fast_with_clear_407_error(sandbox, crawl, tmp_path):
    urls = ip_urls(sandbox.http_origin, 30) + ip_urls(sandbox.https_origin, 30)
    env = crawler_env(sandbox, HEX_PASS="wrong", SESSION_RANGE_START=0, SESSION_RANGE_END=3)
    res = crawl("-a", f"urls={url_file(tmp_path, urls)}", env=env, timeout=60)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "407" in res.stderr and "check HEX_USER/HEX_PASS" in res.stderr
    assert "proxy credentials rejected" in res.stderr
    assert res.stats["finish_reason"] == "proxy_auth_failed"
    assert not any(i["status"] == 200 for i in res.items)
    assert sandbox.origin.request_count == 0
    # it stops instead of grinding through every URL
    assert len(sandbox.gateway.records()) < 60


def test_invalid_urls_are_skipped_and_counted(sandbox, crawl, tmp_path):
    good = ip_urls(sandbox.http_origin, 3)
    lines = ["# comment", "", good[0], "not a url", "ftp://x/y", good[1], "http://", "http://h:99999/", good[2]]
    res = crawl("-a", f"urls={url_file(tmp_path, lines)}", env=crawler_env(sandbox))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(i["url"] for i in res.items) == sorted(good)
    assert res.stats["hexscrape/urls/invalid"] == 4
    assert "skipped invalid URL on line 4" in res.stderr


def test_default_urls_reach_sandbox_via_gateway(sandbox, crawl):
    res = crawl("-a", "count=5", env=crawler_env(sandbox))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(i["url"] for i in res.items) == [f"https://httpbin.org/ip?n={i}" for i in range(5)]
    assert all(i["exit_ip"] for i in res.items)


def test_bad_settings_exit_2_with_one_line(sandbox):
    env = crawler_env(sandbox, SESSION_RANGE_END=99)
    proc = subprocess.run(
        [sys.executable, "-m", "scrapy", "crawl", "ip", "-a", "count=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert errors == ["hexscrape: error: SESSION_RANGE_END=99 is outside the pool (SESSION_POOL_SIZE=40)"]
    assert "Traceback" not in proc.stderr
    assert sandbox.gateway.records() == []


def test_pinned_and_opted_out_requests(sandbox, tmp_path):
    from hexscrape.sandbox import exit_ip_for

    out = tmp_path / "pin.jsonl"
    env = crawler_env(sandbox, SESSION_RANGE_START=0, SESSION_RANGE_END=4)
    proc = subprocess.run(
        [sys.executable, "-m", "scrapy", "runspider", str(REPO / "tests/spiders/pin_spider.py"),
         "-O", str(out), "-s", f"TEST_ORIGIN={sandbox.http_origin}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    items = {i["url"].rsplit("?", 1)[1]: i for i in read_jsonl(out)}
    assert items["pinned"]["session"] == "s002"
    assert items["pinned"]["origin"] == exit_ip_for("s002")
    assert items["direct"]["session"] is False
    assert items["direct"]["origin"] == "127.0.0.1"
    assert items["normal"]["session"] in {"s000", "s001", "s002", "s003"}
    assert "outside" not in items  # s039 is not in this slice: dropped, not leaked
    assert "outside this worker's slice" in proc.stderr
    targets = [r["target"] for r in sandbox.gateway.records()]
    assert not any("direct" in t for t in targets)
    assert not any("outside" in t for t in targets)


def test_gateway_down_gives_one_clear_error_and_loses_nothing(sandbox, redis_url, tmp_path):
    import redis as redis_lib

    from hexscrape.redisserver import free_port

    urls = ip_urls(sandbox.http_origin, 20)
    r = redis_lib.Redis.from_url(redis_url)
    r.rpush("ip:start_urls", *urls)
    fast = {"IDLE_CLOSE_SECONDS": 0.5, "FRONTIER_POLL_MAX": 0.2, "SESSION_LEASE_TTL": 1}
    dead = crawler_env(sandbox, HEX_GATEWAY=f"http://127.0.0.1:{free_port()}", REDIS_URL=redis_url,
                       GATEWAY_DOWN_SECONDS=2, SESSION_RANGE_START=0, SESSION_RANGE_END=4, **fast)
    t0 = time.monotonic()
    proc = subprocess.run(crawl_cmd("-O", str(tmp_path / "dead.jsonl")), cwd=REPO, env=dead,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    errors = [l for l in proc.stderr.splitlines() if "] ERROR:" in l]
    assert len(errors) == 1 and "unreachable for 2 s: stopping the crawl" in errors[0], errors
    assert proc.stderr.count("WARNING: proxy gateway") == 1  # logged once, not per request
    # nothing was consumed: every URL is still queued in the frontier
    queued = r.zcard("ip:requests") + r.llen("ip:start_urls")
    leased = sum(r.hlen(k) for k in r.keys("ip:leases:*"))
    assert queued == 20 and leased == 0

    res = run_crawl(tmp_path, env=crawler_env(sandbox, REDIS_URL=redis_url, **fast), output="live.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(i["url"] for i in res.items) == sorted(urls)


def test_a_big_url_file_is_read_lazily(sandbox, crawl, tmp_path):
    # Scrapy would queue the whole file while the downloader is busy; the ip
    # spider keeps at most HEXSCRAPE_START_BACKLOG requests queued.
    urls = ip_urls(sandbox.http_origin, 400)
    env = crawler_env(sandbox, SESSION_POOL_SIZE=4)
    res = crawl("-a", f"urls={url_file(tmp_path, urls)}", "-s", "HEXSCRAPE_START_BACKLOG=30",
                "-s", "CONCURRENT_REQUESTS=4", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(i["url"] for i in res.items) == sorted(urls)
    assert 0 < res.stats["hexscrape/scheduler/peak_queued"] <= 30
