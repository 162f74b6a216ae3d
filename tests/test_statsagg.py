"""Pure logic of the cluster: slices, records, aggregation, respawn policy, rendering."""

from __future__ import annotations

import json

import pytest

from hexscrape.sessions import slice_bounds
from hexscrape.statsagg import (
    KIND_FINAL,
    KIND_PROGRESS,
    CrashTracker,
    Figures,
    RateMeter,
    RespawnPolicy,
    StatsAggregator,
    build_record,
    logfmt,
    progress_fields,
    progress_text,
    summary_rows,
    valid_record,
)

# -- slices ------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [1, 7, 40, 41, 100])
@pytest.mark.parametrize("workers", [1, 2, 3, 7, 16])
def test_slices_are_disjoint_cover_the_pool_and_are_never_empty(workers, pool):
    if workers > pool:
        with pytest.raises(ValueError, match="SESSION_POOL_SIZE"):
            slice_bounds(0, workers, pool)
        return
    seen: list[int] = []
    for k in range(workers):
        start, end = slice_bounds(k, workers, pool)
        assert (start, end) == ((k * pool) // workers, ((k + 1) * pool) // workers)
        assert end > start
        seen.extend(range(start, end))
    assert seen == list(range(pool))


def test_reference_slices_for_40_sessions_and_3_workers():
    assert [slice_bounds(k, 3, 40) for k in range(3)] == [(0, 13), (13, 26), (26, 40)]


# -- records -------------------------------------------------------------------------

STATS = {
    "hexscrape/requests/ok": 7,
    "hexscrape/requests/failed": 2,
    "item_scraped_count": 7,
    "retry/count": 3,
    "hexscrape/session/s000/requests": 5,
    "hexscrape/session/s000/ok": 4,
    "hexscrape/session/s000/failed": 1,
    "hexscrape/session/s001/requests": 4,
    "hexscrape/session/s001/ok": 3,
    "hexscrape/frontier/queued": 90,
    "hexscrape/frontier/leased": 4,
    "downloader/request_count": 12,
    "proxy_url": "http://user:hunter2@gw:7777",  # never copied
}


def record(instance="a", seq=1, kind=KIND_PROGRESS, slot="0", ts=100.0, run="r1",
           queued=None, leased=None, **stats):
    s = dict(STATS)
    s.update(stats)
    return build_record(
        s, kind=kind, seq=seq, instance=instance, slot=slot, pid=123, host="h",
        started=90.0, now=ts, run=run, rss_bytes=50 << 20, maxrss_bytes=60 << 20,
        finish_reason="finished" if kind == KIND_FINAL else None,
        queued=queued, leased=leased,
    )


def test_build_record_copies_whitelisted_figures_only():
    rec = record()
    assert valid_record(rec)
    assert rec["requests_ok"] == 7 and rec["requests_failed"] == 2
    assert rec["items"] == 7 and rec["retries"] == 3
    assert rec["queued"] is None and rec["leased"] is None  # only when asked
    assert rec["frontier"] == {"queued": 90, "leased": 4}
    assert rec["sessions"] == {
        "s000": {"requests": 5, "ok": 4, "failed": 1, "bans": 0, "cooldowns": 0},
        "s001": {"requests": 4, "ok": 3, "failed": 0, "bans": 0, "cooldowns": 0},
    }
    assert rec["rss_bytes"] == 50 << 20 and rec["slot"] == "0" and rec["pid"] == 123
    text = json.dumps(rec)
    assert "hunter2" not in text and "proxy_url" not in text
    assert "downloader/request_count" not in text


def test_build_record_takes_the_frontier_size_as_given():
    rec = build_record({}, kind=KIND_PROGRESS, seq=1, instance="x", slot=None, pid=1,
                       host="h", started=0, now=1, queued=5)
    assert rec["queued"] == 5 and rec["leased"] is None
    assert rec["requests_ok"] == 0 and rec["sessions"] == {}


@pytest.mark.parametrize("bad", [None, [], {"v": 2}, {"v": 1, "kind": "x"},
                                 {"v": 1, "kind": "final", "instance": 3, "seq": 1}])
def test_invalid_records_are_rejected(bad):
    agg = StatsAggregator()
    assert not valid_record(bad)
    assert agg.add(bad) is False
    assert agg.ignored == 1


# -- aggregation ------------------------------------------------------------------------


def test_counters_are_cumulative_per_instance_newest_seq_wins():
    agg = StatsAggregator(run="r1")
    agg.add(record("a", 1, **{"hexscrape/requests/ok": 3}))
    agg.add(record("a", 3, **{"hexscrape/requests/ok": 9}))
    assert agg.add(record("a", 2, **{"hexscrape/requests/ok": 6})) is False  # stale
    agg.add(record("a", 3, **{"hexscrape/requests/ok": 9}))  # duplicate: harmless
    assert agg.totals().requests_ok == 9


def test_respawned_instances_of_a_slot_add_up_and_slots_sum_to_totals():
    agg = StatsAggregator(run="r1")
    # slot 0: first worker died after 7 ok, the respawned one did 7 more
    agg.add(record("r1-0-1", 4, slot="0"))
    agg.add(record("r1-0-2", 2, slot="0"))
    agg.add(record("r1-1-1", 5, slot="1", **{"hexscrape/requests/ok": 1}))
    s0, s1, total = agg.slot_figures("0"), agg.slot_figures("1"), agg.totals()
    assert s0.requests_ok == 14 and s0.items == 14 and s0.retries == 6
    assert s0.sessions["s000"] == {"requests": 10, "ok": 8, "failed": 2, "bans": 0, "cooldowns": 0}
    assert s1.requests_ok == 1
    assert total.requests_ok == 15 and total.done == 15 + 6
    assert agg.slots() == ["0", "1"]


def test_records_of_other_runs_are_ignored():
    agg = StatsAggregator(run="r1")
    assert agg.add(record("x", run="other")) is False
    assert agg.add(record("y", run=None)) is True  # a worker started by hand
    assert agg.totals().requests_ok == 7


def test_final_record_sticks_and_gives_the_finish_reason():
    agg = StatsAggregator()
    agg.add(record("a", 1))
    assert agg.final_reason("a") is None and not agg.has_final("a")
    agg.add(record("a", 2, kind=KIND_FINAL))
    assert agg.final_reason("a") == "finished" and agg.has_final("a")
    # a late progress record (sent before, read after) does not undo it
    assert agg.add(record("a", 5)) is False
    assert agg.final_reason("a") == "finished"
    assert agg.final_reason("unknown") is None


def test_frontier_figures_come_from_the_freshest_report():
    agg = StatsAggregator()
    agg.add(record("a", ts=100, queued=50, leased=9))
    agg.add(record("b", ts=105, queued=40, leased=2))
    agg.add(record("c", ts=110))  # could not ask the frontier
    assert agg.frontier() == (40, 2)
    assert StatsAggregator().frontier() == (None, None)


def test_figures_add_and_as_dict():
    a = Figures(requests_ok=1, sessions={"s000": {"requests": 1, "ok": 1, "failed": 0}})
    b = Figures(requests_failed=2, items=1,
                sessions={"s000": {"requests": 2, "ok": 0, "failed": 2}})
    a.add(b)
    d = a.as_dict()
    assert d["done"] == 3 and d["items"] == 1
    assert d["sessions"]["s000"] == {"requests": 3, "ok": 1, "failed": 2}
    assert "sessions" not in a.as_dict(sessions=False)


def test_rate_meter_uses_a_sliding_window():
    m = RateMeter(window=10)
    assert m.rate() == 0.0
    m.sample(0, 0)
    m.sample(5, 50)
    assert m.rate() == pytest.approx(10.0)
    for t in range(6, 40):
        m.sample(t, 50 + (t - 5) * 2)  # slows down to 2/s
    assert m.rate() == pytest.approx(2.0, rel=0.1)


# -- respawn policy ------------------------------------------------------------------------


def test_backoff_doubles_and_is_capped():
    p = RespawnPolicy(max_crashes=10, base_delay=0.5, max_delay=3, factor=2)
    assert [p.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert p.delay(10_000) == 3.0


def test_slot_is_given_up_after_more_than_k_crashes_in_the_window():
    t = CrashTracker(RespawnPolicy(max_crashes=3, window=60, base_delay=1, max_delay=100))
    assert t.crashed(0) == 1
    assert t.crashed(1) == 2
    assert t.crashed(2) == 4
    assert t.crashed(3) is None  # the 4th within 60 s
    assert t.total == 4


def test_crashes_outside_the_window_are_forgotten():
    t = CrashTracker(RespawnPolicy(max_crashes=2, window=10, base_delay=1, max_delay=100))
    assert t.crashed(0) == 1
    assert t.crashed(5) == 2
    assert t.crashed(12) == 2  # the one at 0 left the window: not given up
    assert t.crashed(30) == 1
    assert t.total == 4


def test_zero_crashes_allowed_gives_up_at_once():
    assert CrashTracker(RespawnPolicy(max_crashes=0)).crashed(0) is None


@pytest.mark.parametrize("kw", [{"max_crashes": -1}, {"window": 0}, {"base_delay": -1},
                                {"factor": 0.5}])
def test_policy_rejects_nonsense(kw):
    with pytest.raises(ValueError):
        RespawnPolicy(**kw)


# -- rendering ------------------------------------------------------------------------------


def test_progress_fields_and_text():
    fig = Figures(requests_ok=40, requests_failed=2, items=40, retries=1)
    f = progress_fields(fig, queued=50, leased=8, rate=12.345, alive=2, workers=3, respawns=1)
    assert f["done"] == 42 and f["total"] == 100 and f["rate"] == 12.3
    text = progress_text(f)
    assert text.startswith("42/100 done  12.3/s") and "workers 2/3" in text
    assert "respawns 1" in text
    unknown = progress_fields(Figures(), queued=None, leased=None, rate=0, alive=0,
                              workers=1, respawns=0)
    assert unknown["total"] is None and progress_text(unknown).startswith("0/? done")


def test_logfmt_quotes_what_needs_it():
    line = logfmt("progress", {"done": 3, "rate": 1.25, "queued": None, "msg": 'a "b" c'})
    assert line == 'event=progress done=3 rate=1.2 queued=- msg="a \\"b\\" c"'


def test_summary_rows():
    summary = {
        "outcome": "finished", "respawns": 1, "pool_size": 40,
        "totals": {"requests_ok": 5, "requests_failed": 1, "items": 5, "retries": 0},
        "slots": [{
            "slot": 0, "session_range": [0, 20], "state": "finished", "respawns": 1,
            "requests_ok": 5, "requests_failed": 1, "items": 5, "retries": 0,
            "rss_bytes": 80 << 20,
            "exits": [{"code": None, "signal": "SIGKILL", "reason": None},
                      {"code": 0, "signal": None, "reason": "finished"}],
        }],
    }
    rows = summary_rows(summary)
    assert rows[0] == ["0", "s000..s019", "finished", "1", "5", "1", "5", "0", "80",
                       "code 0 (finished)"]
    assert rows[-1][:3] == ["total", "", "finished"]


def test_worst_sessions_rank_bans_then_failure_share():
    from hexscrape.statsagg import worst_sessions

    sessions = {
        "s000": {"requests": 100, "ok": 100, "failed": 0, "bans": 0},
        "s001": {"requests": 10, "ok": 5, "failed": 5, "bans": 0},
        "s002": {"requests": 50, "ok": 40, "failed": 10, "bans": 2},
        "s003": {"requests": 20, "ok": 19, "failed": 1, "bans": 0},
    }
    worst = worst_sessions(sessions, limit=2)
    assert [w["session"] for w in worst] == ["s002", "s001"]
    assert worst[0] == {"session": "s002", "bans": 2, "failed": 10, "requests": 50, "failure_rate": 0.2}
    assert [w["session"] for w in worst_sessions(sessions)] == ["s002", "s001", "s003"]
