"""Unit tests of hexscrape.frontier against a real redis-server (no Scrapy crawl).

Also the request <-> entry serialization of hexscrape.scheduler and the seed
CLI run in-process, since both only need Redis.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import pytest
import redis

from conftest import PASSWORD
from hexscrape.frontier import (
    DONE,
    DUPLICATE,
    REPLAYED,
    STALE,
    Frontier,
    FrontierError,
    Op,
    connect,
)

PREFIX = "t"


@pytest.fixture
def client(redis_url):
    c = connect(redis_url)
    yield c
    c.close()


def worker(client, name, ttl=10.0, **kw) -> Frontier:
    f = Frontier(client, PREFIX, name, heartbeat_ttl=ttl, **kw)
    f.register()
    return f


def entry(i: int) -> str:
    return json.dumps({"url": f"http://example.com/{i}"})


def seed(f: Frontier, n: int, start: int = 0) -> None:
    assert f.seed((f"fp{i}", entry(i)) for i in range(start, start + n)) == (n, 0)


def urls(leases) -> list[str]:
    return [json.loads(lease.payload)["url"] for lease in leases]


def wait_for(cond, timeout=5.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError("condition not reached in time")


# -- queue, dupefilter, leases ---------------------------------------------------


def test_seed_counts_new_and_duplicates_and_leases_in_fifo_order(client):
    f = worker(client, "a")
    assert f.seed([("fp1", entry(1)), ("fp2", entry(2)), ("fp1", entry(1))]) == (2, 1)
    assert f.seed([("fp2", entry(2)), ("fp3", entry(3))]) == (1, 1)
    leases, st = f.lease(10)
    assert urls(leases) == ["http://example.com/1", "http://example.com/2", "http://example.com/3"]
    assert [lease.kind for lease in leases] == ["r"] * 3
    assert st.queued == 0 and st.leased == 3 and st.mine == 3 and not st.empty
    assert client.scard(f"{PREFIX}:dupefilter") == 3


def test_higher_priority_first_then_fifo(client):
    f = worker(client, "a")
    f.apply([Op.push("a", '{"url":"http://x/a"}'), Op.push("b", '{"url":"http://x/b"}', 5),
             Op.push("c", '{"url":"http://x/c"}'), Op.push("d", '{"url":"http://x/d"}', -1),
             Op.push("e", '{"url":"http://x/e"}', 5)])
    assert urls(f.lease(10)[0]) == [f"http://x/{c}" for c in "beacd"]


def test_ack_deletes_the_lease_once(client):
    f = worker(client, "a")
    seed(f, 3)
    leases, _ = f.lease(3)
    assert f.apply([Op.ack(leases[0].id), Op.ack(leases[0].id)]) == [DONE, STALE]
    assert set(f.held()) == {leases[1].id, leases[2].id}
    assert f.status().leased == 2


def test_a_retried_lease_call_returns_the_same_leases(client):
    f = worker(client, "a")
    seed(f, 5)
    first, _ = f.lease(2, token="tok")
    again, st = f.lease(2, token="tok")
    assert again == first
    assert st.queued == 3 and st.leased == 2


def test_a_retried_batch_is_applied_once(client):
    f = worker(client, "a")
    seed(f, 3)
    leases, _ = f.lease(3)
    client.lpush(f"{PREFIX}:start_urls", "http://s/1", "bad")
    (s1, bad), _ = f.lease(2)
    ops = [Op.push("", '{"url":"http://x/again"}'),  # dont_filter: needs the token
           Op.push("fpN", '{"url":"http://x/new"}'), Op.ack(leases[0].id),
           Op.transfer(leases[1].id, "", '{"url":"http://x/copy"}'),
           Op.release(leases[2].id), Op.admit(s1.id, "fpS", '{"url":"http://s/1"}'),
           Op.malformed(bad.id, b"bad")]
    assert f.apply(ops, token="batch") == [DONE, DONE, DONE, DONE, DONE, DONE, DONE]
    state = (client.zrange(f"{PREFIX}:requests", 0, -1), f.held(),
             client.lrange(f"{PREFIX}:malformed", 0, -1))
    assert f.apply(ops, token="batch") == [REPLAYED, REPLAYED, STALE, STALE, STALE, DONE, STALE]
    # Without the token only the dont_filter push would be repeated.
    assert f.apply(ops[1:]) == [DUPLICATE, STALE, STALE, STALE, DONE, STALE]
    assert (client.zrange(f"{PREFIX}:requests", 0, -1), f.held(),
            client.lrange(f"{PREFIX}:malformed", 0, -1)) == state
    assert len(state[0]) == 4 and list(state[1]) == [s1.id]  # again, new, copy, released
    # Tokens: the two lease calls' and the guarded batch's; the unguarded one left none.
    assert len(client.keys(f"{PREFIX}:op:*")) == 3 and client.exists(f"{PREFIX}:op:batch")


def test_transfer_replaces_the_lease_by_a_queued_copy(client):
    f = worker(client, "a")
    seed(f, 3)
    leases, _ = f.lease(3)
    res = f.apply([
        Op.transfer(leases[0].id, "", '{"url":"http://example.com/0","retry":1}', -1),
        Op.transfer(leases[1].id, "fp2", '{"url":"http://example.com/redirected"}'),  # seen
        Op.transfer(leases[1].id, "", '{"url":"http://example.com/late"}'),  # already gone
    ])
    assert res == [DONE, DUPLICATE, STALE]
    assert set(f.held()) == {leases[2].id}
    again, _ = f.lease(10)
    assert urls(again) == ["http://example.com/0"]
    assert json.loads(again[0].payload)["retry"] == 1


def test_release_puts_an_unstarted_lease_back_at_the_front(client):
    f = worker(client, "a")
    seed(f, 4)
    leases, _ = f.lease(2)
    assert f.apply([Op.release(leases[1].id), Op.release(leases[0].id)]) == [DONE, DONE]
    seed(f, 1, start=10)
    assert urls(f.lease(10)[0]) == [f"http://example.com/{i}" for i in (0, 1, 2, 3, 10)]


# -- dead workers ------------------------------------------------------------------


def test_reaper_puts_a_dead_workers_leases_back_in_their_old_place(client):
    dead = worker(client, "dead", ttl=0.3)
    live = worker(client, "live")
    seed(dead, 6)
    taken, _ = dead.lease(3)
    seed(dead, 2, start=6)
    assert live.reap() == []  # heartbeat still fresh
    wait_for(lambda: client.exists(f"{PREFIX}:worker:dead") == 0)
    assert live.status().leased == 3
    assert live.reap() == [("dead", 3)]
    assert client.exists(f"{PREFIX}:leases:dead") == 0
    assert not client.sismember(f"{PREFIX}:workers", "dead")
    got, st = live.lease(20)
    assert urls(got) == [f"http://example.com/{i}" for i in range(8)]
    assert st.leased == 8
    assert dead.heartbeat() == 0  # a zombie learns that its heartbeat had lapsed
    assert dead.apply([Op.ack(taken[0].id)]) == [STALE]


def test_restart_in_the_same_slot_reclaims_at_once_and_stops_the_zombie(client):
    old = worker(client, "slot-1")
    seed(old, 3)
    leases, _ = old.lease(2)
    new = Frontier(client, PREFIX, "slot-1")
    reclaimed, previous = new.register()
    assert reclaimed == 2 and previous == old.token
    assert old.heartbeat() == -1  # the zombie is told it was replaced
    assert old.deregister() == -1 and client.exists(f"{PREFIX}:worker:slot-1")
    assert urls(new.lease(5)[0]) == [f"http://example.com/{i}" for i in range(3)]
    assert new.heartbeat() == 1


def test_deregister_puts_everything_back_and_forgets_the_worker(client):
    f = worker(client, "a")
    seed(f, 3)
    f.lease(2)
    assert f.deregister() == 2
    assert client.exists(f"{PREFIX}:worker:a", f"{PREFIX}:leases:a") == 0
    st = f.status()
    assert (st.queued, st.leased, st.live_workers) == (3, 0, 0)
    assert client.scard(f"{PREFIX}:dupefilter") == 3  # shared state is kept


def test_release_all_returns_orphaned_leases(client):
    f = worker(client, "a")
    seed(f, 3)
    f.lease(3)
    assert f.release_all() == 3
    assert f.status().queued == 3 and not f.held()


# -- start URLs (redis-cli LPUSH) --------------------------------------------------------


def test_start_urls_are_leased_oldest_first_after_the_queue(client):
    f = worker(client, "a")
    client.lpush(f"{PREFIX}:start_urls", "http://s/1", "http://s/2")
    seed(f, 1)
    leases, st = f.lease(10)
    assert [(lease.kind, lease.payload) for lease in leases] == [
        ("r", entry(0).encode()), ("s", b"http://s/1"), ("s", b"http://s/2")]
    assert st.start_urls == 0
    assert f.lease(10, start_urls=False)[0] == []


def test_admission_keeps_new_start_urls_drops_duplicates_and_quarantines_garbage(client):
    f = worker(client, "a", malformed_keep=2)
    seed(f, 1)  # fp0 already seen
    client.lpush(f"{PREFIX}:start_urls", "http://s/1", "http://example.com/0", b"\xff", "x", "y")
    (queued,), _ = f.lease(1)
    f.apply([Op.ack(queued.id)])
    leases, _ = f.lease(10)
    s = {lease.payload: lease for lease in leases}
    res = f.apply([
        Op.admit(s[b"http://s/1"].id, "fpS1", '{"url":"http://s/1"}'),
        Op.admit(s[b"http://example.com/0"].id, "fp0", entry(0)),
        Op.malformed(s[b"\xff"].id, b"\xff"),
        Op.malformed(s[b"x"].id, b"x"),
        Op.malformed(s[b"y"].id, b"y"),
    ], token="adm")
    assert res == [DONE, DUPLICATE, DONE, DONE, DONE]
    assert list(f.held()) == [s[b"http://s/1"].id]
    assert client.lrange(f"{PREFIX}:malformed", 0, -1) == [b"y", b"x"]  # capped, newest first
    # Repeated admissions still say which leases became crawlable (the
    # duplicate's lease is gone: stale, not crawled either).
    assert f.apply([Op.admit(s[b"http://s/1"].id, "fpS1", "{}"),
                    Op.admit(s[b"http://example.com/0"].id, "fp0", "{}")]) == [DONE, STALE]
    # An admitted start URL that is reclaimed comes back as a queue entry, not
    # as a raw start URL (which the dupefilter would now drop).
    assert f.deregister() == 1
    g = worker(client, "b")
    (lease,), _ = g.lease(10)
    assert lease.kind == "r" and json.loads(lease.payload) == {"url": "http://s/1"}


def test_unadmitted_start_urls_go_back_to_start_urls(client):
    dead = worker(client, "dead", ttl=0.2)
    client.lpush(f"{PREFIX}:start_urls", "http://s/1", "http://s/2", "http://s/3")
    dead.lease(2)
    wait_for(lambda: client.exists(f"{PREFIX}:worker:dead") == 0)
    live = worker(client, "live")
    assert live.reap() == [("dead", 2)]
    assert [lease.payload for lease in live.lease(5)[0]] == [b"http://s/1", b"http://s/2",
                                                              b"http://s/3"]


def test_foreign_queue_members_are_flagged_malformed(client):
    f = worker(client, "a")
    client.zadd(f"{PREFIX}:requests", {"garbage": 0})
    (lease,), _ = f.lease(1)
    assert lease.kind == "x" and lease.payload == b"garbage"


def test_status_sums_leases_of_every_worker(client):
    a, b = worker(client, "a"), worker(client, "b")
    seed(a, 5)
    client.lpush(f"{PREFIX}:start_urls", "http://s/1")
    a.lease(2)
    b.lease(1)
    st = a.status()
    assert (st.queued, st.start_urls, st.leased, st.live_workers) == (2, 1, 3, 2)
    b.deregister()
    assert a.status().leased == 2


def test_two_prefixes_share_one_redis_without_seeing_each_other(client):
    a = Frontier(client, "crawl-a", "w")
    b = Frontier(client, "crawl-b", "w")  # same worker id, other crawl
    a.register()
    b.register()
    assert a.seed([("fp", entry(1))]) == (1, 0)
    assert b.seed([("fp", entry(1))]) == (1, 0)  # its own dupefilter
    leases, st = a.lease(5)
    assert len(leases) == 1 and st.leased == 1
    assert b.status() == (1, 0, 0, 1, 0)
    assert a.deregister() == 1 and b.status().queued == 1


def test_wrong_key_types_are_reported(client):
    f = Frontier(client, PREFIX, "a")
    f.check_types()  # nothing there yet: fine
    client.lpush(f"{PREFIX}:requests", "x")
    with pytest.raises(FrontierError, match="t:requests.*list.*sorted set"):
        f.check_types()


def test_concurrent_workers_never_lease_the_same_entry(client, redis_url):
    seed(Frontier(client, PREFIX, "seeder"), 600)
    got: dict[str, list[str]] = {}

    def run(name: str) -> None:
        c = connect(redis_url)
        f = worker(c, name)
        mine = got.setdefault(name, [])
        while True:
            leases, _ = f.lease(7)
            if not leases:
                break
            mine.extend(urls(leases))
            f.apply([Op.ack(lease.id) for lease in leases])
        c.close()

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [u for lst in got.values() for u in lst]
    assert len(everything) == 600 and len(set(everything)) == 600
    assert Frontier(client, PREFIX, "x").status().empty


def test_bad_names_are_rejected(client):
    with pytest.raises(FrontierError):
        Frontier(client, "a b", "w")
    with pytest.raises(FrontierError):
        Frontier(client, "p", "w,1")


# -- request <-> entry (hexscrape.scheduler) ------------------------------------------------


def _spider():
    from hexscrape.spiders.ip import IpSpider

    return IpSpider()


def test_entries_never_carry_credentials_or_a_chosen_session():
    from scrapy import Request

    from hexscrape.scheduler import META_LEASE, request_to_entry

    spider = _spider()
    creds = quote(PASSWORD, safe="")
    req = spider.make_request("http://example.com/ip?n=1", meta={"depth": 2})
    req.meta.update({
        "hexscrape_session": "s003", "_hexscrape_assigned": True, "cookiejar": "s003#1",
        "proxy": "http://127.0.0.1:9", "_auth_proxy": f"http://u:{creds}@127.0.0.1:9",
        META_LEASE: "17", "retry_times": 1, "download_latency": 0.2,
    })
    req.headers["Proxy-Authorization"] = "Basic c2VjcmV0"
    req.headers["Cookie"] = "a=b"
    req.headers["X-Keep"] = "1"
    text = request_to_entry(req, spider)
    d = json.loads(text)["req"]
    assert d["meta"] == {"handle_httpstatus_all": True, "depth": 2, "retry_times": 1}
    assert d["headers"] == [["X-Keep", ["1"]]]
    assert d["callback"] == "parse" and d["errback"] == "failed"
    for secret in (PASSWORD, creds, "c2VjcmV0", "s003"):
        assert secret not in text

    # A session pinned by the user is kept; a proxy of the user's loses its password.
    pinned = Request("http://example.com/", meta={"hexscrape_session": "s007",
                                                  "cookiejar": "s007"})
    assert json.loads(request_to_entry(pinned, spider))["req"]["meta"] == {
        "hexscrape_session": "s007"}
    own = Request("http://example.com/", meta={"proxy": f"http://u:{creds}@proxy:8080"})
    assert json.loads(request_to_entry(own, spider))["req"]["meta"] == {
        "proxy": "http://proxy:8080"}


def test_entries_round_trip():
    from scrapy import FormRequest

    from hexscrape.scheduler import entry_to_request, request_to_entry, seed_request

    spider = _spider()
    req = FormRequest("http://example.com/post", formdata={"a": "é"}, priority=3,
                      dont_filter=True, callback=spider.parse, errback=spider.failed,
                      cb_kwargs={"k": [1, 2]}, meta={"m": {"x": None}})
    back = entry_to_request(request_to_entry(req, spider).encode(), spider,
                            lambda o: seed_request(spider, o))
    assert type(back) is FormRequest
    assert (back.url, back.method, back.body, back.priority, back.dont_filter) == (
        req.url, "POST", req.body, 3, True)
    assert back.callback == spider.parse and back.errback == spider.failed
    assert back.cb_kwargs == {"k": [1, 2]} and back.meta == {"m": {"x": None}}

    seeded = entry_to_request(b'{"url": "http://example.com/s", "meta": {"q": 1}}', spider,
                              lambda o: seed_request(spider, o))
    assert seeded.callback == spider.parse and seeded.meta["q"] == 1
    assert seeded.meta["handle_httpstatus_all"] is True
    plain = entry_to_request(b" http://example.com/p \n", spider,
                             lambda o: seed_request(spider, o))
    assert plain.url == "http://example.com/p"


@pytest.mark.parametrize("raw", [
    b"\xff\xfe", b"not a url", b"ftp://example.com/", b"{bad json", b'{"nourl": 1}', b"[1]",
    b'{"req": {"url": "http://x/", "callback": "nope"}}', b'{"req": {"url": 5}}',
    b'{"req": {"url": "http://x/", "_class": "os.system"}}',
    b'{"req": {"url": "http://x/", "_class": "antigravity.Nope"}}',  # never imported
])
def test_malformed_entries_raise_value_error(raw):
    from hexscrape.scheduler import entry_to_request, seed_request

    spider = _spider()
    with pytest.raises(ValueError):
        entry_to_request(raw, spider, lambda o: seed_request(spider, o))


def test_unserializable_requests_are_reported():
    from scrapy import Request

    from hexscrape.scheduler import Unserializable, request_to_entry

    spider = _spider()
    with pytest.raises(Unserializable):
        request_to_entry(Request("http://x/", meta={"obj": object()}), spider)
    with pytest.raises(Unserializable):
        request_to_entry(Request("http://x/", callback=lambda r: None), spider)


def test_frontier_settings_are_validated():
    from hexscrape.config import ConfigError
    from hexscrape.scheduler import frontier_config

    assert frontier_config({}, "ip", env={}) is None
    cfg = frontier_config({"CONCURRENT_REQUESTS": 8}, "ip",
                          env={"REDIS_URL": "redis://h:1/0", "IDLE_CLOSE_SECONDS": "0.5"})
    assert (cfg.prefix, cfg.idle_close, cfg.prefetch) == ("ip", 0.5, 8)
    assert cfg.heartbeat_ttl == 10 and cfg.heartbeat_interval == 2
    for env, msg in [
        ({"REDIS_URL": "http://h/"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h/", "IDLE_CLOSE_SECONDS": "soon"}, "IDLE_CLOSE_SECONDS"),
        ({"REDIS_URL": "redis://h/", "FRONTIER_HEARTBEAT_TTL": "2",
          "FRONTIER_HEARTBEAT_INTERVAL": "3"}, "FRONTIER_HEARTBEAT_INTERVAL"),
        ({"REDIS_URL": "redis://h/", "REDIS_KEY_PREFIX": "a b"}, "REDIS_KEY_PREFIX"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            frontier_config({}, "ip", env=env)


# -- the seed CLI (in-process) ------------------------------------------------------------


def test_seed_cli_counts_new_duplicate_and_invalid(redis_url, tmp_path, capsys, monkeypatch):
    from hexscrape.seed import main

    f = tmp_path / "urls.txt"
    f.write_text("# comment\nhttp://example.com/1\n\nhttp://example.com/2\nnot a url\n"
                 "http://example.com/1\nftp://example.com/x\n")
    assert main([str(f), "--redis-url", redis_url, "--prefix", "p"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "2 new, 1 duplicate, 2 invalid"
    assert "line 5" in err and "line 7" in err

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", "p")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("http://example.com/2\n"
                                                               "http://example.com/3\n"))
    assert main(["-"]) == 0
    assert capsys.readouterr().out.strip() == "1 new, 1 duplicate, 0 invalid"
    c = redis.Redis.from_url(redis_url)
    assert c.zcard("p:requests") == 3 and c.scard("p:dupefilter") == 3


def test_seed_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from hexscrape.exitcodes import EXIT_CONFIG, EXIT_REDIS
    from hexscrape.redisserver import free_port
    from hexscrape.seed import main

    monkeypatch.delenv("REDIS_URL", raising=False)
    f = tmp_path / "u.txt"
    f.write_text("http://example.com/\n")
    assert main([str(f)]) == EXIT_CONFIG
    missing = str(tmp_path / "missing.txt")
    assert main([missing, "--redis-url", "redis://127.0.0.1:1/0"]) == EXIT_CONFIG
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert main([str(f), "--redis-url", url]) == EXIT_REDIS
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hexscrape: error: cannot reach Redis at redis://:***@127.0.0.1:")
    assert all("hunter2" not in line for line in err)
