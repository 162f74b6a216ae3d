"""Pure session-health logic with an injected clock."""

from __future__ import annotations

from hexscrape.health import (
    AUTH,
    BAN,
    OK,
    HealthPolicy,
    SessionChecker,
    SessionHealth,
    retry_after_seconds,
)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class MemStore:
    def __init__(self):
        self.data = {}

    def load(self, sessions):
        return {s: self.data[s] for s in sessions if s in self.data}

    def save(self, session, raw):
        self.data[session] = raw


def test_cooldown_doubles_per_consecutive_ban_and_caps():
    clock = Clock()
    h = SessionHealth(["a", "b"], HealthPolicy(cooldown_base=30, cooldown_max=100), clock=clock)
    assert h.banned("a") == 30
    assert not h.usable("a") and h.usable("b") and h.is_banned("a")
    clock.t += 30
    assert h.usable("a")
    assert h.banned("a") == 60
    clock.t += 60
    assert h.banned("a") == 100  # capped
    clock.t += 100
    h.ok("a")
    assert h.banned("a") == 30  # a success resets the streak


def test_retry_after_wins_when_longer():
    h = SessionHealth(["a"], HealthPolicy(cooldown_base=5), clock=Clock())
    assert h.banned("a", retry_after=120) == 120
    assert retry_after_seconds(b"120") == 120 and retry_after_seconds(b"Wed, 21 Oct") is None


def test_ban_bumps_the_cookie_jar_generation():
    h = SessionHealth(["s001"], clock=Clock())
    assert h.jar("s001") == "s001"
    h.banned("s001")
    assert h.jar("s001") == "s001#1"


def test_retirement_by_requests_and_age():
    clock = Clock()
    h = SessionHealth(["a"], HealthPolicy(cooldown_base=1, max_requests=3), clock=clock)
    assert [h.served("a") for _ in range(3)] == [False, False, True]
    assert not h.usable("a") and not h.is_banned("a")
    clock.t += 1
    h2 = SessionHealth(["b"], HealthPolicy(cooldown_base=1, max_age=60), clock=clock)
    assert not h2.served("b")
    clock.t += 61
    assert h2.served("b")


def test_state_survives_through_the_store():
    clock, store = Clock(), MemStore()
    SessionHealth(["a", "b"], HealthPolicy(cooldown_base=300), store=store, clock=clock).banned("b")
    again = SessionHealth(["a", "b"], HealthPolicy(cooldown_base=300), store=store, clock=clock)
    assert again.usable("a") and not again.usable("b")
    assert 299 < again.cooling()["b"] <= 300
    store.data["a"] = "{not json"
    assert SessionHealth(["a"], store=store, clock=clock).usable("a")  # unreadable: fresh


class R:
    def __init__(self, status, body=b""):
        self.status, self.body = status, body


def test_default_checker():
    c = SessionChecker()
    assert c.check_response(None, R(200)) == OK
    assert c.check_response(None, R(404)) == OK
    assert c.check_response(None, R(407)) == AUTH
    for status in (403, 429, 502, 503):
        assert c.check_response(None, R(status)) == BAN

    class TunnelError(Exception):
        pass

    assert c.check_exception(None, TunnelError("... [{'status': 407, 'reason': b'x'}]")) == AUTH
    assert c.check_exception(None, TunnelError("... [{'status': 403, 'reason': b'x'}]")) == BAN
    assert c.check_exception(None, ValueError()) is None


def test_earliest_return_is_zero_while_any_session_is_usable():
    clock = Clock()
    h = SessionHealth(["a", "b", "c"], HealthPolicy(cooldown_base=5, cooldown_max=100), clock=clock)
    assert h.earliest_return() == 0
    h.banned("a", retry_after=40)
    h.banned("b", retry_after=20)
    assert h.earliest_return() == 0  # c is usable
    h.banned("c", retry_after=60)
    assert h.earliest_return() == 20  # b comes back first
    clock.t += 15
    assert h.earliest_return() == 5
    clock.t += 5
    assert h.earliest_return() == 0
