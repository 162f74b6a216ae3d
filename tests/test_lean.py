"""hexscrape.lean keeps Scrapy's behaviour while skipping its per-request overhead."""

import json
import subprocess
import sys

import pytest
from scrapy.utils.test import get_crawler

from conftest import REPO, crawler_env, read_jsonl
from hexscrape.lean import LeanStatsCollector

EXPECTED_ITEMS = sorted(
    [("sync", 1), ("sync", 2), ("followed", 1), ("followed", 2), ("boom", 1), ("boom", 2),
     ("async", 1), ("async", 2), ("async", 3)]
)


def test_lean_stats_collector_keeps_the_stats_api():
    stats = LeanStatsCollector(get_crawler())
    stats.inc_value("a")
    stats.inc_value("a", 2, spider=None)
    stats.inc_value("b", start=10)
    stats.max_value("m", 3)
    stats.max_value("m", 1)
    stats.min_value("n", 3)
    stats.min_value("n", 1)
    stats.set_value("s", "x")
    assert stats.get_stats() == {"a": 3, "b": 11, "m": 3, "n": 1, "s": "x"}
    assert stats.get_value("missing", 7) == 7


def run_lean_spider(sandbox, tmp_path, *settings: str):
    out = tmp_path / "lean.jsonl"
    log = tmp_path / "lean.log"
    stats_file = tmp_path / "stats.json"
    args = [sys.executable, "-m", "scrapy", "runspider", str(REPO / "tests/spiders/lean_spider.py"),
            "-O", str(out), "-s", f"TEST_ORIGIN={sandbox.http_origin}", "-s", f"LOG_FILE={log}",
            "-s", f"HEXSCRAPE_STATS_DUMP={stats_file}"]
    for s in settings:
        args += ["-s", s]
    proc = subprocess.run(args, cwd=REPO, env=crawler_env(sandbox, SESSION_POOL_SIZE=4),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:] if log.exists() else proc.stderr
    items = sorted((i["tag"], i["n"]) for i in read_jsonl(out))
    return items, log.read_text(), json.loads(stats_file.read_text())


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "scrapy"])
def test_item_path_same_output_and_error_handling(sandbox, tmp_path, lean):
    items, log, stats = run_lean_spider(sandbox, tmp_path, f"LEAN_ITEM_PATH={lean}")
    assert items == EXPECTED_ITEMS  # items before a callback error are kept
    assert stats["spider_exceptions/ValueError"] == 1
    assert "callback failed after two items" in log
    assert stats["item_scraped_count"] == len(EXPECTED_ITEMS)
    assert stats["response_received_count"] == 4


def test_debug_records_skipped_at_info_and_kept_at_debug(sandbox, tmp_path):
    _, info_log, _ = run_lean_spider(sandbox, tmp_path, "LOG_LEVEL=INFO")
    assert "Crawled (200)" not in info_log
    assert "Scraped from" not in info_log
    # Our RedirectMiddleware does not warn about the disabled RefererMiddleware.
    assert "WARNING" not in info_log, info_log
    _, debug_log, _ = run_lean_spider(sandbox, tmp_path, "LOG_LEVEL=DEBUG")
    assert debug_log.count("Crawled (200)") == 4
    assert debug_log.count("Scraped from") == len(EXPECTED_ITEMS)


def test_lean_signals_deliver_to_receivers_and_skip_the_rest():
    from pydispatch import dispatcher

    from hexscrape.lean import LeanSignals

    crawler = get_crawler()
    LeanSignals.from_crawler(crawler)
    item_sig, other_sig = object(), object()
    got = []

    def on_item(item, **kw):
        got.append(("item", item))
        return "seen"

    def on_anything(signal, **kw):
        got.append(("any", signal))

    assert crawler.signals.send_catch_log(item_sig, item=1) == []
    crawler.signals.connect(on_item, signal=item_sig)
    assert crawler.signals.send_catch_log(item_sig, item=2) == [(on_item, "seen")]
    assert crawler.signals.send_catch_log(other_sig) == []
    crawler.signals.connect(on_anything, signal=dispatcher.Any)
    crawler.signals.send_catch_log(other_sig)
    crawler.signals.disconnect(on_anything, signal=dispatcher.Any)
    crawler.signals.disconnect(on_item, signal=item_sig)
    crawler.signals.send_catch_log(item_sig, item=3)
    crawler.signals.send_catch_log(other_sig)
    assert got == [("item", 2), ("any", other_sig)]


async def _send_async(crawler, signal, **kw):
    return await crawler.signals.send_catch_log_async(signal, **kw)


def test_lean_signals_async_send():
    import asyncio

    from hexscrape.lean import LeanSignals

    crawler = get_crawler()
    LeanSignals.from_crawler(crawler)
    item_sig, other_sig = object(), object()
    got = []
    crawler.signals.connect(lambda item, **kw: got.append(item), signal=item_sig, weak=False)
    asyncio.run(_send_async(crawler, item_sig, item=1))
    assert asyncio.run(_send_async(crawler, other_sig, item=2)) == []
    assert got == [1]


def _schedulers(**settings):
    from scrapy import Spider
    from scrapy.core.scheduler import Scheduler

    from hexscrape.lean import LeanScheduler

    spider_settings = {"SCHEDULER_PRIORITY_QUEUE": "scrapy.pqueues.ScrapyPriorityQueue", **settings}
    out = []
    for cls in (LeanScheduler, Scheduler):
        crawler = get_crawler(settings_dict=spider_settings)
        crawler.stats = LeanStatsCollector(crawler)
        sched = cls.from_crawler(crawler)
        sched.open(Spider.from_crawler(crawler, "lean"))
        out.append((sched, crawler.stats))
    return out


def test_lean_scheduler_orders_like_scrapys():
    import random

    from scrapy import Request

    rng = random.Random(7)
    (lean, _), (scrapy_sched, _) = _schedulers()
    popped = {id(lean): [], id(scrapy_sched): []}
    for step in range(600):
        if rng.random() < 0.6:
            url = f"http://127.0.0.1/{rng.randrange(300)}"  # some duplicates
            prio = rng.choice([-1, 0, 0, 0, 2])
            start = rng.random() < 0.5
            for sched in (lean, scrapy_sched):
                r = Request(url, priority=prio, meta={"is_start_request": True} if start else {})
                sched.enqueue_request(r)
        else:
            for sched in (lean, scrapy_sched):
                r = sched.next_request()
                popped[id(sched)].append(None if r is None else (r.url, r.priority))
        assert len(lean) == len(scrapy_sched)
        assert lean.has_pending_requests() == scrapy_sched.has_pending_requests()
    while scrapy_sched.has_pending_requests():
        for sched in (lean, scrapy_sched):
            r = sched.next_request()
            popped[id(sched)].append((r.url, r.priority))
    assert lean.next_request() is None
    assert popped[id(lean)] == popped[id(scrapy_sched)]
    assert len(popped[id(lean)]) > 200


def test_lean_scheduler_filters_duplicates_and_counts_like_scrapy():
    from scrapy import Request

    (lean, lean_stats), (scrapy_sched, scrapy_stats) = _schedulers()
    for sched in (lean, scrapy_sched):
        assert sched.enqueue_request(Request("http://127.0.0.1/a?x=1&y=2"))
        assert not sched.enqueue_request(Request("http://127.0.0.1/a?y=2&x=1"))  # canonical duplicate
        assert sched.enqueue_request(Request("http://127.0.0.1/a?x=1&y=2", dont_filter=True))
        assert sched.next_request() is not None
    assert lean_stats.get_stats() == scrapy_stats.get_stats()
    assert lean_stats.get_value("dupefilter/filtered") == 1


def test_lean_scheduler_leaves_jobdir_crawls_to_scrapy(tmp_path):
    from scrapy.core.scheduler import Scheduler

    from hexscrape.lean import LeanScheduler

    crawler = get_crawler(settings_dict={"JOBDIR": str(tmp_path / "job")})
    sched = LeanScheduler.from_crawler(crawler)
    sched.df.close("finished")
    assert type(sched) is Scheduler


def test_lean_cookies_middleware_sends_what_scrapys_sends():
    from scrapy import Request
    from scrapy.downloadermiddlewares.cookies import CookiesMiddleware
    from scrapy.http import Response

    from hexscrape.lean import LeanCookiesMiddleware

    def run(mw):
        sent = []

        def fetch(url, jar, set_cookie=None, **kw):
            req = Request(url, meta={"cookiejar": jar}, **kw)
            assert mw.process_request(req) is None
            sent.append(req.headers.getlist("Cookie"))
            headers = {"Set-Cookie": set_cookie} if set_cookie else {}
            assert mw.process_response(req, Response(url, headers=headers, request=req)) is not None

        fetch("http://a.example/1", "s1", headers={"Cookie": "stale=1"})  # dropped, as in Scrapy
        fetch("http://a.example/2", "s1", set_cookie="sid=abc; Path=/")
        fetch("http://a.example/3", "s1")
        fetch("http://a.example/4", "s2")  # another session's jar stays empty
        fetch("http://a.example/5", "s2", cookies={"lang": "en"})
        fetch("http://a.example/6", "s2")
        return sent

    crawler = get_crawler()
    lean, plain = LeanCookiesMiddleware.from_crawler(crawler), CookiesMiddleware.from_crawler(crawler)
    assert run(lean) == run(plain) == [[], [], [b"sid=abc"], [], [b"lang=en"], [b"lang=en"]]


@pytest.mark.parametrize("spider_attrs", [{}, {"user_agent": "spider-ua/1", "download_timeout": 7}])
@pytest.mark.filterwarnings("ignore:The '.*' spider attribute is deprecated")
def test_lean_request_defaults_match_scrapys_three_middlewares(spider_attrs):
    from scrapy import Request, Spider
    from scrapy.downloadermiddlewares.defaultheaders import DefaultHeadersMiddleware
    from scrapy.downloadermiddlewares.downloadtimeout import DownloadTimeoutMiddleware
    from scrapy.downloadermiddlewares.useragent import UserAgentMiddleware

    from hexscrape.lean import LeanRequestDefaults

    settings = {"USER_AGENT": "hexscrape-test", "DOWNLOAD_TIMEOUT": 12,
                "DEFAULT_REQUEST_HEADERS": {"Accept": "text/html", "X-Gone": None, "accept-language": "en"}}
    crawler = get_crawler(settings_dict=settings)
    spider = Spider.from_crawler(crawler, "t")
    for k, v in spider_attrs.items():
        setattr(spider, k, v)
    scrapy_mws = [cls.from_crawler(crawler) for cls in
                  (DownloadTimeoutMiddleware, DefaultHeadersMiddleware, UserAgentMiddleware)]
    lean = LeanRequestDefaults.from_crawler(crawler)
    for mw in (*scrapy_mws, lean):
        if hasattr(mw, "spider_opened"):
            mw.spider_opened(spider)

    def requests():
        return [Request("http://a.example/"),
                Request("http://a.example/", headers={"User-Agent": "mine", "accept": "*/*"},
                        meta={"download_timeout": 3})]

    for ours, theirs in zip(requests(), requests()):
        lean.process_request(ours)
        for mw in scrapy_mws:
            mw.process_request(theirs)
        assert dict(ours.headers) == dict(theirs.headers)
        assert ours.meta == theirs.meta
    first = requests()[0]
    lean.process_request(first)
    second = requests()[0]
    lean.process_request(second)
    second.headers.appendlist("Accept", "x/y")  # values are per request, not shared
    assert first.headers.getlist("Accept") == [b"text/html"]
