"""Session-slice leases with real `scrapy crawl ip` processes and a real Redis."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from conftest import REPO, crawl_cmd, crawler_env, read_jsonl
from hexscrape.exitcodes import EXIT_CONFIG

FAST = {
    "IDLE_CLOSE_SECONDS": "0.5",
    "FRONTIER_HEARTBEAT_TTL": "2",
    "FRONTIER_REAP_INTERVAL": "0.5",
    "FRONTIER_POLL_MAX": "0.2",
    "SESSION_LEASE_TTL": "1",
}


def start(tmp_path: Path, name: str, env: dict, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    out = tmp_path / f"{name}.jsonl"
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        crawl_cmd("-O", str(out), *args), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    return proc, out, log


def wait_for(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def seed(redis_url: str, urls: list[str]) -> None:
    r = redis.Redis.from_url(redis_url)
    r.rpush("ip:start_urls", *urls)  # consumed oldest first
    r.close()


def test_overlapping_slice_refuses_to_start_naming_both_workers(sandbox, redis_url, tmp_path):
    seed(redis_url, [f"{sandbox.http_origin}/slow?ms=200&n={i}" for i in range(30)])
    env_a = crawler_env(sandbox, REDIS_URL=redis_url, WORKER_SLOT=0, SESSION_RANGE_START=0,
                        SESSION_RANGE_END=10, **FAST)
    a, _, log_a = start(tmp_path, "a", env_a, "-s", "CONCURRENT_REQUESTS=2")
    try:
        wait_for(lambda: sandbox.gateway.records(), what="worker A crawling")
        env_b = crawler_env(sandbox, REDIS_URL=redis_url, WORKER_SLOT=1, SESSION_RANGE_START=5,
                            SESSION_RANGE_END=15, **FAST)
        t0 = time.monotonic()
        b = subprocess.run(crawl_cmd(), cwd=REPO, env=env_b, capture_output=True, text=True, timeout=60)
        assert b.returncode == EXIT_CONFIG
        assert time.monotonic() - t0 < 15  # waits one lease TTL, not forever
        err = [l for l in b.stderr.splitlines() if l.startswith("hexscrape: error:")]
        assert len(err) == 1, b.stderr[-2000:]
        host = socket.gethostname()
        assert f"held by live worker {host}:{a.pid} (slot 0)" in err[0]
        assert "(slot 1)" in err[0] and "refuses to start" in err[0]
        assert "Traceback" not in b.stderr
        used = {r["session"] for r in sandbox.gateway.records()}
        assert used <= {f"s{i:03d}" for i in range(10)}
    finally:
        a.send_signal(signal.SIGTERM)
        a.wait(30)
    assert a.returncode == 0, log_a.read_text()[-2000:]


def test_auto_slices_are_disjoint_and_released_on_exit(sandbox, redis_url, tmp_path):
    urls = [f"{sandbox.http_origin}/slow?ms=30&n={i}" for i in range(80)]
    seed(redis_url, urls)
    procs = []
    for name in ("w1", "w2"):
        env = crawler_env(sandbox, REDIS_URL=redis_url, WORKER_SLOT=name, SESSION_RANGE="auto",
                          SESSION_SLICE_SIZE=4, **FAST)
        procs.append(start(tmp_path, name, env, "-s", "CONCURRENT_REQUESTS=4"))
    for proc, _, log in procs:
        proc.wait(60)
        assert proc.returncode == 0, log.read_text()[-2000:]
    by_worker = {}
    for _, out, _ in procs:
        for item in read_jsonl(out):
            by_worker.setdefault(item["worker"], set()).add(item["session"])
    assert set(by_worker) == {"w1", "w2"}
    s1, s2 = by_worker["w1"], by_worker["w2"]
    assert not s1 & s2
    blocks = [{f"s{i:03d}" for i in range(0, 4)}, {f"s{i:03d}" for i in range(4, 8)}]
    assert sorted([s1, s2], key=min) == blocks
    crawled = [r["target"] for r in sandbox.gateway.records()]
    assert sorted(crawled) == sorted(urls)
    r = redis.Redis.from_url(redis_url)
    assert r.keys("ip:session_lease:*") == [] and r.keys("ip:slot_lease:*") == []


def test_sigkilled_workers_slice_is_free_after_the_ttl(sandbox, redis_url, tmp_path):
    seed(redis_url, [f"{sandbox.http_origin}/slow?ms=200&n={i}" for i in range(20)])
    env = crawler_env(sandbox, REDIS_URL=redis_url, SESSION_RANGE_START=0, SESSION_RANGE_END=3, **FAST)
    a, _, _ = start(tmp_path, "a", env, "-s", "CONCURRENT_REQUESTS=2")
    wait_for(lambda: sandbox.gateway.records(), what="worker A crawling")
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    r = redis.Redis.from_url(redis_url)
    assert r.get("ip:session_lease:s000") is not None  # still held: nobody released it
    wait_for(lambda: r.get("ip:session_lease:s000") is None, timeout=5, what="lease expiry")
    b, out_b, log_b = start(tmp_path, "b", env, "-s", "CONCURRENT_REQUESTS=4")
    b.wait(60)
    assert b.returncode == 0, log_b.read_text()[-2000:]
    targets = {r["target"] for r in sandbox.gateway.records()}
    assert len(targets) == 20  # the killed worker's URLs were crawled by B
