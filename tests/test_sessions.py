"""Pure session-pool logic: ids, slices, round-robin, in-flight caps."""

from __future__ import annotations

import pytest

from hexscrape.sessions import (
    AuthFailureTracker,
    SessionPool,
    session_id,
    session_ids,
    slice_bounds,
)


def test_ids_are_zero_padded_and_widen_for_big_pools():
    assert session_ids(40)[0] == "s000" and session_ids(40)[-1] == "s039"
    assert session_id(7, 40) == "s007"
    assert session_ids(1500)[-1] == "s1499"
    assert session_ids(1500)[0] == "s0000"


@pytest.mark.parametrize("pool", [1, 7, 40, 41, 100])
def test_slices_are_disjoint_cover_the_pool_and_are_never_empty(pool):
    for workers in range(1, min(pool, 16) + 1):
        seen: list[int] = []
        for k in range(workers):
            start, end = slice_bounds(k, workers, pool)
            assert start < end
            seen.extend(range(start, end))
        assert seen == list(range(pool))


def test_slice_matches_reference_formula():
    assert [slice_bounds(k, 3, 40) for k in range(3)] == [(0, 13), (13, 26), (26, 40)]


def test_more_workers_than_sessions_is_an_error():
    with pytest.raises(ValueError, match="SESSION_POOL_SIZE=4"):
        slice_bounds(0, 5, 4)


def test_round_robin_over_the_slice():
    pool = SessionPool(["s010", "s011", "s012"], max_in_flight=10)
    assert [pool.next_session() for _ in range(7)] == [
        "s010", "s011", "s012", "s010", "s011", "s012", "s010",
    ]


def test_full_sessions_are_skipped_then_waiters_get_handover_in_order():
    pool = SessionPool(["a", "b"], max_in_flight=1)
    assert pool.try_acquire("a")
    assert pool.next_session() == "b"  # a is full
    assert pool.try_acquire("b")
    assert not pool.try_acquire("a")
    woken: list[str] = []
    pool.wait("a", lambda: woken.append("w1") or True)
    pool.wait("a", lambda: woken.append("w2") or True)
    pool.release("a")
    assert woken == ["w1"] and pool.in_flight["a"] == 1  # handed over, not freed
    pool.release("a")
    pool.release("a")
    assert woken == ["w1", "w2"] and pool.in_flight["a"] == 0


def test_cancelled_waiter_passes_the_unit_on():
    pool = SessionPool(["a"], max_in_flight=1)
    assert pool.try_acquire("a")
    pool.wait("a", lambda: False)
    got = []
    pool.wait("a", lambda: got.append(1) or True)
    pool.release("a")
    assert got == [1] and pool.in_flight["a"] == 1


def test_unusable_sessions_are_skipped():
    pool = SessionPool(["a", "b", "c"], max_in_flight=5)
    assert [pool.next_session(usable=lambda s: s != "b") for _ in range(4)] == ["a", "c", "a", "c"]


def test_auth_tracker_needs_every_session_rejected_without_success():
    t = AuthFailureTracker(["a", "b"])
    assert not t.rejected("a")
    t.ok("b")
    assert not t.rejected("b")
    assert t.rejected("a")
