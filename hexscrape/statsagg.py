"""Cluster stats records, their aggregation, the respawn policy and the summary.

Pure Python (no Scrapy, no Twisted, no I/O): the worker-side ``StatsReporter``
builds records with :func:`build_record`, the primary folds them with
:class:`StatsAggregator`, decides respawns with :class:`CrashTracker`, and
renders what it knows with ``logfmt``, ``progress_*`` and ``summary_rows``. Everything
takes the current time as an argument so it can be tested without clocks.

Stats record format (version 1), one JSON document per Redis stream entry, in
the entry field ``record`` of the stream ``<REDIS_KEY_PREFIX>:stats``::

    {"v": 1, "kind": "progress" | "final", "run": str | null,
     "instance": str, "slot": str | null, "pid": int, "host": str,
     "seq": int, "ts": float, "started": float,
     "requests_ok": int, "requests_failed": int, "items": int, "retries": int,
     "queued": int | null, "leased": int | null,   # the whole frontier's
     "frontier": {str: number},           # this worker's hexscrape/frontier/* stats
     "sessions": {"s000": {"requests": int, "ok": int, "failed": int}},
     "rss_bytes": int | null, "maxrss_bytes": int | null,
     "finish_reason": str | null}          # set in the "final" record

Counters are cumulative for the worker process (``instance``), never deltas,
so a lost or repeated record costs nothing: the newest ``seq`` wins. A slot's
figures are the sum over the instances it had (a respawned worker starts from
zero). Records carry no credentials: only whitelisted figures are copied.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hexscrape.sessions import session_id

RECORD_VERSION = 1
RECORD_FIELD = "record"
KIND_PROGRESS = "progress"
KIND_FINAL = "final"

COUNTERS = ("requests_ok", "requests_failed", "items", "retries")
"""Cumulative per-process figures that add up across instances and slots."""

_STAT_KEYS = {
    "requests_ok": "hexscrape/requests/ok",
    "requests_failed": "hexscrape/requests/failed",
    "items": "item_scraped_count",
    "retries": "retry/count",
}
SESSION_COUNTS = ("requests", "ok", "failed", "bans", "cooldowns")
_SESSION_KEY = re.compile(
    r"^hexscrape/session/([A-Za-z0-9_.-]+)/(" + "|".join(SESSION_COUNTS) + r")$"
)
_FRONTIER_PREFIX = "hexscrape/frontier/"


# -- records -----------------------------------------------------------------


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def build_record(
    stats: Mapping[str, Any],
    *,
    kind: str,
    seq: int,
    instance: str,
    slot: str | None,
    pid: int,
    host: str,
    started: float,
    now: float,
    run: str | None = None,
    queued: int | None = None,
    leased: int | None = None,
    rss_bytes: int | None = None,
    maxrss_bytes: int | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A stats record from a Scrapy stats dict; copies whitelisted keys only.

    ``queued``/``leased`` are the whole frontier's (queued requests and start
    URLs; leases held by any worker), when the reporter could ask it.
    """
    sessions: dict[str, dict[str, int]] = {}
    frontier: dict[str, float] = {}
    for key, value in stats.items():
        m = _SESSION_KEY.match(key)
        if m:
            sessions.setdefault(m.group(1), dict.fromkeys(SESSION_COUNTS, 0))[
                m.group(2)
            ] = _int(value)
        elif key.startswith(_FRONTIER_PREFIX) and isinstance(value, (int, float)):
            frontier[key[len(_FRONTIER_PREFIX) :]] = value
    record: dict[str, Any] = {
        "v": RECORD_VERSION,
        "kind": kind,
        "run": run,
        "instance": instance,
        "slot": slot,
        "pid": pid,
        "host": host,
        "seq": seq,
        "ts": round(now, 3),
        "started": round(started, 3),
    }
    for name, key in _STAT_KEYS.items():
        record[name] = _int(stats.get(key, 0))
    record.update(
        queued=queued,
        leased=leased,
        frontier=frontier,
        sessions=dict(sorted(sessions.items())),
        rss_bytes=rss_bytes,
        maxrss_bytes=maxrss_bytes,
        finish_reason=finish_reason,
    )
    return record


def worst_sessions(
    sessions: Mapping[str, Mapping[str, int]], limit: int = 5
) -> list[dict[str, Any]]:
    """The sessions that cost the most: most bans, then highest failure share.

    Sessions with neither bans nor failures are left out: nothing to report.
    """
    rows = []
    for sid, c in sessions.items():
        bans, failed, requests = c.get("bans", 0), c.get("failed", 0), c.get("requests", 0)
        if not bans and not failed:
            continue
        share = failed / requests if requests else 1.0
        rows.append({"session": sid, "bans": bans, "failed": failed, "requests": requests,
                     "failure_rate": round(share, 3)})
    rows.sort(key=lambda r: (-r["bans"], -r["failure_rate"], r["session"]))
    return rows[:limit]


def valid_record(record: Any) -> bool:
    """Whether *record* is a version-1 record we can aggregate."""
    return (
        isinstance(record, dict)
        and record.get("v") == RECORD_VERSION
        and record.get("kind") in (KIND_PROGRESS, KIND_FINAL)
        and isinstance(record.get("instance"), str)
        and isinstance(record.get("seq"), int)
    )


# -- aggregation ---------------------------------------------------------------


@dataclass
class Figures:
    """Summed counters plus per-session counts."""

    requests_ok: int = 0
    requests_failed: int = 0
    items: int = 0
    retries: int = 0
    sessions: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def done(self) -> int:
        """Requests that reached an outcome (ok or failed)."""
        return self.requests_ok + self.requests_failed

    def add_record(self, record: Mapping[str, Any]) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + _int(record.get(name)))
        for sid, counts in (record.get("sessions") or {}).items():
            mine = self.sessions.setdefault(sid, dict.fromkeys(SESSION_COUNTS, 0))
            for k in SESSION_COUNTS:
                mine[k] += _int(counts.get(k))

    def add(self, other: Figures) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for sid, counts in other.sessions.items():
            mine = self.sessions.setdefault(sid, dict.fromkeys(SESSION_COUNTS, 0))
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v

    def as_dict(self, sessions: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        out["done"] = self.done
        if sessions:
            out["sessions"] = dict(sorted(self.sessions.items()))
        return out


class StatsAggregator:
    """Latest record per worker process, folded into per-slot and total figures.

    Records of another run (``run`` set and different) are ignored, so a stream
    shared by several runs or nodes does not mix them up.
    """

    def __init__(self, run: str | None = None) -> None:
        self.run = run
        self.latest: dict[str, dict[str, Any]] = {}  # instance -> newest record
        self.ignored = 0

    def add(self, record: Any) -> bool:
        """Fold *record* in; False if it is invalid, foreign or stale."""
        if not valid_record(record) or (
            self.run is not None and record.get("run") not in (None, self.run)
        ):
            self.ignored += 1
            return False
        inst = record["instance"]
        old = self.latest.get(inst)
        if old is not None:
            if old["kind"] == KIND_FINAL and record["kind"] != KIND_FINAL:
                return False
            if record["seq"] < old["seq"] and record["kind"] != KIND_FINAL:
                return False
        self.latest[inst] = dict(record)
        return True

    def final_reason(self, instance: str) -> str | None:
        """The finish reason of *instance*'s final record, or None if none came."""
        rec = self.latest.get(instance)
        if rec is None or rec["kind"] != KIND_FINAL:
            return None
        return str(rec.get("finish_reason") or "")

    def has_final(self, instance: str) -> bool:
        rec = self.latest.get(instance)
        return rec is not None and rec["kind"] == KIND_FINAL

    def slots(self) -> list[str]:
        found = {str(r.get("slot")) for r in self.latest.values()}
        return sorted(found, key=_slot_sort_key)

    def slot_figures(self, slot: str) -> Figures:
        fig = Figures()
        for rec in self.latest.values():
            if str(rec.get("slot")) == str(slot):
                fig.add_record(rec)
        return fig

    def totals(self) -> Figures:
        fig = Figures()
        for rec in self.latest.values():
            fig.add_record(rec)
        return fig

    def newest(self, slot: str | None = None) -> dict[str, Any] | None:
        """The most recent record (of *slot*, if given)."""
        best = None
        for rec in self.latest.values():
            if slot is not None and str(rec.get("slot")) != str(slot):
                continue
            if best is None or rec.get("ts", 0) > best.get("ts", 0):
                best = rec
        return best

    def frontier(self) -> tuple[int | None, int | None]:
        """(queued, leased) of the whole frontier, as last reported by any worker."""
        newest = None
        for rec in self.latest.values():
            if rec.get("queued") is None:
                continue
            if newest is None or rec.get("ts", 0) > newest.get("ts", 0):
                newest = rec
        queued = None if newest is None else _opt_int(newest.get("queued"))
        leased = None if newest is None else _opt_int(newest.get("leased"))
        return queued, leased

    def rss(self, instance: str) -> int | None:
        rec = self.latest.get(instance)
        return None if rec is None else _opt_int(rec.get("rss_bytes"))


def _slot_sort_key(slot: str) -> tuple[int, str]:
    try:
        return (int(slot), "")
    except ValueError:
        return (1 << 30, slot)


class RateMeter:
    """Requests per second over a sliding window of (time, done) samples."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, done: int) -> None:
        self._samples.append((now, done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, (d1 - d0) / (t1 - t0))


# -- respawn policy ------------------------------------------------------------


@dataclass(frozen=True)
class RespawnPolicy:
    """Exponential backoff, and giving up on a slot that crashes too often.

    A slot may crash ``max_crashes`` times within ``window`` seconds; the next
    crash in that window gives it up. The n-th crash within the window waits
    ``base_delay * factor**(n-1)`` seconds (capped at ``max_delay``) before
    the respawn, so a worker that dies at start does not spin the CPU.
    """

    max_crashes: int = 5
    window: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_crashes < 0:
            raise ValueError("max_crashes must be >= 0")
        if self.window <= 0:
            raise ValueError("window must be > 0")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must be >= 0")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")

    def delay(self, crashes_in_window: int) -> float:
        n = max(1, crashes_in_window)
        # Guard the power against overflow for huge n.
        exp = min(n - 1, 64)
        return min(self.max_delay, self.base_delay * math.pow(self.factor, exp))


class CrashTracker:
    """One slot's recent crashes under a :class:`RespawnPolicy`."""

    def __init__(self, policy: RespawnPolicy) -> None:
        self.policy = policy
        self.times: deque[float] = deque()
        self.total = 0

    def crashed(self, now: float) -> float | None:
        """Record a crash at *now*: the respawn delay, or None to give up."""
        self.total += 1
        while self.times and self.times[0] <= now - self.policy.window:
            self.times.popleft()
        self.times.append(now)
        if len(self.times) > self.policy.max_crashes:
            return None
        return self.policy.delay(len(self.times))


# -- rendering -----------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def logfmt(event: str, fields: Mapping[str, Any]) -> str:
    """``event=progress key=value ...``: one greppable, parseable line."""
    parts = [f"event={_fmt_value(event)}"]
    parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
    return " ".join(parts)


def progress_fields(
    totals: Figures,
    *,
    queued: int | None,
    leased: int | None,
    rate: float,
    alive: int,
    workers: int,
    respawns: int,
    gave_up: int = 0,
) -> dict[str, Any]:
    """The figures of one progress line, in display order."""
    total = None if queued is None else totals.done + queued + (leased or 0)
    return {
        "done": totals.done,
        "total": total,
        "rate": round(rate, 1),
        "ok": totals.requests_ok,
        "failed": totals.requests_failed,
        "items": totals.items,
        "retries": totals.retries,
        "queued": queued,
        "leased": leased,
        "alive": alive,
        "workers": workers,
        "respawns": respawns,
        "gave_up": gave_up,
    }


def progress_text(fields: Mapping[str, Any]) -> str:
    """Short human line for a terminal: ``412/1000 done  83.1/s ...``."""
    total = fields.get("total")
    done = f"{fields['done']}/{total}" if total is not None else f"{fields['done']}/?"
    text = (
        f"{done} done  {fields['rate']:.1f}/s  ok {fields['ok']}  "
        f"failed {fields['failed']}  items {fields['items']}  "
        f"workers {fields['alive']}/{fields['workers']}"
    )
    if fields.get("respawns"):
        text += f"  respawns {fields['respawns']}"
    if fields.get("gave_up"):
        text += f"  given up {fields['gave_up']}"
    return text


def summary_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """Table rows under :data:`SUMMARY_HEADERS` (``resp``: respawns, ``MiB``: the
    last reported RSS) for each slot, then a total row."""
    rows: list[list[str]] = []
    pool = int(summary.get("pool_size") or 0)
    for s in summary.get("slots", []):
        lo, hi = s["session_range"]
        last = s.get("exits", [])[-1:] or [None]
        rows.append([
            str(s["slot"]),
            f"{session_id(lo, pool)}..{session_id(hi - 1, pool)}",
            str(s["state"]),
            str(s.get("respawns", 0)),
            str(s["requests_ok"]),
            str(s["requests_failed"]),
            str(s["items"]),
            str(s["retries"]),
            _mib(s.get("rss_bytes")),
            _exit_text(last[0]),
        ])
    t = summary.get("totals", {})
    rows.append([
        "total", "", str(summary.get("outcome", "")), str(summary.get("respawns", 0)),
        str(t.get("requests_ok", 0)), str(t.get("requests_failed", 0)),
        str(t.get("items", 0)), str(t.get("retries", 0)), "", "",
    ])
    return rows


SUMMARY_HEADERS = [
    "slot", "sessions", "state", "resp", "ok", "fail", "items", "retry", "MiB",
    "last exit",
]


def _mib(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1048576:.0f}"


def _exit_text(exit_: Mapping[str, Any] | None) -> str:
    if not exit_:
        return "-"
    if exit_.get("signal"):
        text = str(exit_["signal"])
    else:
        text = f"code {exit_.get('code')}"
    if exit_.get("reason"):
        text += f" ({exit_['reason']})"
    return text


__all__ = [
    "COUNTERS",
    "CrashTracker",
    "Figures",
    "KIND_FINAL",
    "KIND_PROGRESS",
    "RECORD_FIELD",
    "RECORD_VERSION",
    "RateMeter",
    "RespawnPolicy",
    "StatsAggregator",
    "build_record",
    "logfmt",
    "progress_fields",
    "progress_text",
    "summary_rows",
    "valid_record",
]

