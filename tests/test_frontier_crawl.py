"""Real ``scrapy crawl ip`` processes sharing one Redis frontier through the sandbox.

Every assertion is on something observable: the origin's request log (which
URL was fetched how often), exit codes, items, final stats and Redis contents.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from conftest import PASSWORD, REPO, USER, crawl_cmd, crawler_env, read_jsonl
from hexscrape.exitcodes import EXIT_ABNORMAL, EXIT_OK, EXIT_REDIS
from hexscrape.frontier import Frontier

PREFIX = "ip"
CONCURRENCY = 8  # per worker: bounds what a SIGKILL can duplicate
POOL = 40

# Short timings so the tests stay fast; the defaults are 5/10/3 s.
FAST = {
    "IDLE_CLOSE_SECONDS": "1",
    "FRONTIER_HEARTBEAT_TTL": "2",
    "FRONTIER_REAP_INTERVAL": "0.5",
    "FRONTIER_POLL_MAX": "0.25",
    "HEXSCRAPE_STATS_INTERVAL": "0",
}


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    items_path: Path
    stats_path: Path
    log_path: Path

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"worker {self.name} did not finish:\n{self.log[-3000:]}") from None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def items(self) -> list[dict]:
        return read_jsonl(self.items_path) if self.items_path.exists() else []

    @property
    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(name: str, env: dict[str, str], *args: str) -> Worker:
        items = tmp_path / f"items-{name}.jsonl"
        stats = tmp_path / f"stats-{name}.json"
        log = tmp_path / f"log-{name}.txt"
        cmd = crawl_cmd("-O", str(items), "-s", f"HEXSCRAPE_STATS_DUMP={stats}", *args)
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT)
        w = Worker(name, proc, items, stats, log)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


def worker_env(sandbox, redis_url: str, slot: int, slots: int = 4, **extra) -> dict[str, str]:
    """A supervised worker: its own slot and a disjoint slice of the session pool."""
    size = POOL // slots
    return crawler_env(
        sandbox, REDIS_URL=redis_url, WORKER_SLOT=slot, SESSION_POOL_SIZE=POOL,
        SESSION_RANGE_START=slot * size, SESSION_RANGE_END=(slot + 1) * size,
        **{**FAST, **{k: str(v) for k, v in extra.items()}},
    )


def settings(*pairs: str) -> list[str]:
    out = ["-s", f"CONCURRENT_REQUESTS={CONCURRENCY}"]
    for p in pairs:
        out += ["-s", p]
    return out


def ip_urls(base: str, n: int, start: int = 0) -> list[str]:
    return [f"{base}/ip?n={i}" for i in range(start, start + n)]


def seed(redis_url: str, urls: list[str], tmp_path: Path) -> str:
    """Seed with the CLI (in-process); returns its summary line."""
    import contextlib
    import io

    from hexscrape.seed import main

    f = tmp_path / f"seed-{time.monotonic_ns()}.txt"
    f.write_text("\n".join(urls) + "\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(f), "--redis-url", redis_url, "--prefix", PREFIX]) == 0
    return out.getvalue().strip()


def fetched(sandbox) -> Counter:
    """How often the origin served each path (``/ip?n=3`` ...)."""
    return Counter(r["path"] for r in sandbox.origin.records())


def paths(urls: list[str]) -> list[str]:
    return [u[u.index("/", 8):] for u in urls]


def wait_for(cond, timeout: float = 30.0, what: str = "condition", step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def assert_frontier_done(client: redis.Redis) -> None:
    st = Frontier(client, PREFIX, "test").status()
    assert st.empty, st
    assert not client.keys(f"{PREFIX}:leases:*")
    assert not client.smembers(f"{PREFIX}:workers")


def fmt_logs(*ws: Worker) -> str:
    return "\n".join(f"--- {w.name}:\n{w.log[-2500:]}" for w in ws)


@pytest.fixture
def rclient(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


# -- sharing ---------------------------------------------------------------------


def test_three_workers_crawl_every_url_exactly_once(sandbox, redis_url, rclient, workers,
                                                    tmp_path):
    sandbox.gateway.set_latency(40, 40)
    ws = [workers(f"w{i}", worker_env(sandbox, redis_url, i, IDLE_CLOSE_SECONDS=3),
                  *settings()) for i in range(3)]
    # Workers that start on an empty frontier pick up work seeded later.
    wait_for(lambda: all(rclient.exists(f"{PREFIX}:worker:slot-{i}") for i in range(3)),
             what="workers to register")
    urls = ip_urls(sandbox.http_origin, 80) + ip_urls(sandbox.https_origin, 80, start=80)
    assert seed(redis_url, urls + urls[:10], tmp_path) == "160 new, 10 duplicate, 0 invalid"
    # scrapy-redis style pushes: a plain URL twice, a JSON object, one already seeded.
    extra = f"{sandbox.http_origin}/ip?n=extra"
    rclient.lpush(f"{PREFIX}:start_urls", extra, extra, urls[0],
                  json.dumps({"url": f"{sandbox.http_origin}/ip?n=json", "meta": {"tag": 1}}))

    codes = [w.wait() for w in ws]
    assert codes == [EXIT_OK] * 3, fmt_logs(*ws)
    expected = paths(urls) + ["/ip?n=extra", "/ip?n=json"]
    assert fetched(sandbox) == Counter(expected)
    items = [i for w in ws for i in w.items]
    json_url = f"{sandbox.http_origin}/ip?n=json"
    assert sorted(i["url"] for i in items) == sorted(urls + [extra, json_url])
    assert sum(1 for w in ws if w.items) >= 2, "the work was not shared"
    assert {i["worker"] for i in items} <= {"0", "1", "2"}
    stats = [w.stats for w in ws]
    assert all(s["finish_reason"] == "finished" for s in stats)
    assert sum(s.get("hexscrape/frontier/acked", 0) for s in stats) == 162
    assert sum(s.get("hexscrape/frontier/duplicate", 0) for s in stats) == 2
    assert_frontier_done(rclient)
    assert rclient.scard(f"{PREFIX}:dupefilter") == 162  # shared state survives


def test_the_spider_seeds_its_arguments_and_a_duplicate_run_crawls_nothing(
        sandbox, redis_url, rclient, workers, tmp_path):
    url_file = tmp_path / "urls.txt"
    url_file.write_text("\n".join(ip_urls(sandbox.http_origin, 30)) + "\nnot a url\n")
    first = workers("a", worker_env(sandbox, redis_url, 0), "-a", f"urls={url_file}",
                    *settings())
    assert first.wait() == EXIT_OK, first.log[-3000:]
    assert fetched(sandbox) == Counter(paths(ip_urls(sandbox.http_origin, 30)))
    assert first.stats["hexscrape/frontier/seeded/new"] == 30
    assert first.stats["hexscrape/urls/invalid"] == 1

    again = workers("b", worker_env(sandbox, redis_url, 1), "-a", f"urls={url_file}",
                    *settings())
    assert again.wait() == EXIT_OK, again.log[-3000:]
    assert again.stats["hexscrape/frontier/seeded/duplicate"] == 30
    assert again.items == [] and sum(fetched(sandbox).values()) == 30


# -- crashes and signals ----------------------------------------------------------------


def _crawl_with_a_crash(sandbox, redis_url, rclient, workers, tmp_path, restart: bool):
    sandbox.gateway.set_latency(150, 100)
    urls = ip_urls(sandbox.http_origin, 120)
    seed(redis_url, urls, tmp_path)
    victim = workers("victim", worker_env(sandbox, redis_url, 0), *settings())
    other = workers("other", worker_env(sandbox, redis_url, 1), *settings())
    wait_for(lambda: sum(fetched(sandbox).values()) >= 30, what="progress")
    victim.proc.kill()  # SIGKILL: no chance to ack or release anything
    victim.proc.wait(10)
    killed_at = time.monotonic()
    assert rclient.hlen(f"{PREFIX}:leases:slot-0") > 0  # it died holding leases
    ws = [other]
    if restart:
        # What the primary does before respawning a slot.
        from hexscrape.slicelease import release_slot

        release_slot(rclient, PREFIX, "0", POOL)
        ws.append(workers("respawn", worker_env(sandbox, redis_url, 0), *settings()))
    else:
        wait_for(lambda: not rclient.exists(f"{PREFIX}:leases:slot-0"), timeout=15,
                 what="the dead worker's leases to be reclaimed")
        reclaim_delay = time.monotonic() - killed_at
        assert reclaim_delay < 2 + 0.5 + 3, reclaim_delay  # TTL + reap interval + slack
    codes = [w.wait() for w in ws]
    assert codes == [EXIT_OK] * len(ws), fmt_logs(victim, *ws)

    counts = fetched(sandbox)
    assert set(counts) == set(paths(urls)), "a URL was lost"
    duplicates = sum(n - 1 for n in counts.values())
    # At most its in-flight ones, plus the few that finished within the last
    # FLUSH_LINGER (10 ms) whose acks were still being batched.
    assert duplicates <= CONCURRENCY + 3, (duplicates, counts)
    reclaimed = sum(w.stats.get("hexscrape/frontier/reclaimed", 0) for w in ws)
    assert reclaimed >= 1
    assert_frontier_done(rclient)
    return ws


def test_sigkilled_worker_restarted_in_its_slot_reclaims_at_once(sandbox, redis_url, rclient,
                                                                 workers, tmp_path):
    other, respawn = _crawl_with_a_crash(sandbox, redis_url, rclient, workers, tmp_path,
                                         restart=True)
    assert respawn.stats.get("hexscrape/frontier/reclaimed", 0) >= 1
    assert "restarted: put" in respawn.log


def test_sigkilled_workers_leases_are_reaped_by_a_live_worker(sandbox, redis_url, rclient,
                                                              workers, tmp_path):
    (other,) = _crawl_with_a_crash(sandbox, redis_url, rclient, workers, tmp_path,
                                   restart=False)
    assert other.stats.get("hexscrape/frontier/reclaimed", 0) >= 1
    assert "worker slot-0 is gone" in other.log


def test_sigterm_drains_and_the_others_finish_the_rest(sandbox, redis_url, rclient, workers,
                                                       tmp_path):
    sandbox.gateway.set_latency(150, 100)
    urls = ip_urls(sandbox.http_origin, 100)
    seed(redis_url, urls, tmp_path)
    leaving = workers("leaving", worker_env(sandbox, redis_url, 0), *settings())
    staying = workers("staying", worker_env(sandbox, redis_url, 1), *settings())
    wait_for(lambda: sum(fetched(sandbox).values()) >= 20, what="progress")
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.wait() == EXIT_OK, leaving.log[-3000:]
    assert leaving.stats["finish_reason"] == "shutdown"
    assert not rclient.exists(f"{PREFIX}:leases:slot-0")  # released or acked, nothing held
    assert staying.wait() == EXIT_OK, staying.log[-3000:]
    assert fetched(sandbox) == Counter(paths(urls))  # nothing lost, nothing twice
    assert len(leaving.items) + len(staying.items) == 100
    assert_frontier_done(rclient)


def test_a_worker_that_stops_first_leaves_the_queue_to_the_others(sandbox, redis_url,
                                                                  rclient, workers, tmp_path):
    urls = ip_urls(sandbox.http_origin, 60)
    seed(redis_url, urls, tmp_path)
    early = workers("early", worker_env(sandbox, redis_url, 0), *settings(
        "CLOSESPIDER_ITEMCOUNT=10"))
    assert early.wait() == EXIT_ABNORMAL, early.log[-3000:]
    assert early.stats["finish_reason"] == "closespider_itemcount"
    st = Frontier(rclient, PREFIX, "test").status()
    done = len(early.items)
    assert st.queued == 60 - done and st.leased == 0  # unstarted leases went back
    assert rclient.scard(f"{PREFIX}:dupefilter") == 60
    rest = workers("rest", worker_env(sandbox, redis_url, 1), *settings())
    assert rest.wait() == EXIT_OK, rest.log[-3000:]
    assert fetched(sandbox) == Counter(paths(urls))
    assert len(rest.items) == 60 - done


def test_a_slow_url_stalls_nothing_and_keeps_every_worker_open(sandbox, redis_url, rclient,
                                                                workers, tmp_path):
    from datetime import datetime

    slow_s = 5.0
    sandbox.gateway.set_latency(30, 30)
    slow = f"{sandbox.http_origin}/slow?ms={int(slow_s * 1000)}"
    fast = ip_urls(sandbox.http_origin, 80)
    seed(redis_url, [slow] + fast, tmp_path)
    first = workers("first", worker_env(sandbox, redis_url, 0), *settings())
    wait_for(lambda: any(r["path"].startswith("/slow") for r in sandbox.origin.records()),
             what="the slow request")
    (slow_start,) = [r["ts"] for r in sandbox.origin.records() if r["path"].startswith("/slow")]
    second = workers("second", worker_env(sandbox, redis_url, 1), *settings())
    wait_for(lambda: rclient.exists(f"{PREFIX}:worker:slot-1"), what="the second worker")
    assert time.time() < slow_start + slow_s, "too slow to start: the test proves nothing"
    assert [w.wait() for w in (first, second)] == [EXIT_OK, EXIT_OK], fmt_logs(first, second)

    # While its slow request was in flight, the first worker kept leasing and
    # crawled far more than one batch (16 leases) of fast URLs itself.
    mine = {f"s{j:03d}" for j in range(10)}
    done_meanwhile = [r for r in sandbox.gateway.records()
                      if r["kind"] == "http" and "/ip?n=" in r["target"]
                      and r["session"] in mine and r["ts"] < slow_start + slow_s]
    assert len(done_meanwhile) > 2 * 2 * CONCURRENCY
    # No worker closed while the slow lease was outstanding.
    for w in (first, second):
        assert datetime.fromisoformat(w.stats["finish_time"]).timestamp() >= slow_start + slow_s
    assert fetched(sandbox) == Counter(paths([slow] + fast))
    assert_frontier_done(rclient)


# -- retries, redirects, secrets ------------------------------------------------------------


def test_retries_and_redirects_go_back_through_the_frontier_without_secrets(
        sandbox, redis_url, rclient, workers, tmp_path):
    origin = sandbox.http_origin
    failing = [f"{origin}/status/500?n={i}" for i in range(6)]
    redirects = [f"{origin}/redirect?to={quote(f'{origin}/ip?r={i}', safe='')}" for i in range(6)]
    plain = ip_urls(origin, 20)
    seed(redis_url, failing + plain, tmp_path)
    # The ip spider handles every status itself; these opt back in to redirects.
    rclient.lpush(f"{PREFIX}:start_urls", *(
        json.dumps({"url": u, "meta": {"handle_httpstatus_all": False}}) for u in redirects))

    seen: list[str] = []
    mon_client = redis.Redis.from_url(redis_url)
    stop = threading.Event()

    def monitor() -> None:
        with mon_client.monitor() as m:
            for cmd in m.listen():
                seen.append(cmd["command"])
                if stop.is_set():
                    return

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    ws = [workers(f"w{i}", worker_env(sandbox, redis_url, i), *settings("RETRY_TIMES=2"))
          for i in range(2)]
    assert [w.wait() for w in ws] == [EXIT_OK, EXIT_OK], fmt_logs(*ws)
    stop.set()
    rclient.ping()
    t.join(5)

    counts = fetched(sandbox)
    for u in failing:
        assert counts[u[len(origin):]] == 3  # first try + RETRY_TIMES
    for u in redirects + plain:
        assert counts[u[len(origin):]] == 1
    for i in range(6):
        assert counts[f"/ip?r={i}"] == 1
    stats = [w.stats for w in ws]
    assert sum(s.get("hexscrape/frontier/transferred", 0) for s in stats) == 6 * 2 + 6
    assert not any(s.get("hexscrape/session/pinned_outside_slice") for s in stats)
    # Each request went out with a session of the worker that sent it.
    slices = {str(i): {f"s{j:03d}" for j in range(i * 10, i * 10 + 10)} for i in range(2)}
    for w in ws:
        for item in w.items:
            assert item["session"] in slices[item["worker"]]

    traffic = "\n".join(seen)
    assert "EVALSHA" in traffic and "/status/500" in traffic  # the monitor saw the entries
    creds = base64.b64encode(f"{USER}-session-s001:{PASSWORD}".encode()).decode()[:20]
    for secret in (PASSWORD, quote(PASSWORD, safe=""), "Proxy-Authorization", creds,
                   "_auth_proxy", "hexscrape_session", "cookiejar", "_hexscrape"):
        assert secret not in traffic, secret
    assert_frontier_done(rclient)


# -- Redis trouble -----------------------------------------------------------------------------


def test_redis_killed_and_restarted_mid_crawl(sandbox, workers, tmp_path):
    from hexscrape.redisserver import RedisServer

    server = RedisServer(data_dir=tmp_path / "redis", persistent=True).start()
    try:
        url = server.url
        sandbox.gateway.set_latency(100, 100)
        urls = ip_urls(sandbox.http_origin, 120)
        seed(url, urls, tmp_path)
        ws = [workers(f"w{i}", worker_env(sandbox, url, i), *settings()) for i in range(2)]
        wait_for(lambda: sum(fetched(sandbox).values()) >= 25, what="progress")
        server.kill()
        during = sum(fetched(sandbox).values())
        # In-flight downloads finish while Redis is gone; the workers stay up.
        wait_for(lambda: sum(fetched(sandbox).values()) > during, what="in-flight progress")
        wait_for(lambda: all("lost the connection to Redis" in w.log for w in ws),
                 what="both workers to notice the outage")
        assert all(w.proc.poll() is None for w in ws), fmt_logs(*ws)
        server = RedisServer(data_dir=tmp_path / "redis", persistent=True,
                             port=server.port).start()
        codes = [w.wait() for w in ws]
        assert codes == [EXIT_OK, EXIT_OK], fmt_logs(*ws)
        counts = fetched(sandbox)
        assert set(counts) == set(paths(urls))
        # Only a lost reply at the moment of the kill could cause a repeat.
        assert sum(n - 1 for n in counts.values()) <= 2 * CONCURRENCY
        for w in ws:
            assert "lost the connection to Redis" in w.log
            assert "is back after" in w.log
        c = redis.Redis.from_url(url)
        assert_frontier_done(c)
        c.close()
    finally:
        server.cleanup()


def test_malformed_entries_are_dropped_counted_and_kept_for_inspection(
        sandbox, redis_url, rclient, workers, tmp_path):
    good = ip_urls(sandbox.http_origin, 20)
    seed(redis_url, good, tmp_path)
    bad = [b"\xff\xfe", b"not a url", b"{bad json", b'{"nourl": 1}', b"ftp://example.com/"]
    rclient.lpush(f"{PREFIX}:start_urls", *bad)
    rclient.zadd(f"{PREFIX}:requests", {b"garbage member": 0})
    w = workers("w", worker_env(sandbox, redis_url, 0), *settings())
    assert w.wait() == EXIT_OK, w.log[-3000:]
    assert w.stats["hexscrape/frontier/malformed"] == 6
    assert fetched(sandbox) == Counter(paths(good))
    assert set(rclient.lrange(f"{PREFIX}:malformed", 0, -1)) == set(bad) | {b"garbage member"}
    assert "dropped a malformed frontier entry" in w.log
    assert_frontier_done(rclient)


@pytest.mark.parametrize("gateway", ["sandbox", "none"])
def test_unreachable_redis_at_start_is_one_line_and_exit_4(sandbox, crawl, gateway):
    from hexscrape.redisserver import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = crawler_env(sandbox, REDIS_URL=url)
    if gateway == "none":
        env["HEX_GATEWAY"] = "none"
    res = crawl("-a", "count=5", env=env, timeout=60)
    assert res.returncode == EXIT_REDIS, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("hexscrape: error: cannot reach Redis at redis://:***@127.0.0.1:")
    assert "hunter2" not in res.stderr and "Traceback" not in res.stderr
    assert sandbox.gateway.records() == []


def test_without_redis_the_crawl_stays_in_process(sandbox, crawl):
    res = crawl("-a", "count=15", env=crawler_env(sandbox))
    assert res.returncode == EXIT_OK, res.stderr[-2000:]
    assert len(res.items) == 15
    assert not any(k.startswith("hexscrape/frontier/") for k in res.stats)
