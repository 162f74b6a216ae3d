"""Shared URL frontier on Redis with leases instead of destructive pops.

Pure redis-py + Lua (no Scrapy, no Twisted): the Scrapy glue lives in
:mod:`hexscrape.scheduler`, the seeding CLI in :mod:`hexscrape.seed`; this
module is tested directly against a real ``redis-server``.

User-facing summary (README)
----------------------------
With ``REDIS_URL`` set (``-s REDIS_URL=redis://host:6379/0`` or the
environment), every ``scrapy crawl ip`` process — on one host or many — takes
its work from one frontier in Redis; without it the crawl runs in-process as
before. All keys start with ``REDIS_KEY_PREFIX`` (default: the spider name,
``ip``), so two crawls share one Redis by using different prefixes. A single
Redis instance (or a primary with replicas) is assumed: the scripts touch
per-worker keys, so Redis Cluster is not supported.

Seeding:

* ``python run_cluster.py seed FILE`` or ``python -m hexscrape.seed FILE``
  (``-`` reads stdin; ``--redis-url``, ``--prefix`` default to ``REDIS_URL``,
  ``REDIS_KEY_PREFIX``) validates each line and prints
  ``N new, N duplicate, N invalid``;
* ``scrapy crawl ip -a count=N`` / ``-a urls=FILE`` with ``REDIS_URL`` seeds
  those URLs, then crawls the shared frontier (without ``-a``, a worker only
  takes what is already there);
* ``redis-cli LPUSH ip:start_urls URL`` works as scrapy-redis users expect; an
  element may also be ``{"url": ..., "meta": {...}}`` (``method`` honoured,
  other keys become form data).

A URL is crawled once however often it is pushed (unlike scrapy-redis, start
URLs go through the dupefilter).

=========================  ==========  =====================================
key                        type        contents
=========================  ==========  =====================================
``<p>:start_urls``         list        raw input (LPUSH), consumed oldest
                                       first
``<p>:requests``           sorted set  the frontier: score = -priority, member
                                       = ``<16 hex seq> <json entry>`` so equal
                                       priorities are served first-in first-out
``<p>:dupefilter``         set         fingerprints (hex SHA1, Scrapy's request
                                       fingerprint) of every request admitted
``<p>:leases:<worker>``    hash        lease id -> leased entry, per worker
``<p>:worker:<worker>``    string+TTL  the worker's heartbeat (a random token)
``<p>:workers``            set         workers that may hold leases
``<p>:seq``                counter     lease ids and queue sequence numbers
``<p>:op:<token>``         string+TTL  makes a retried call idempotent (120 s)
``<p>:malformed``          list        undecodable entries, newest first,
                                       capped at ``FRONTIER_MALFORMED_KEEP``
=========================  ==========  =====================================

``<p>:stats`` (the primary's stats stream) and the session-slice keys belong
to other components. A worker never deletes the queue or the dupefilter; to
start a crawl from scratch, delete the keys above yourself.

Leases instead of pops. A worker moves up to N entries from the front of
``<p>:requests`` (then, if that ran dry, from ``<p>:start_urls``) into its own
``<p>:leases:<worker>`` hash in one Lua script, whenever it holds fewer than
``CONCURRENT_REQUESTS + FRONTIER_PREFETCH`` leases — so one slow URL holds one
lease and stalls nothing. A lease is acknowledged (deleted) only once the
response or failure has been fully processed, items included. Its deadline is
its holder's heartbeat: ``<p>:worker:<worker>`` has a TTL of
``FRONTIER_HEARTBEAT_TTL`` and is renewed every ``FRONTIER_HEARTBEAT_INTERVAL``,
which extends all the worker's leases at once.

Crashes. Every live worker reaps every ``FRONTIER_REAP_INTERVAL``: the leases
of any worker whose heartbeat expired go back into the queue, so a SIGKILLed
worker's URLs return within TTL + reap interval (13 s by default). A worker
with ``WORKER_SLOT=3`` is ``slot-3``; on start it immediately puts back the
leases of the previous holder of that id (a supervisor only respawns a slot
once its predecessor is dead), and a still-running predecessor learns on its
next heartbeat that it was replaced and stops (reason ``worker_replaced``).
Without a slot the worker id is random. Entries put back keep their score and
sequence number: they return to exactly where they were, ahead of everything
queued after them. After a SIGKILL every URL is crawled; only those that were
in flight (at most ``CONCURRENT_REQUESTS``) can be fetched twice.

Retries and redirects go back through the shared frontier and may be fetched
by another worker with a session of its own slice: the copy replaces the
original's lease atomically (or just acks it if the dupefilter drops the copy).
Entries never carry anything that pins a worker or a secret: a session chosen
by the worker, proxy credentials, ``Proxy-Authorization``, the session's
``cookiejar``/``Cookie`` are stripped; a ``hexscrape_session`` pinned by the
user is kept (it must be in the slice of whichever worker leases it).

Closing. A worker closes with reason ``finished`` once the whole cluster's
frontier — queue, start URLs and everybody's leases — has been empty for
``IDLE_CLOSE_SECONDS``, so no worker leaves while another one's leases are
outstanding. SIGTERM (reason ``shutdown``, exit 0): stop leasing, finish and
ack what is in flight, put unstarted leases back.

Redis trouble. Unreachable at start: ``hexscrape: error: cannot reach Redis
at ...`` and exit code 4. Lost mid-crawl: logged once, retried with backoff
(0.5 s doubling to 10 s); downloads in flight finish and their acks and new
requests are kept until Redis is back; nothing is lost. A malformed entry is
logged, counted, moved to ``<p>:malformed`` and dropped.

Settings (a Scrapy setting wins over the environment variable of the same
name):

===============================  ===================  =============================================
setting                          default              meaning
===============================  ===================  =============================================
``REDIS_URL``                    unset                enables the frontier
``REDIS_KEY_PREFIX``             spider name          prefix of every key
``IDLE_CLOSE_SECONDS``           5                    empty-cluster time before closing (<0: never)
``FRONTIER_HEARTBEAT_TTL``       10 s                 lease deadline
``FRONTIER_HEARTBEAT_INTERVAL``  TTL / 5              heartbeat period
``FRONTIER_REAP_INTERVAL``       3 s                  dead-worker check period
``FRONTIER_PREFETCH``            CONCURRENT_REQUESTS  unstarted leases kept ready
``FRONTIER_BATCH_SIZE``          100                  max entries per lease call
``FRONTIER_POLL_MAX``            1 s                  max wait between polls of an empty frontier
``FRONTIER_REDIS_TIMEOUT``       3 s                  socket connect/read timeouts
``FRONTIER_CLOSE_TIMEOUT``       15 s                 how long a closing worker keeps trying Redis
``FRONTIER_MALFORMED_KEEP``      1000                 entries kept in ``<p>:malformed``
===============================  ===================  =============================================

Stats (per worker): ``hexscrape/frontier/leased``, ``…/acked``,
``…/reclaimed`` (other workers' or a predecessor's leases this worker put
back), ``…/released`` (own unstarted leases put back on close),
``…/enqueued``, ``…/duplicate``, ``…/transferred`` (retry/redirect copies),
``…/stale`` (acks for leases already taken back), ``…/malformed``,
``…/unserializable``, ``…/redis_errors``, ``…/heartbeat_lapsed``,
``…/seeded/new``, ``…/seeded/duplicate``; plus ``scheduler/enqueued/redis``,
``scheduler/dequeued/redis`` and ``dupefilter/filtered``.

Limitations: request meta and ``cb_kwargs`` must be JSON-compatible and
callbacks must be spider methods (otherwise the request stays in the worker's
memory, counted as ``unserializable``, and dies with it); ``start_urls`` must
be a list (no ``REDIS_START_URLS_AS_SET``); the seed CLI uses Scrapy's default
request fingerprint.

Implementation notes
--------------------
Start URLs are admitted when leased: the raw lease is turned into a queue-entry
lease if its fingerprint is new, atomically, so a crash can never leave a URL
"seen" but not queued. Every batch carries a random token recorded for 120 s
(``<p>:op:<token>``) where that is needed, so a call retried after a lost
reply is not applied twice (a retried lease returns the same leases; all other
writes are idempotent by themselves except a ``dont_filter`` push).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

OP_TTL = 120  # seconds a batch token is remembered
DEFAULT_MALFORMED_KEEP = 1000

# -- Lua ---------------------------------------------------------------------
# Lease values in <p>:leases:<w> are "r<score>|<member>" (a queue entry) or
# "s<raw>" (a raw start URL). Requeueing reverses the lease exactly.

_REQUEUE_FN = """
local function requeue(qkey, skey, mkey, v)
  local kind = string.sub(v, 1, 1)
  if kind == 'r' then
    local bar = string.find(v, '|', 2, true)
    if bar then
      redis.call('ZADD', qkey, string.sub(v, 2, bar - 1), string.sub(v, bar + 1))
      return 1
    end
  elseif kind == 's' then
    redis.call('RPUSH', skey, string.sub(v, 2))
    return 1
  end
  redis.call('LPUSH', mkey, v)
  return 0
end
local function requeue_all(hkey, qkey, skey, mkey)
  local all = redis.call('HGETALL', hkey)
  local starts = {}
  for i = 1, #all, 2 do
    if string.sub(all[i + 1], 1, 1) == 's' then
      starts[#starts + 1] = {tonumber(all[i]), all[i + 1]}
    else
      requeue(qkey, skey, mkey, all[i + 1])
    end
  end
  -- Raw start URLs go back to the consuming end: newest lease first, so the
  -- oldest one is consumed first again.
  table.sort(starts, function(a, b) return a[1] > b[1] end)
  for _, s in ipairs(starts) do requeue(qkey, skey, mkey, s[2]) end
  redis.call('DEL', hkey)
  return #all / 2
end
"""

_STATUS_FN = """
local function status(qkey, skey, wkey, prefix)
  local leased = 0
  local live = 0
  for _, w in ipairs(redis.call('SMEMBERS', wkey)) do
    leased = leased + redis.call('HLEN', prefix .. ':leases:' .. w)
    live = live + redis.call('EXISTS', prefix .. ':worker:' .. w)
  end
  return {redis.call('ZCARD', qkey), redis.call('LLEN', skey), leased, live}
end
"""

# KEYS: requests, start_urls, my leases, workers, seq, op key
# ARGV: n, worker, take start urls (1/0), op ttl, prefix
_LEASE = _STATUS_FN + """
local out = {}
local prev = redis.call('GET', KEYS[6])
if prev then
  for id in string.gmatch(prev, '[^,]+') do
    local v = redis.call('HGET', KEYS[3], id)
    if v then
      out[#out + 1] = id
      out[#out + 1] = v
    end
  end
  return {out, status(KEYS[1], KEYS[2], KEYS[4], ARGV[5]), redis.call('HLEN', KEYS[3])}
end
local n = tonumber(ARGV[1])
local popped = redis.call('ZPOPMIN', KEYS[1], n)
local values = {}
for i = 1, #popped, 2 do
  values[#values + 1] = 'r' .. popped[i + 1] .. '|' .. popped[i]
end
if #values < n and ARGV[3] == '1' then
  for _ = #values + 1, n do
    local raw = redis.call('RPOP', KEYS[2])
    if not raw then break end
    values[#values + 1] = 's' .. raw
  end
end
if #values > 0 then
  local last = redis.call('INCRBY', KEYS[5], #values)
  local ids = {}
  for i, v in ipairs(values) do
    local id = string.format('%d', last - #values + i)
    redis.call('HSET', KEYS[3], id, v)
    ids[#ids + 1] = id
    out[#out + 1] = id
    out[#out + 1] = v
  end
  redis.call('SADD', KEYS[4], ARGV[2])
  redis.call('SET', KEYS[6], table.concat(ids, ','), 'EX', ARGV[4])
end
return {out, status(KEYS[1], KEYS[2], KEYS[4], ARGV[5]), redis.call('HLEN', KEYS[3])}
"""

# KEYS: requests, dupefilter, my leases, seq, op key (or ''), malformed, start_urls
# ARGV: op ttl, malformed cap, then ops (code + fixed arity):
#   P fp score json          push (fp '' = dont_filter)    -> 1 queued / 0 dup
#   T id fp score json       transfer lease to a copy      -> 1 / 0 dup / 2 stale
#   A id                     ack                           -> 1 / 2 stale
#   M id raw                 drop as malformed             -> 1 / 2 stale
#   R id                     release (requeue)             -> 1 / 2 stale
#   S id fp score json       admit a raw start URL lease   -> 1 / 0 dup / 2 stale
# Every op but a dont_filter push is idempotent by itself (a repeated ack or
# transfer finds the lease gone, a repeated push finds the fingerprint seen, a
# repeated admit finds the lease already admitted); a batch holding such a push
# comes with an op key, and when it is replayed its pushes report -1.
_APPLY = _REQUEUE_FN + """
local q, df, h, seq, mk, sk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7]
local arity = {P = 3, T = 4, A = 1, M = 2, R = 1, S = 4}
local res = {}
local replay = false
if KEYS[5] ~= '' then
  replay = not redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[1])
end
local function member(json)
  return string.format('%016x', redis.call('INCR', seq)) .. ' ' .. json
end
local function seen(fp)
  return fp ~= '' and redis.call('SADD', df, fp) == 0
end
local malformed = 0
local i = 3
while i <= #ARGV do
  local code = ARGV[i]
  local a1, a2, a3, a4 = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local r
  if code == 'P' then
    if replay then r = -1
    elseif seen(a1) then r = 0
    else redis.call('ZADD', q, a2, member(a3)); r = 1 end
  elseif code == 'T' then
    if redis.call('HDEL', h, a1) == 0 then r = 2
    elseif seen(a2) then r = 0
    else redis.call('ZADD', q, a3, member(a4)); r = 1 end
  elseif code == 'A' then
    r = (redis.call('HDEL', h, a1) == 1) and 1 or 2
  elseif code == 'M' then
    if redis.call('HDEL', h, a1) == 1 then
      redis.call('LPUSH', mk, a2)
      malformed = malformed + 1
      r = 1
    else r = 2 end
  elseif code == 'R' then
    local v = redis.call('HGET', h, a1)
    if v then
      requeue(q, sk, mk, v); redis.call('HDEL', h, a1); r = 1
    else r = 2 end
  elseif code == 'S' then
    local v = redis.call('HGET', h, a1)
    if not v then r = 2
    elseif string.sub(v, 1, 1) == 'r' then r = 1  -- admitted before (a retry)
    elseif seen(a2) then redis.call('HDEL', h, a1); r = 0
    else
      redis.call('HSET', h, a1, 'r' .. a3 .. '|' .. member(a4)); r = 1
    end
  else
    return redis.error_reply('unknown frontier op ' .. tostring(code))
  end
  res[#res + 1] = r
  i = i + 1 + arity[code]
end
if malformed > 0 then redis.call('LTRIM', mk, 0, tonumber(ARGV[2]) - 1) end
return res
"""

# KEYS: heartbeat, my leases, workers, requests, start_urls, malformed
# ARGV: worker, token, ttl ms
_REGISTER = _REQUEUE_FN + """
local prev = redis.call('GET', KEYS[1])
local n = requeue_all(KEYS[2], KEYS[4], KEYS[5], KEYS[6])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return {n, prev or ''}
"""

# KEYS: heartbeat, workers   ARGV: worker, token, ttl ms
# -> 1 renewed, 0 had lapsed (renewed now), -1 another process holds the id
_BEAT = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
if v then return 1 end
return 0
"""

# KEYS: workers, requests, start_urls, malformed   ARGV: prefix
_REAP = _REQUEUE_FN + """
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':worker:' .. w) == 0 then
    local n = requeue_all(ARGV[1] .. ':leases:' .. w, KEYS[2], KEYS[3], KEYS[4])
    redis.call('SREM', KEYS[1], w)
    out[#out + 1] = w
    out[#out + 1] = n
  end
end
return out
"""

# KEYS: requests, start_urls, workers   ARGV: prefix
_STATUS = _STATUS_FN + """
return status(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
"""

# KEYS: my leases, requests, start_urls, malformed
_RELEASE_ALL = _REQUEUE_FN + """
return requeue_all(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
"""

# KEYS: heartbeat, my leases, workers, requests, start_urls, malformed
# ARGV: worker, token  -> number of leases put back, or -1 if the id was taken
_DEREGISTER = _REQUEUE_FN + """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[2] then return -1 end
local n = requeue_all(KEYS[2], KEYS[4], KEYS[5], KEYS[6])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return n
"""


# -- Python side ---------------------------------------------------------------


class FrontierError(RuntimeError):
    """Frontier misuse or a Redis key of the wrong type (one-line message)."""


class Lease(NamedTuple):
    """One leased entry.

    ``kind`` is ``"r"`` (a queue entry; payload is its JSON), ``"s"`` (a raw
    ``start_urls`` element, to be admitted) or ``"x"`` (a queue member not in
    the ``<seq> <json>`` form: malformed; payload is the member).
    """

    id: str
    kind: str
    payload: bytes


class Status(NamedTuple):
    """Cluster-wide counts; ``mine`` is this worker's leases (lease() only)."""

    queued: int
    start_urls: int
    leased: int
    live_workers: int
    mine: int = 0

    @property
    def empty(self) -> bool:
        """Nothing queued and nothing leased by anyone: the cluster is done."""
        return not (self.queued or self.start_urls or self.leased)


class Op(NamedTuple):
    """One write of an :meth:`Frontier.apply` batch; build with the factories."""

    code: str
    args: tuple[Any, ...]

    @staticmethod
    def push(fp: str, entry: str | bytes, priority: int = 0) -> Op:
        """Queue *entry* unless *fp* was seen (``fp=""``: dont_filter)."""
        return Op("P", (fp, -priority, entry))

    @staticmethod
    def transfer(lease_id: str, fp: str, entry: str | bytes, priority: int = 0) -> Op:
        """Replace lease *lease_id* by a queued copy (retry/redirect)."""
        return Op("T", (lease_id, fp, -priority, entry))

    @staticmethod
    def ack(lease_id: str) -> Op:
        return Op("A", (lease_id,))

    @staticmethod
    def malformed(lease_id: str, raw: bytes | str) -> Op:
        return Op("M", (lease_id, raw))

    @staticmethod
    def release(lease_id: str) -> Op:
        """Put an unstarted lease back in the queue."""
        return Op("R", (lease_id,))

    @staticmethod
    def admit(lease_id: str, fp: str, entry: str | bytes, priority: int = 0) -> Op:
        """Turn a raw start-URL lease into a queue-entry lease, or drop a duplicate."""
        return Op("S", (lease_id, fp, -priority, entry))


# Result codes of Frontier.apply
DUPLICATE = 0
DONE = 1
STALE = 2
REPLAYED = -1


def connect(url: str, timeout: float = 3.0) -> redis.Redis:
    """A client with short timeouts and no built-in retry storm.

    One immediate retry handles a pooled connection that died with a
    restarted server; longer outages are the caller's business (backoff).
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
    )


def new_token() -> str:
    return uuid.uuid4().hex


def split_entry(member: bytes) -> bytes:
    """The JSON entry of a queue member (``<16 hex seq> <json>``)."""
    seq, sep, entry = member.partition(b" ")
    if not sep or len(seq) != 16:
        raise ValueError("not a frontier queue member")
    return entry


@dataclass
class Keys:
    prefix: str

    def __post_init__(self) -> None:
        p = self.prefix
        self.start_urls = f"{p}:start_urls"
        self.requests = f"{p}:requests"
        self.dupefilter = f"{p}:dupefilter"
        self.workers = f"{p}:workers"
        self.seq = f"{p}:seq"
        self.malformed = f"{p}:malformed"

    def leases(self, worker: str) -> str:
        return f"{self.prefix}:leases:{worker}"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    def op(self, token: str) -> str:
        return f"{self.prefix}:op:{token}"


_EXPECTED_TYPES = {"requests": b"zset", "start_urls": b"list", "dupefilter": b"set"}
_TYPE_NAMES = {b"zset": "sorted set", b"list": "list", b"set": "set", b"hash": "hash",
               b"string": "string", b"stream": "stream"}


class Frontier:
    """One worker's handle on the shared frontier (synchronous, one thread).

    *heartbeat_ttl* is the lease deadline: if this worker does not call
    :meth:`heartbeat` for that long, other workers' :meth:`reap` put its
    leases back in the queue.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        worker: str,
        *,
        heartbeat_ttl: float = 10.0,
        token: str | None = None,
        malformed_keep: int = DEFAULT_MALFORMED_KEEP,
    ) -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise FrontierError(f"bad frontier key prefix {prefix!r}")
        if not worker or any(c.isspace() or c == "," for c in worker):
            raise FrontierError(f"bad worker id {worker!r}")
        self.client = client
        self.keys = Keys(prefix)
        self.prefix = prefix
        self.worker = worker
        self.token = token or new_token()
        self.ttl_ms = max(1, int(heartbeat_ttl * 1000))
        self.malformed_keep = max(1, malformed_keep)
        self._lease = client.register_script(_LEASE)
        self._apply = client.register_script(_APPLY)
        self._register = client.register_script(_REGISTER)
        self._beat = client.register_script(_BEAT)
        self._reap = client.register_script(_REAP)
        self._status = client.register_script(_STATUS)
        self._deregister = client.register_script(_DEREGISTER)
        self._release_all = client.register_script(_RELEASE_ALL)

    # -- lifecycle ---------------------------------------------------------

    def check_types(self) -> None:
        """Raise FrontierError if a frontier key holds the wrong Redis type."""
        pipe = self.client.pipeline(transaction=False)
        names = list(_EXPECTED_TYPES)
        for name in names:
            pipe.type(getattr(self.keys, name))
        for name, got in zip(names, pipe.execute()):
            want = _EXPECTED_TYPES[name]
            got = got if isinstance(got, bytes) else str(got).encode()
            if got not in (b"none", want):
                raise FrontierError(
                    f"Redis key {getattr(self.keys, name)!r} is a "
                    f"{_TYPE_NAMES.get(got, got.decode())}, expected a {_TYPE_NAMES[want]}"
                )

    def register(self) -> tuple[int, str | None]:
        """Start heartbeating; put back leases left under this worker id.

        Returns (leases put back, token of the previous holder if its
        heartbeat was still alive).
        """
        k = self.keys
        n, prev = self._register(
            keys=[k.heartbeat(self.worker), k.leases(self.worker), k.workers,
                  k.requests, k.start_urls, k.malformed],
            args=[self.worker, self.token, self.ttl_ms],
        )
        return int(n), (prev.decode() if prev else None)

    def heartbeat(self) -> int:
        """1 renewed, 0 had lapsed (leases may have been reaped), -1 id taken over."""
        k = self.keys
        return int(self._beat(
            keys=[k.heartbeat(self.worker), k.workers],
            args=[self.worker, self.token, self.ttl_ms],
        ))

    def deregister(self) -> int:
        """Put back every lease still held and stop heartbeating.

        Returns the number put back, or -1 if another process took this id
        over (then nothing is touched).
        """
        k = self.keys
        return int(self._deregister(
            keys=[k.heartbeat(self.worker), k.leases(self.worker), k.workers,
                  k.requests, k.start_urls, k.malformed],
            args=[self.worker, self.token],
        ))

    def release_all(self) -> int:
        """Put back every lease this worker holds (e.g. orphans of a lost reply)."""
        k = self.keys
        return int(self._release_all(
            keys=[k.leases(self.worker), k.requests, k.start_urls, k.malformed]
        ))

    def reap(self) -> list[tuple[str, int]]:
        """Requeue the leases of every worker whose heartbeat expired."""
        k = self.keys
        flat = self._reap(
            keys=[k.workers, k.requests, k.start_urls, k.malformed], args=[self.prefix]
        )
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    # -- work --------------------------------------------------------------

    def lease(
        self, n: int, token: str | None = None, *, start_urls: bool = True
    ) -> tuple[list[Lease], Status]:
        """Lease up to *n* entries; also return the cluster status after it.

        Retrying with the same *token* after a lost reply returns the same
        leases instead of taking new ones.
        """
        k = self.keys
        flat, st, mine = self._lease(
            keys=[k.requests, k.start_urls, k.leases(self.worker), k.workers, k.seq,
                  k.op(token or new_token())],
            args=[max(0, n), self.worker, 1 if start_urls else 0, OP_TTL, self.prefix],
        )
        leases = []
        for i in range(0, len(flat), 2):
            lid, value = flat[i].decode(), flat[i + 1]
            kind = value[:1].decode("latin-1")
            payload = value[1:]
            if kind == "r":
                member = payload.partition(b"|")[2]
                try:
                    payload = split_entry(member)
                except ValueError:
                    kind, payload = "x", member
            leases.append(Lease(lid, kind, payload))
        return leases, Status(*(int(x) for x in st), int(mine))

    def apply(self, ops: Sequence[Op], token: str | None = None) -> list[int]:
        """Apply a batch of writes atomically; one result code per op.

        Codes: ``DONE`` (1), ``DUPLICATE`` (0, dropped by the dupefilter),
        ``STALE`` (2, the lease is no longer ours), ``REPLAYED`` (-1: a push
        of a batch whose *token* was applied before). Applying a batch twice
        changes nothing the second time; only batches with a ``dont_filter``
        push need the same *token* for that.
        """
        if not ops:
            return []
        args: list[Any] = [OP_TTL, self.malformed_keep]
        guarded = False
        for op in ops:
            args.append(op.code)
            args.extend(op.args)
            guarded = guarded or (op.code == "P" and not op.args[0])
        k = self.keys
        res = self._apply(
            keys=[k.requests, k.dupefilter, k.leases(self.worker), k.seq,
                  k.op(token or new_token()) if guarded else "", k.malformed, k.start_urls],
            args=args,
        )
        return [int(r) for r in res]

    def seed(self, items: Iterable[tuple[str, str | bytes]], batch: int = 500) -> tuple[int, int]:
        """Queue ``(fingerprint, entry)`` pairs not seen before: (new, duplicate)."""
        new = dup = 0
        chunk: list[Op] = []

        def flush() -> None:
            nonlocal new, dup
            for r in self.apply(chunk):
                if r == DONE:
                    new += 1
                else:
                    dup += 1
            chunk.clear()

        for fp, entry in items:
            chunk.append(Op.push(fp, entry))
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        return new, dup

    def status(self) -> Status:
        k = self.keys
        return Status(*(int(x) for x in self._status(
            keys=[k.requests, k.start_urls, k.workers], args=[self.prefix]
        )))

    def held(self) -> dict[str, bytes]:
        """This worker's leases as stored in Redis (for tests and debugging)."""
        return {
            k.decode(): v
            for k, v in self.client.hgetall(self.keys.leases(self.worker)).items()
        }


__all__ = [
    "DONE", "DUPLICATE", "REPLAYED", "STALE", "Frontier", "FrontierError", "Keys",
    "Lease", "Op", "Status", "connect", "new_token", "split_entry",
]
