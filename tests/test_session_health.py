"""Session health against the sandbox: bans, cool-downs, retries elsewhere,
user checkers, Redis-shared state, per-session cookies."""

from __future__ import annotations

import subprocess
import time
from collections import Counter, defaultdict

from conftest import REPO, crawl_cmd, crawler_env

SLICE = {"SESSION_RANGE_START": 0, "SESSION_RANGE_END": 4}
SLICE_IDS = {"s000", "s001", "s002", "s003"}


def url_file(tmp_path, urls, name="urls.txt"):
    p = tmp_path / name
    p.write_text("\n".join(urls) + "\n")
    return f"urls={p}"


def test_banned_session_leaves_rotation_and_its_requests_succeed_elsewhere(sandbox, crawl, tmp_path):
    sandbox.gateway.ban("s001", after=2, mode="403")
    urls = [f"{sandbox.http_origin}/ip?n={i}" for i in range(40)]
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=600, **SLICE)
    res = crawl("-a", url_file(tmp_path, urls), env=env)
    assert res.returncode == 0, res.stderr[-2000:]

    records = sandbox.gateway.records()
    assert {r["session"] for r in records} <= SLICE_IDS  # retries stay in the slice
    s001 = [r["status"] for r in records if r["session"] == "s001"]
    # two good requests, then exactly one 403 (one in flight at most): never used again
    assert s001 == [200, 200, 403]
    # every URL still produced a good item, the banned one via another session
    assert sorted(i["url"] for i in res.items) == sorted(urls)
    assert all(i["status"] == 200 for i in res.items)
    assert Counter(i["session"] for i in res.items)["s001"] == 2
    assert res.stats["hexscrape/session/s001/cooldowns"] == 1
    assert res.stats["hexscrape/session/retried_elsewhere"] == 1


def test_session_comes_back_after_its_cooldown(sandbox, tmp_path):
    sandbox.gateway.ban("s001", after=1, mode="403")
    urls = [f"{sandbox.http_origin}/slow?ms=40&n={i}" for i in range(150)]
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=1, **SLICE)
    proc = subprocess.Popen(
        crawl_cmd("-a", url_file(tmp_path, urls), "-s", "CONCURRENT_REQUESTS=4"),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(r["session"] == "s001" and r["status"] == 403 for r in sandbox.gateway.records()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sandbox.gateway.unban("s001")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    statuses = [r["status"] for r in sandbox.gateway.records() if r["session"] == "s001"]
    first_ban = statuses.index(403)
    assert statuses[:first_ban] == [200]
    assert statuses[first_ban + 1:] and set(statuses[first_ban + 1:]) == {200}


def test_retry_after_is_respected(sandbox, crawl, tmp_path):
    sandbox.gateway.ban("s000", after=0, mode="429", retry_after=600)
    urls = [f"{sandbox.https_origin}/ip?n={i}" for i in range(20)]
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=0.2, **SLICE)
    res = crawl("-a", url_file(tmp_path, urls), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    s000 = [r for r in sandbox.gateway.records() if r["session"] == "s000"]
    assert [r["status"] for r in s000] == [429]  # not retried after the 0.2 s base cool-down
    assert sorted(i["url"] for i in res.items) == sorted(urls)
    assert {i["session"] for i in res.items} == {"s001", "s002", "s003"}


def test_user_checker_flags_captcha_pages(sandbox, crawl, tmp_path):
    sandbox.gateway.ban("s002", after=0, mode="captcha")
    urls = [f"{sandbox.http_origin}/ip?n={i}" for i in range(20)]
    base = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=600, **SLICE)

    plain = crawl("-a", url_file(tmp_path, urls), env=base, output="plain.jsonl")
    assert plain.returncode == 0
    assert any(i["session"] == "s002" and i["exit_ip"] is None for i in plain.items)

    sandbox.reset()
    sandbox.gateway.ban("s002", after=0, mode="captcha")
    checked = crawl("-a", url_file(tmp_path, urls), "-s", "SESSION_CHECKER=tests.checkers.CaptchaChecker",
                    env=base, output="checked.jsonl")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert sorted(i["url"] for i in checked.items) == sorted(urls)
    assert all(i["exit_ip"] for i in checked.items)  # no CAPTCHA page became an item
    assert [r["session"] for r in sandbox.gateway.records()].count("s002") == 1


def test_respawned_worker_skips_sessions_still_cooling(sandbox, crawl, tmp_path, redis_url):
    sandbox.gateway.ban("s003", after=0, mode="403")
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=600, REDIS_URL=redis_url,
                      IDLE_CLOSE_SECONDS=0.5, **SLICE)
    first = crawl("-a", url_file(tmp_path, [f"{sandbox.http_origin}/ip?a={i}" for i in range(12)]),
                  env=env, output="first.jsonl")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "s003" in {r["session"] for r in sandbox.gateway.records()}

    sandbox.reset()  # the gateway forgets the ban: only our Redis state remembers
    urls = [f"{sandbox.http_origin}/ip?b={i}" for i in range(12)]
    second = crawl("-a", url_file(tmp_path, urls, "second.txt"), env=env, output="second.jsonl")
    assert second.returncode == 0, second.stderr[-2000:]
    used = {r["session"] for r in sandbox.gateway.records()}
    assert used == {"s000", "s001", "s002"}
    assert "still cooling down" in second.stderr
    assert len(second.items) == 12


def test_cookies_never_travel_to_another_session(sandbox, crawl, tmp_path):
    urls = [f"{sandbox.http_origin}/cookies/set?c{i}=v{i}" for i in range(8)]
    urls += [f"{sandbox.http_origin}/cookies?n={i}" for i in range(40)]
    env = crawler_env(sandbox, **SLICE)
    res = crawl("-a", url_file(tmp_path, urls), "-s", "CONCURRENT_REQUESTS=4", env=env)
    assert res.returncode == 0, res.stderr[-2000:]

    set_by_ip: dict[str, set[str]] = defaultdict(set)
    sent = 0
    for rec in sandbox.origin.records():
        if rec["path"].startswith("/cookies/set?"):
            set_by_ip[rec["ip"]].add(rec["path"].split("?", 1)[1].split("=")[0])
    for rec in sandbox.origin.records():
        for name, value in rec["headers"]:
            if name.lower() == "cookie":
                sent += 1
                names = {c.split("=")[0].strip() for c in value.split(";")}
                assert names <= set_by_ip[rec["ip"]], (rec["ip"], names)
    assert sent > 0  # cookies were replayed within their own session


def test_whole_slice_cooling_waits_then_resumes(sandbox, tmp_path):
    sandbox.gateway.ban("s000", after=0, mode="429", retry_after=1)
    urls = [f"{sandbox.http_origin}/ip?n={i}" for i in range(6)]
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_COOLDOWN=0.5,
                      SESSION_RANGE_START=0, SESSION_RANGE_END=1)
    proc = subprocess.Popen(
        crawl_cmd("-a", url_file(tmp_path, urls), "-O", str(tmp_path / "o.jsonl")),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(r["status"] == 429 for r in sandbox.gateway.records()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sandbox.gateway.unban("s000")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert err.count("all 1 sessions of this slice are cooling down") == 1  # logged once
    statuses = [r["status"] for r in sandbox.gateway.records()]
    # the ban, at most one request that was already handed the session, then
    # nothing until the cool-down (Retry-After: 1 s) ended: waited, did not spin
    bans = statuses.count(429)
    assert 1 <= bans <= 2 and statuses == [429] * bans + [200] * 6
    first_ok = next(r["ts"] for r in sandbox.gateway.records() if r["status"] == 200)
    first_ban = sandbox.gateway.records()[0]["ts"]
    assert first_ok - first_ban >= 0.9


def test_sessions_retire_after_max_requests_with_a_fresh_cookie_jar(sandbox, crawl, tmp_path):
    urls = [f"{sandbox.http_origin}/cookies/set?c=1"] + [f"{sandbox.http_origin}/cookies?n={i}" for i in range(8)]
    env = crawler_env(sandbox, SESSION_CONCURRENCY=1, SESSION_RANGE_START=0, SESSION_RANGE_END=1,
                      SESSION_MAX_REQUESTS=4, SESSION_COOLDOWN=0.1)
    res = crawl("-a", url_file(tmp_path, urls), "-s", "CONCURRENT_REQUESTS=1", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stats["hexscrape/session/s000/retired"] == 2
    cookies = [any(n.lower() == "cookie" for n, _ in r["headers"]) for r in sandbox.origin.records()]
    # requests 2-4 replay the cookie; after retirement the jar starts empty
    assert cookies[:4] == [False, True, True, True]
    assert not any(cookies[4:])
