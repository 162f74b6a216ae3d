"""Session-slice leases in Redis: two live workers never hold the same session.

Pure redis-py (no Scrapy, no Twisted). When a frontier Redis is configured each
worker claims its slice at start:

* ``<prefix>:session_lease:<sid>`` = owner id, one key per session, with a TTL
  (``SESSION_LEASE_TTL``, default 15 s) renewed by the worker's heartbeat;
* ``<prefix>:slot_lease:<slot>`` = ``{"owner", "start", "end"}`` with the same
  TTL, so a supervisor can find what a slot held.

A claim is one Lua script: all sessions of the slice or none. If a session is
held by another owner the claim is retried until that lease could have expired
(one TTL), then refused with an error naming both owners — a dead worker's
lease frees itself, a live one's never does. A supervisor that knows a slot's
previous process is dead (the primary respawning it, the scrapyd launcher
rescheduling it) calls :func:`release_slot` first, so the successor starts at
once. A clean shutdown releases the lease immediately.

``SESSION_RANGE=auto`` with ``SESSION_SLICE_SIZE=N`` claims the first free
aligned block ``[k*N, (k+1)*N)`` of the pool instead of a fixed range.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from hexscrape.sessions import session_ids

DEFAULT_TTL = 15.0

# KEYS: session lease keys..., slot key (may be "")
# ARGV: owner, ttl_ms, slot_value
_CLAIM = """
local owner = ARGV[1]
local n = #KEYS - 1
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  if cur and cur ~= owner then
    return {i, cur}
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], owner, 'PX', ARGV[2])
end
if KEYS[#KEYS] ~= '' then
  redis.call('SET', KEYS[#KEYS], ARGV[3], 'PX', ARGV[2])
end
return {0, ''}
"""

# Renew only what is still ours; report how many session keys were lost.
_RENEW = """
local owner = ARGV[1]
local lost = 0
for i = 1, #KEYS - 1 do
  if redis.call('GET', KEYS[i]) == owner then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    lost = lost + 1
  end
end
if KEYS[#KEYS] ~= '' then
  local v = redis.call('GET', KEYS[#KEYS])
  if v and string.find(v, owner, 1, true) then
    redis.call('PEXPIRE', KEYS[#KEYS], ARGV[2])
  end
end
return lost
"""

# Delete the keys that are still held by the owner.
_RELEASE = """
local owner = ARGV[1]
local n = 0
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and (v == owner or string.find(v, '"owner": "' .. owner .. '"', 1, true)) then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""


class SliceConflict(RuntimeError):
    """The slice (or a session of it) is held by another live worker."""


def owner_id(slot: str | None) -> str:
    """Who holds a lease: host, pid and slot, readable in an error message."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f" (slot {slot})" if slot is not None else "")


def session_key(prefix: str, sid: str) -> str:
    return f"{prefix}:session_lease:{sid}"


def slot_key(prefix: str, slot: str) -> str:
    return f"{prefix}:slot_lease:{slot}"


class SliceLease:
    """One worker's lease on its slice of the session pool."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        pool_size: int,
        *,
        slot: str | None = None,
        owner: str | None = None,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.pool_size = pool_size
        self.slot = slot
        self.owner = owner or owner_id(slot)
        self.ttl = ttl
        self.clock = clock
        self.sleep = sleep
        self.start = self.end = 0
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def sessions(self) -> list[str]:
        return session_ids(self.pool_size)[self.start : self.end]

    def _keys(self, start: int, end: int) -> list[str]:
        ids = session_ids(self.pool_size)[start:end]
        keys = [session_key(self.prefix, s) for s in ids]
        keys.append(slot_key(self.prefix, self.slot) if self.slot is not None else "")
        return keys

    def _try(self, start: int, end: int) -> tuple[str, str] | None:
        """Claim [start, end) atomically; return (session, holder) on conflict."""
        value = json.dumps({"owner": self.owner, "start": start, "end": end})
        idx, holder = self._claim(
            keys=self._keys(start, end), args=[self.owner, int(self.ttl * 1000), value]
        )
        if int(idx) == 0:
            self.start, self.end = start, end
            return None
        sid = session_ids(self.pool_size)[start + int(idx) - 1]
        return sid, holder.decode() if isinstance(holder, bytes) else str(holder)

    def claim(self, start: int, end: int, wait: float | None = None) -> None:
        """Claim a fixed slice, waiting up to one TTL for a dead holder's lease."""
        deadline = self.clock() + (self.ttl + 1 if wait is None else wait)
        while True:
            conflict = self._try(start, end)
            if conflict is None:
                return
            if self.clock() >= deadline:
                sid, holder = conflict
                ids = session_ids(self.pool_size)
                raise SliceConflict(
                    f"session {sid} of slice {ids[start]}..{ids[end - 1]} is held by "
                    f"live worker {holder}; this worker {self.owner} refuses to start "
                    f"(two workers must never share sessions: check SESSION_RANGE_START/END "
                    f"and WORKER_SLOT)"
                )
            self.sleep(min(1.0, self.ttl / 4))

    def claim_auto(self, size: int, wait: float | None = None) -> tuple[int, int]:
        """Claim the first free aligned block of *size* sessions."""
        if not 1 <= size <= self.pool_size:
            raise ValueError(f"SESSION_SLICE_SIZE={size} must be 1..{self.pool_size}")
        deadline = self.clock() + (self.ttl + 1 if wait is None else wait)
        blocks = [(k, min(k + size, self.pool_size)) for k in range(0, self.pool_size, size)]
        while True:
            for start, end in blocks:
                if self._try(start, end) is None:
                    return start, end
            if self.clock() >= deadline:
                raise SliceConflict(
                    f"no free slice of {size} sessions in the pool of {self.pool_size}: "
                    f"every block is held by a live worker"
                )
            self.sleep(min(1.0, self.ttl / 4))

    def renew(self) -> int:
        """Extend the lease; return how many sessions were lost to someone else."""
        return int(self._renew(keys=self._keys(self.start, self.end),
                               args=[self.owner, int(self.ttl * 1000)]))

    def release(self) -> None:
        keys = self._keys(self.start, self.end)
        self._release(keys=[k for k in keys if k], args=[self.owner])


def release_slot(client: Any, prefix: str, slot: str, pool_size: int) -> int:
    """For supervisors: drop the lease a slot's (dead) previous process held.

    Returns the number of keys deleted (0 when the slot held nothing).
    """
    raw = client.get(slot_key(prefix, slot))
    if raw is None:
        return 0
    try:
        held = json.loads(raw)
        owner, start, end = held["owner"], int(held["start"]), int(held["end"])
    except (ValueError, KeyError, TypeError):
        client.delete(slot_key(prefix, slot))
        return 1
    ids: Sequence[str] = session_ids(pool_size)[start:end]
    keys = [session_key(prefix, s) for s in ids] + [slot_key(prefix, slot)]
    script = client.register_script(_RELEASE)
    return int(script(keys=keys, args=[owner]))
