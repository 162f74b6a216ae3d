"""Session-slice leases against a real redis-server."""

from __future__ import annotations

import time

import pytest
import redis

from hexscrape.slicelease import SliceConflict, SliceLease, release_slot


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def lease(client, slot, owner, ttl=1.0, pool=40):
    return SliceLease(client, "ip", pool, slot=slot, owner=owner, ttl=ttl)


def test_claim_is_all_or_nothing_and_names_both_owners(client):
    a = lease(client, "0", "host-a:1 (slot 0)")
    a.claim(0, 10)
    assert client.get("ip:session_lease:s005") == b"host-a:1 (slot 0)"
    b = lease(client, "1", "host-b:2 (slot 1)")
    t0 = time.monotonic()
    with pytest.raises(SliceConflict) as exc:
        b.claim(8, 20, wait=0.3)
    assert time.monotonic() - t0 < 2
    msg = str(exc.value)
    assert "s008" in msg and "host-a:1 (slot 0)" in msg and "host-b:2 (slot 1)" in msg
    assert client.get("ip:session_lease:s015") is None  # nothing half-claimed


def test_a_dead_holders_lease_expires_and_a_manual_restart_waits_at_most_the_ttl(client):
    lease(client, "0", "dead:1", ttl=0.5).claim(0, 10)  # never renewed: the holder "died"
    t0 = time.monotonic()
    lease(client, "0", "restarted:2", ttl=0.5).claim(0, 10)
    assert time.monotonic() - t0 < 1.5
    assert client.get("ip:session_lease:s000") == b"restarted:2"


def test_supervisor_releases_a_dead_slot_at_once(client):
    lease(client, "3", "dead:1", ttl=60).claim(30, 40)
    assert release_slot(client, "ip", "3", 40) == 11
    t0 = time.monotonic()
    lease(client, "3", "respawned:2", ttl=60).claim(30, 40, wait=0)
    assert time.monotonic() - t0 < 0.5


def test_live_lease_is_renewed_and_release_frees_it(client):
    a = lease(client, "0", "a", ttl=0.4)
    a.claim(0, 5)
    for _ in range(4):
        time.sleep(0.15)
        assert a.renew() == 0
    with pytest.raises(SliceConflict):
        lease(client, "9", "b", ttl=0.4).claim(0, 5, wait=0.2)
    a.release()
    lease(client, "9", "b", ttl=0.4).claim(0, 5, wait=0)


def test_renew_reports_sessions_taken_over(client):
    a = lease(client, "0", "a", ttl=0.3)
    a.claim(0, 4)
    client.set("ip:session_lease:s002", "intruder")
    assert a.renew() == 1


def test_auto_slices_are_disjoint_until_the_pool_is_full(client):
    got = [lease(client, None, f"w{i}", ttl=30).claim_auto(10, wait=0) for i in range(4)]
    assert got == [(0, 10), (10, 20), (20, 30), (30, 40)]
    with pytest.raises(SliceConflict, match="no free slice of 10"):
        lease(client, None, "w5", ttl=30).claim_auto(10, wait=0)
