"""The Redis Store adapter: one Lua script makes each commit atomic; every key of a tenant shares one cluster slot.

Layout (``P`` is the key prefix, default ``stateline``; ``T`` is ``P:{tenant}``, so the hash tag
``{tenant}`` puts all of a tenant's keys in one Redis Cluster slot):

* ``T:rev`` the tenant's last revision; ``T:c`` a hash revision -> change record (the JSON body
  ``decode_change`` reads); ``T:feed`` a one-entry Redis stream whose entry id is ``<revision>-1``,
  which ``watch`` waits on with ``XREAD BLOCK``; ``T:cfirst`` the first revision ``T:c`` keeps
  once ``trim_changes`` removed older ones.
* ``T:i:<namespace>|<key>`` one hash per item (value, version, revision, created, updated, expires);
  ``T:z:<namespace>`` a sorted set of the namespace's keys (all scores 0, so ``ZRANGEBYLEX`` gives
  UTF-8 byte order, which is code-point order); ``T:nss`` the namespaces; ``T:exp`` items with a
  TTL scored by their logical expiry, for ``sweep``.
* ``T:s:<stream>`` a sorted set of events scored by seq; ``T:seqs`` a hash stream -> last seq;
  ``T:streams`` the stream names.
* ``P:tenants`` the tenants that ever tried to commit (checked against ``T:rev`` when listed).

Expiry is logical: the commit stores the expiry computed from the injected clock and every read
and check compares it with the clock. A Redis expiry (``PEXPIRE``) of TTL plus a generous grace
(``expiry_grace``, default 300 s) is only a backstop that reclaims memory; it never fires while the
clock still considers the item live unless the clock lags Redis' clock by more than the grace.

The commit script validates every check and op before its first write, so a failed check or a
bad increment writes nothing. Needs Redis 7.0 or later (scripts declare flags with a shebang).

Faults: connections have socket and connect timeouts and are never retried by the driver, so a
call during an outage raises ``Unavailable`` within about one timeout. A commit cut off in flight
raises ``Unavailable`` with ``details["outcome"] == "unknown"``: it may or may not have applied
(the change feed tells). Pooled connections that the server closed are replaced on next use.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, Self, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stateline.clock import Clock
from stateline.errors import Conflict, InvalidArgument, StatelineError, Unavailable
from stateline.store.protocol import (
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedIncr,
    PreparedPut,
    Store,
    decode_change,
)
from stateline.types import (
    Absent,
    Change,
    CheckFailure,
    Commit,
    Event,
    Item,
    NamespaceStats,
    StreamAt,
    StreamInfo,
    TenantStats,
    VersionIs,
)

__all__ = ["RedisStore"]

# ---------------------------------------------------------------- Lua

# KEYS: 1 rev, 2 changes, 3 feed, 4 seqs, 5 streams, 6 namespaces, 7 expiries,
#       then per distinct item i: 6+2i its hash, 7+2i its namespace index; then stream zsets.
# ARGV: "now grace_ms n_items n_checks n_ops", meta, then the checks, then the ops; small fields share
#       one argument (fewer arguments are cheaper to send). See RedisStore._commit for their shapes.
_COMMIT_LUA = r"""#!lua
local now_s, grace, n_items, n_checks, n_ops = string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
local now = tonumber(now_s)
local meta = ARGV[2]
grace = tonumber(grace); n_items = tonumber(n_items); n_checks = tonumber(n_checks); n_ops = tonumber(n_ops)
local a = 3
local fmt = string.format

-- an item's namespace and key, read back from its key names: T .. 'i:' .. ns .. '|' .. key and T .. 'z:' .. ns
local tlen = #KEYS[1] - 3
local function names(i)
  local ns = string.sub(KEYS[7 + 2 * i], tlen + 3)
  return ns, string.sub(KEYS[6 + 2 * i], tlen + #ns + 4)
end

local items = {}
local function load(i)
  local s = items[i]
  if s then return s end
  -- the value itself is read only by an incr (see value())
  local r = redis.call('HMGET', KEYS[6 + 2 * i], 'n', 'c', 'e')
  s = {phys = (r[1] ~= false), orig_e = r[3]}
  if r[1] and (r[3] == '' or r[3] == false or tonumber(r[3]) > now) then
    s.live = true; s.n = tonumber(r[1]); s.c = r[2]
    if r[3] ~= '' and r[3] ~= false then s.e = r[3] end
  else
    s.live = false
  end
  items[i] = s
  return s
end

local seqs = {}
local function last_seq(stream)
  local v = seqs[stream]
  if v == nil then
    v = tonumber(redis.call('HGET', KEYS[4], stream) or '0')
    seqs[stream] = v
  end
  return v
end

-- checks
local failed = {}
for i = 1, n_checks do
  local arg = ARGV[a]
  local kind = string.sub(arg, 1, 1)
  if kind == 's' then
    local want = tonumber(string.sub(arg, 2))
    local seq = last_seq(ARGV[a + 1])
    a = a + 2
    if seq ~= want then failed[#failed + 1] = i; failed[#failed + 1] = seq end
  else
    a = a + 1
    local ref, want = string.match(arg, '^.(%d+) ?(%d*)$')
    want = tonumber(want)
    local s = load(tonumber(ref))
    local ok
    if kind == 'v' then ok = s.live and s.n == want
    elseif kind == 'a' then ok = not s.live
    else ok = s.live end
    if not ok then
      failed[#failed + 1] = i
      if s.live then failed[#failed + 1] = s.n else failed[#failed + 1] = -1 end
    end
  end
end
if #failed > 0 then return {0, failed} end

-- exact signed 64-bit addition on decimal strings (Lua numbers are doubles), built on first use
local iadd
local function make_iadd()
local MAXS = '9223372036854775807'
local function magcmp(x, y)
  if #x ~= #y then if #x < #y then return -1 else return 1 end end
  if x == y then return 0 end
  if x < y then return -1 else return 1 end
end
local function digits(out, k)
  local s = {}
  for m = k, 1, -1 do s[#s + 1] = string.char(48 + out[m]) end
  return table.concat(s)
end
local function magadd(x, y)
  local out, carry, i, j = {}, 0, #x, #y
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(x, i) - 48 end
    if j > 0 then d = d + string.byte(y, j) - 48 end
    if d >= 10 then out[#out + 1] = d - 10; carry = 1 else out[#out + 1] = d; carry = 0 end
    i = i - 1; j = j - 1
  end
  return digits(out, #out)
end
local function magsub(x, y)
  local out, borrow, i, j = {}, 0, #x, #y
  while i > 0 do
    local d = string.byte(x, i) - 48 - borrow
    if j > 0 then d = d - (string.byte(y, j) - 48) end
    if d < 0 then d = d + 10; borrow = 1 else borrow = 0 end
    out[#out + 1] = d
    i = i - 1; j = j - 1
  end
  local k = #out
  while k > 1 and out[k] == 0 do k = k - 1 end
  return digits(out, k)
end
local function add(x, y)
  local xn, yn = string.sub(x, 1, 1) == '-', string.sub(y, 1, 1) == '-'
  local xm, ym = x, y
  if xn then xm = string.sub(x, 2) end
  if yn then ym = string.sub(y, 2) end
  if #xm <= 15 and #ym <= 15 then return fmt('%d', tonumber(x) + tonumber(y)) end
  local neg, mag
  if xn == yn then
    neg, mag = xn, magadd(xm, ym)
  else
    local c = magcmp(xm, ym)
    if c == 0 then return '0' end
    if c > 0 then neg, mag = xn, magsub(xm, ym) else neg, mag = yn, magsub(ym, xm) end
  end
  if magcmp(mag, MAXS) > 0 then return nil end
  if neg then return '-' .. mag end
  return mag
end
return add
end

-- ops: stage everything, validate, write nothing yet
local rev = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
local rev_s = fmt('%d', rev)
local body = {'{"at":', now_s, ',"meta":', meta, ',"ops":['}
local res = {}
local adds, add_order = {}, {}
local trims = {}
for j = 1, n_ops do
  local arg = ARGV[a]
  local kind = string.sub(arg, 1, 1)
  if j > 1 then body[#body + 1] = ',' end
  if kind == 'p' then
    local i, ttl = string.match(arg, '^p(%d+) (%d*)$')
    i = tonumber(i)
    local head, val = ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    local s = load(i)
    local ver = 1
    if s.live then ver = s.n + 1 else s.c = now_s end
    s.v = val; s.n = ver; s.live = true; s.dirty = true
    if ttl ~= '' then s.e = fmt('%d', now + tonumber(ttl)); s.pexp = tonumber(ttl) else s.e = nil; s.pexp = 0 end
    body[#body + 1] = head .. fmt('%d', ver) .. ',"value":' .. val .. ',"exp":' .. (s.e or 'null') .. '}'
    res[#res + 1] = ver; res[#res + 1] = ''
  elseif kind == 'd' then
    local i, head = tonumber(string.sub(arg, 2)), ARGV[a + 1]
    a = a + 2
    local s = load(i)
    local ver = 0
    if s.live then ver = s.n end
    s.live = false; s.dirty = true; s.v = nil; s.n = nil; s.e = nil; s.pexp = nil
    body[#body + 1] = head .. fmt('%d', ver) .. '}'
    res[#res + 1] = 0; res[#res + 1] = ''
  elseif kind == 'i' then
    local i, by, ttl = string.match(arg, '^i(%d+) (%-?%d+) (%d*)$')
    i = tonumber(i)
    local head = ARGV[a + 1]
    a = a + 2
    local s = load(i)
    local base, ver
    if s.live then
      if s.v == nil then s.v = redis.call('HGET', KEYS[6 + 2 * i], 'v') end
      base = s.v
      if not string.match(base, '^%-?%d+$') then return {2, j, 'nonint'} end
      ver = s.n + 1
    else
      base = '0'; ver = 1; s.c = now_s
      if ttl ~= '' then s.e = fmt('%d', now + tonumber(ttl)); s.pexp = tonumber(ttl) else s.e = nil; s.pexp = 0 end
    end
    if iadd == nil then iadd = make_iadd() end
    local val = iadd(base, by)
    if val == nil then return {2, j, 'overflow'} end
    s.v = val; s.n = ver; s.live = true; s.dirty = true
    body[#body + 1] = head .. fmt('%d', ver) .. ',"value":' .. val .. ',"exp":' .. (s.e or 'null') .. '}'
    res[#res + 1] = ver; res[#res + 1] = val
  elseif kind == 'a' then
    local zi, n = string.match(arg, '^a(%d+) (%d+)$')
    zi = tonumber(zi); n = tonumber(n)
    local stream, head = ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    local first = last_seq(stream) + 1
    local list = adds[zi]
    if list == nil then
      list = {stream = stream, fresh = (first == 1), z = {}}
      adds[zi] = list; add_order[#add_order + 1] = zi
    end
    body[#body + 1] = head
    for k = 0, n - 1 do
      local typ, data, emeta = ARGV[a], ARGV[a + 1], ARGV[a + 2]
      a = a + 3
      local seq_s = fmt('%d', first + k)
      if k > 0 then body[#body + 1] = ',' end
      body[#body + 1] = '{"seq":' .. seq_s .. ',"type":"' .. typ .. '","data":' .. data .. ',"meta":' .. emeta .. '}'
      list.z[#list.z + 1] = seq_s
      list.z[#list.z + 1] = '[' .. seq_s .. ',' .. rev_s .. ',' .. now_s .. ',"' .. typ .. '",'
        .. data .. ',' .. emeta .. ']'
    end
    body[#body + 1] = ']}'
    seqs[stream] = first + n - 1
    list.last = first + n - 1
    res[#res + 1] = first + n - 1; res[#res + 1] = ''
  else -- 't'
    local zi, before = string.match(arg, '^t(%d+) (%d+)$')
    zi = tonumber(zi); before = tonumber(before)
    local frag = ARGV[a + 1]
    a = a + 2
    if trims[zi] == nil or trims[zi] < before then trims[zi] = before end
    body[#body + 1] = frag
    res[#res + 1] = 0; res[#res + 1] = ''
  end
end
body[#body + 1] = ']}'

-- every check held and every op is valid: write. The feed entry goes first: it is the only
-- write that can fail (its id must grow), and then nothing else has been written.
redis.call('XADD', KEYS[3], 'MAXLEN', '1', rev_s .. '-1', 'r', rev_s)
for i = 1, n_items do
  local s = items[i]
  if s and s.dirty then
    local hk, zk = KEYS[6 + 2 * i], KEYS[7 + 2 * i]
    local had_exp = s.orig_e ~= false and s.orig_e ~= nil and s.orig_e ~= ''
    local member = string.sub(hk, tlen + 3)  -- "<namespace>|<key>", its name in the expiry index
    if s.live then
      redis.call('HSET', hk, 'v', s.v, 'n', fmt('%d', s.n), 'r', rev_s, 'c', s.c, 'u', now_s, 'e', s.e or '')
      if not s.phys then
        local ns, key = names(i)
        redis.call('ZADD', zk, 0, key)
        redis.call('SADD', KEYS[6], ns)
      end
      if s.pexp == 0 then
        -- a hash carries a Redis expiry only while it has a logical one
        if had_exp then redis.call('PERSIST', hk); redis.call('ZREM', KEYS[7], member) end
      elseif s.pexp ~= nil then
        redis.call('PEXPIRE', hk, fmt('%d', math.ceil(s.pexp / 1000) + grace))
        redis.call('ZADD', KEYS[7], s.e, member)
      end
    elseif s.phys then
      redis.call('DEL', hk)
      local _, key = names(i)
      redis.call('ZREM', zk, key)
      if had_exp then redis.call('ZREM', KEYS[7], member) end
    end
  end
end
for _, zi in ipairs(add_order) do
  local list = adds[zi]
  local z = list.z
  for k = 1, #z, 512 do
    redis.call('ZADD', KEYS[zi], unpack(z, k, math.min(k + 511, #z)))
  end
  redis.call('HSET', KEYS[4], list.stream, fmt('%d', list.last))
  if list.fresh then redis.call('ZADD', KEYS[5], 0, list.stream) end
end
for zi, before in pairs(trims) do
  redis.call('ZREMRANGEBYSCORE', KEYS[zi], '-inf', '(' .. fmt('%d', before))
end
redis.call('SET', KEYS[1], rev_s)
redis.call('HSET', KEYS[2], rev_s, table.concat(body))
return {1, rev, res}
"""

# KEYS: 1 namespace index. ARGV: now, start, stop, limit, item hash prefix ("T:i:<ns>|").
_SCAN_LUA = r"""#!lua flags=no-writes
local now = tonumber(ARGV[1])
local start, stop, limit, pfx = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local out, found = {}, 0
local batch = limit
if batch < 64 then batch = 64 end
while found < limit do
  local members = redis.call('ZRANGEBYLEX', KEYS[1], start, stop, 'LIMIT', 0, batch)
  for _, m in ipairs(members) do
    local r = redis.call('HMGET', pfx .. m, 'v', 'n', 'r', 'c', 'u', 'e')
    if r[2] and (r[6] == '' or tonumber(r[6]) > now) then
      out[#out + 1] = m
      for k = 1, 6 do out[#out + 1] = r[k] end
      found = found + 1
      if found >= limit then break end
    end
  end
  if #members < batch then break end
  start = '(' .. members[#members]
end
return out
"""

# KEYS: 1 rev, 2 changes. ARGV: after, limit.
_CHANGES_LUA = r"""#!lua flags=no-writes
local after, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local hi = after + limit
if hi > cur then hi = cur end
if hi <= after then return {} end
local fields = {}
for r = after + 1, hi do fields[#fields + 1] = string.format('%d', r) end
return redis.call('HMGET', KEYS[2], unpack(fields))
"""

# KEYS: 1 rev, 2 changes, 3 first kept. ARGV: before, limit. Removes the oldest records, returns how many.
_TRIM_CHANGES_LUA = r"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = tonumber(redis.call('GET', KEYS[3]) or '1')
local stop = math.min(tonumber(ARGV[1]) - 1, cur, first + tonumber(ARGV[2]) - 1)
if stop < first then return 0 end
local fields = {}
for r = first, stop do
  fields[#fields + 1] = string.format('%d', r)
  if #fields == 1000 then redis.call('HDEL', KEYS[2], unpack(fields)); fields = {} end
end
if #fields > 0 then redis.call('HDEL', KEYS[2], unpack(fields)) end
redis.call('SET', KEYS[3], string.format('%d', stop + 1))
return stop - first + 1
"""

# KEYS: 1 streams, 2 seqs. ARGV: start, stop, limit, stream key prefix ("T:s:").
_LIST_STREAMS_LUA = r"""#!lua flags=no-writes
local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, n in ipairs(names) do
  local last = tonumber(redis.call('HGET', KEYS[2], n) or '0')
  local head = redis.call('ZRANGE', ARGV[4] .. n, 0, 0, 'WITHSCORES')
  local first = last + 1
  if head[2] then first = tonumber(head[2]) end
  out[#out + 1] = n; out[#out + 1] = first; out[#out + 1] = last
end
return out
"""

# KEYS: 1 namespace index. ARGV: now, start, batch, item hash prefix. Returns {items, bytes, last member}.
_NS_STATS_LUA = r"""#!lua flags=no-writes
local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, tonumber(ARGV[3]))
local n, bytes = 0, 0
for _, m in ipairs(members) do
  local e = redis.call('HGET', ARGV[4] .. m, 'e')
  if e and (e == '' or tonumber(e) > now) then
    n = n + 1
    bytes = bytes + redis.call('HSTRLEN', ARGV[4] .. m, 'v')
  end
end
return {n, bytes, members[#members] or false, #members}
"""

# KEYS: 1 expiries. ARGV: now, limit, tenant key prefix ("T:").
_SWEEP_LUA = r"""#!lua
local now, limit, t = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
local removed = 0
for _, m in ipairs(due) do
  local hk = t .. 'i:' .. m
  local e = redis.call('HGET', hk, 'e')
  if e == false or (e ~= '' and tonumber(e) <= now) then
    local bar = string.find(m, '|', 1, true)
    redis.call('DEL', hk)
    redis.call('ZREM', t .. 'z:' .. string.sub(m, 1, bar - 1), string.sub(m, bar + 1))
    redis.call('ZREM', KEYS[1], m)
    removed = removed + 1
  elseif e == '' then
    redis.call('ZREM', KEYS[1], m)
  else
    redis.call('ZADD', KEYS[1], e, m)
  end
end
return removed
"""

_COMMIT_SHA = hashlib.sha1(_COMMIT_LUA.encode()).hexdigest()  # noqa: S324  # the script cache's name, not security

# ---------------------------------------------------------------- helpers

_OPTIONS = {"prefix", "expiry_grace", "socket_timeout", "connect_timeout", "max_connections", "watch"}
_PASSTHROUGH = {
    "client_name",
    "health_check_interval",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
}
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "OOM", "NOREPLICAS")


def _positive(value: object, field: str, maximum: float) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]  # URL options arrive as text, keyword options as numbers
    except (TypeError, ValueError):
        raise InvalidArgument(field, f"must be a number of seconds, got {value!r}") from None
    if not 0 < f <= maximum:
        raise InvalidArgument(field, f"must be above 0 and at most {maximum:g}, got {value!r}")
    return f


def _check_prefix(value: object) -> str:
    if type(value) is not str or not value or len(value) > 64:
        raise InvalidArgument("prefix", "must be 1 to 64 characters")
    if any(not (ch.isascii() and (ch.isalnum() or ch in "_.:-")) for ch in value):
        raise InvalidArgument("prefix", f"{value!r}: use letters, digits and _.:- only")
    return value


@lru_cache(maxsize=4096)
def _fixed_keys(prefix: str, tenant: str) -> tuple[str, tuple[str, ...]]:
    """The tenant's key prefix and the keys every commit declares (the order the commit script expects)."""
    t = f"{prefix}:{{{tenant}}}:"
    return t, (t + "rev", t + "c", t + "feed", t + "seqs", t + "streams", t + "nss", t + "exp")


_PUT_OR_DELETE = (PreparedPut, PreparedDelete)


@lru_cache(maxsize=65536)
def _item_keys(t: str, ns: str, key: str) -> tuple[str, str]:
    return (f"{t}i:{ns}|{key}", f"{t}z:{ns}")


@lru_cache(maxsize=65536)
def _head(op: str, ns: str, key: str) -> bytes:
    """The change-record fragment of an item op up to its version, as ``ChangeRecorder`` encodes it."""
    return b'{"op":"%s","ns":%s,"key":%s,"version":' % (op.encode(), orjson.dumps(ns), orjson.dumps(key))


def _bstr(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


# ---------------------------------------------------------------- the adapter


class RedisStore(Store):
    """The Store on a Redis server (7.0+): ``redis://host:port/db?prefix=NAME`` or ``rediss://`` for TLS.

    Options (keyword arguments or URL query parameters): ``prefix`` (key prefix, default
    ``stateline``), ``expiry_grace`` (seconds the Redis backstop expiry lags the logical one,
    default 300), ``socket_timeout`` (default 5 s), ``connect_timeout`` (default 2 s),
    ``max_connections`` (a bound on the pool: callers then wait up to ``socket_timeout`` for a
    connection; default unbounded, one per concurrent caller), ``watch`` (``xread``, the default, or ``poll``).
    See ``docs/redis.md`` for what durability Redis gives.

    ``from_url`` is the usual way in. A ``redis.Redis`` client given to the constructor must not
    retry commands by itself (``Retry(NoBackoff(), 0)``): a resent commit could apply twice.
    """

    scheme = "redis"

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "stateline",
        expiry_grace: float = 300.0,
        socket_timeout: float = 5.0,
        watch: str = "xread",
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        super().__init__(clock=clock, **options)
        self._r = client
        self._exec: Callable[..., Any] = client.execute_command
        self._prefix = _check_prefix(prefix)
        self._grace_ms = round(_positive(expiry_grace, "expiry_grace", 10 * 365 * 86400) * 1000)
        if watch not in ("xread", "poll"):
            raise InvalidArgument("watch", f"must be 'xread' or 'poll', got {watch!r}")
        self._poll = watch == "poll"
        self._block_s = min(10.0, max(0.01, socket_timeout / 2))
        self._tenants_key = f"{self._prefix}:tenants"
        self._registered: set[str] = set()
        self._reg_lock = threading.Lock()
        self._scan_script = client.register_script(_SCAN_LUA)
        self._changes_script = client.register_script(_CHANGES_LUA)
        self._list_streams_script = client.register_script(_LIST_STREAMS_LUA)
        self._ns_stats_script = client.register_script(_NS_STATS_LUA)
        self._sweep_script = client.register_script(_SWEEP_LUA)
        self._trim_changes_script = client.register_script(_TRIM_CHANGES_LUA)

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        """Open ``redis://[user:password@]host:port/db?prefix=NAME&...`` (``rediss://`` for TLS)."""
        if not isinstance(url, str):
            raise InvalidArgument("url", "must be a string")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise InvalidArgument("url", f"not a redis:// or rediss:// URL: {url!r}")
        mine: dict[str, Any] = {}
        passthrough: list[tuple[str, str]] = []
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k in _OPTIONS or k == "max_value_bytes":
                mine[k] = v
            elif k in _PASSTHROUGH:
                passthrough.append((k, v))
            else:
                raise InvalidArgument("url", f"unknown option {k!r}")
        mine.update(options)
        if "max_value_bytes" in mine:
            try:
                mine["max_value_bytes"] = int(mine["max_value_bytes"])
            except (TypeError, ValueError):
                raise InvalidArgument("max_value_bytes", "must be an integer") from None
        socket_timeout = _positive(mine.pop("socket_timeout", 5.0), "socket_timeout", 3600)
        connect_timeout = _positive(mine.pop("connect_timeout", 2.0), "connect_timeout", 3600)
        max_conn = mine.pop("max_connections", None)
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),  # never resend: a resent commit could apply twice
        }
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(passthrough), ""))
        try:
            if max_conn is None:
                pool: redis.ConnectionPool = redis.ConnectionPool.from_url(clean, **common)
            else:
                try:
                    max_connections = int(max_conn)
                except (TypeError, ValueError):
                    raise InvalidArgument("max_connections", f"must be an integer, got {max_conn!r}") from None
                if not 1 <= max_connections <= 10_000:
                    raise InvalidArgument("max_connections", "must be between 1 and 10000")
                pool = redis.BlockingConnectionPool.from_url(
                    clean, max_connections=max_connections, timeout=socket_timeout, **common
                )
        except ValueError as exc:
            raise InvalidArgument("url", str(exc)) from None
        client = redis.Redis(connection_pool=pool)
        return cls(client, socket_timeout=socket_timeout, clock=clock, **mine)

    # ------------------------------------------------------------ plumbing

    def _translate(self, exc: Exception, what: str, *, commit: bool = False) -> StatelineError:
        """The stateline error for a driver error."""
        if isinstance(exc, redis.AuthenticationError):
            return StatelineError(f"redis refused the credentials during {what}: {exc}")
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
            if self._closed:
                return Unavailable("the store is closed")
            # the other idle connections likely share this one's fate (a restart, a partition):
            # drop them so that the next calls connect afresh instead of failing one by one
            with contextlib.suppress(Exception):
                self._r.connection_pool.disconnect(inuse_connections=False)
            details = {"outcome": "unknown"} if commit else None
            return Unavailable(f"redis unreachable during {what}: {exc}", details=details)
        msg = str(exc)
        if msg.startswith(_TRANSIENT_REPLIES):
            return Unavailable(f"redis cannot serve {what} now: {msg}")
        if msg.startswith("DB index is out of range"):  # the URL names a database the server does not have
            return InvalidArgument("url", f"the redis server has no such database ({msg})")
        return StatelineError(f"redis error during {what}: {msg}")

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Translate driver errors into the stateline hierarchy."""
        try:
            yield
        except (redis.RedisError, OSError) as exc:
            raise self._translate(exc, what) from exc

    def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a read; a connection found reset (not timed out) is retried once on a fresh one."""
        with self._io(what):
            try:
                return fn()
            except redis.ConnectionError as exc:
                if isinstance(exc, redis.BusyLoadingError | redis.AuthenticationError) or self._closed:
                    raise
                self._r.connection_pool.disconnect(inuse_connections=False)
            return fn()

    def _t(self, tenant: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:"

    def _register(self, tenant: str, *, force: bool = False) -> None:
        # The tenant list is one key outside every tenant's slot, so the commit script cannot
        # write it; registering first (idempotent) makes the list a superset of committed tenants.
        if tenant in self._registered and not force:
            return
        with self._io("commit"):
            self._r.zadd(self._tenants_key, {tenant: 0})
        with self._reg_lock:
            self._registered.add(tenant)

    def _item(self, ns: str, key: str, row: list[Any], now: int) -> Item | None:
        v, n, r, c, u, e = row
        if n is None:
            return None
        exp = int(e) if e else None
        if exp is not None and exp <= now:
            return None
        return Item(ns, key, orjson.loads(v), int(n), int(r), int(c), int(u), exp)

    # ------------------------------------------------------------ commit

    def _commit(self, c: PreparedCommit) -> Commit:
        tenant = c.tenant
        if tenant not in self._registered:
            self._register(tenant)
        t, fixed = _fixed_keys(self._prefix, tenant)
        keys: list[Any] = [_COMMIT_SHA, 0, *fixed]  # EVALSHA sha numkeys keys... args...
        item_idx: dict[tuple[str, str], int] = {}
        args: list[Any] = []
        stream_refs: list[int] = []  # positions in args of ops that name a stream's KEYS index, fixed below
        stream_names: list[str] = []
        stream_idx: dict[str, int] = {}

        def item(ns: str, key: str) -> int:
            pair = (ns, key)
            i = item_idx.get(pair)
            if i is None:
                i = item_idx[pair] = len(item_idx) + 1
                keys.extend(_item_keys(t, ns, key))
            return i

        def stream(name: str) -> int:
            zi = stream_idx.get(name)
            if zi is None:
                zi = stream_idx[name] = len(stream_names)
                stream_names.append(name)
            stream_refs.append(len(args))
            return zi

        for chk in c.checks:
            if isinstance(chk, VersionIs):
                args.append(f"v{item(chk.namespace, chk.key)} {chk.version}")
            elif isinstance(chk, StreamAt):
                args += (f"s{chk.seq}", chk.stream)
            else:
                args.append(f"{'a' if isinstance(chk, Absent) else 'e'}{item(chk.namespace, chk.key)}")
        for op in c.ops:
            if isinstance(op, PreparedPut):
                ttl = "" if op.ttl_us is None else op.ttl_us
                i = item(op.namespace, op.key)
                args += (f"p{i} {ttl}", _head("put", op.namespace, op.key), op.value)
            elif isinstance(op, PreparedIncr):
                ttl = "" if op.ttl_us is None else op.ttl_us
                i = item(op.namespace, op.key)
                args += (f"i{i} {op.by} {ttl}", _head("incr", op.namespace, op.key))
            elif isinstance(op, PreparedDelete):
                args += (f"d{item(op.namespace, op.key)}", _head("delete", op.namespace, op.key))
            elif isinstance(op, PreparedAppend):
                head = b'{"op":"append","stream":%s,"events":[' % orjson.dumps(op.stream)
                args += (("a", stream(op.stream), len(op.events)), op.stream, head)
                for e in op.events:
                    args += (e.type, e.data, e.meta)
            else:
                frag = orjson.dumps({"op": "trim", "stream": op.stream, "before": op.before_seq})
                args += (("t", stream(op.stream), op.before_seq), frag)
        if stream_names:
            base = len(keys) - 1  # KEYS are 1-based in Lua; keys[0:2] are the sha and numkeys
            keys.extend(f"{t}s:{name}" for name in stream_names)
            for pos in stream_refs:
                kind, zi, n = args[pos]
                args[pos] = f"{kind}{base + zi} {n}"
        keys[1] = len(keys) - 2
        now = self.clock.now_us()
        keys.append(f"{now} {self._grace_ms} {len(item_idx)} {len(c.checks)} {len(c.ops)}")
        keys.append(c.meta)
        keys += args
        try:
            try:
                out = self._exec("EVALSHA", *keys)
            except redis.exceptions.NoScriptError:  # a restarted or flushed server: load it again
                self._r.script_load(_COMMIT_LUA)
                out = self._exec("EVALSHA", *keys)
        except (redis.RedisError, OSError) as exc:
            raise self._translate(exc, "commit", commit=True) from exc
        status = out[0]
        if status == 1:
            res = out[2]
            versions: dict[tuple[str, str], int] = {}
            counters: dict[tuple[str, str], int] = {}
            seqs: dict[str, int] = {}
            for j, op in enumerate(c.ops):
                if isinstance(op, _PUT_OR_DELETE):
                    versions[(op.namespace, op.key)] = res[2 * j]
                elif isinstance(op, PreparedIncr):
                    versions[(op.namespace, op.key)] = res[2 * j]
                    counters[(op.namespace, op.key)] = int(res[2 * j + 1])
                elif isinstance(op, PreparedAppend):
                    seqs[op.stream] = res[2 * j]
            if out[1] == 1:
                # a tenant's first commit: register again, in case the server lost the list since
                # this process registered it (a restart without persistence, a failover)
                with contextlib.suppress(StatelineError):
                    self._register(tenant, force=True)
            return Commit(out[1], now, versions, counters, seqs)
        if status == 0:
            flat = out[1]
            failures = [
                CheckFailure(c.checks[int(flat[k]) - 1], None if int(flat[k + 1]) < 0 else int(flat[k + 1]))
                for k in range(0, len(flat), 2)
            ]
            raise Conflict(f"{len(failures)} check(s) failed", failures=failures)
        bad = c.ops[int(out[1]) - 1]
        assert isinstance(bad, PreparedIncr)
        if _bstr(out[2]) == "nonint":
            raise InvalidArgument("incr", f"{bad.namespace}/{bad.key} holds a non-integer value")
        raise InvalidArgument("incr", f"{bad.namespace}/{bad.key} would overflow 64 bits")

    # ------------------------------------------------------------ reads

    def _get(self, tenant: str, namespace: str, key: str) -> Item | None:
        hk = f"{self._t(tenant)}i:{namespace}|{key}"
        row = self._read("get", lambda: self._r.hmget(hk, "v", "n", "r", "c", "u", "e"))
        return self._item(namespace, key, row, self.clock.now_us())

    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]:
        t = self._t(tenant)

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            for ns, key in keys:
                pipe.hmget(f"{t}i:{ns}|{key}", "v", "n", "r", "c", "u", "e")
            return pipe.execute()

        rows = self._read("get_many", run)
        now = self.clock.now_us()
        return [self._item(ns, key, row, now) for (ns, key), row in zip(keys, rows, strict=True)]

    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]:
        t = self._t(tenant)
        pb = prefix.encode()
        start = b"(" + after.encode() if after is not None and after >= prefix else b"[" + pb
        stop = b"[" + pb + b"\xff" if prefix else b"+"
        now = self.clock.now_us()
        args: list[Any] = [now, start, stop, limit, f"{t}i:{namespace}|"]
        flat = self._read("scan", lambda: self._scan_script(keys=[f"{t}z:{namespace}"], args=args))
        out: list[Item] = []
        for k in range(0, len(flat), 7):
            it = self._item(namespace, _bstr(flat[k]), flat[k + 1 : k + 7], now)
            if it is not None:
                out.append(it)
        return out

    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]:
        sk = f"{self._t(tenant)}s:{stream}"
        rows = self._read("read_stream", lambda: self._r.zrangebyscore(sk, from_seq, to_seq, start=0, num=limit))
        out = []
        for row in rows:
            seq, rev, at, typ, data, meta = orjson.loads(row)
            out.append(Event(stream, seq, typ, data, meta, rev, at))
        return out

    def _stream_info(self, tenant: str, stream: str) -> StreamInfo:
        t = self._t(tenant)

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            pipe.hget(t + "seqs", stream)
            pipe.zrange(f"{t}s:{stream}", 0, 0, withscores=True)
            return pipe.execute()

        last_raw, head = self._read("stream_info", run)
        last = int(last_raw or 0)
        return StreamInfo(stream, int(head[0][1]) if head else last + 1, last)

    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]:
        t = self._t(tenant)
        pb = prefix.encode()
        start = b"(" + after.encode() if after is not None and after >= prefix else b"[" + pb
        stop = b"[" + pb + b"\xff" if prefix else b"+"
        keys = [t + "streams", t + "seqs"]
        args: list[Any] = [start, stop, limit, t + "s:"]
        flat = self._read("list_streams", lambda: self._list_streams_script(keys=keys, args=args))
        return [StreamInfo(_bstr(flat[k]), int(flat[k + 1]), int(flat[k + 2])) for k in range(0, len(flat), 3)]

    def _revision(self, tenant: str) -> int:
        key = self._t(tenant) + "rev"
        return int(self._read("revision", lambda: self._r.get(key)) or 0)

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        t = self._t(tenant)
        keys, args = [t + "rev", t + "c"], [after_revision, limit]
        bodies = self._read("changes", lambda: self._changes_script(keys=keys, args=args))
        out = []
        for i, body in enumerate(bodies):
            if body is None:
                if i == 0:  # trimmed: raise here, or watch would wake at once and read nothing, again
                    self._unbroken(tenant, after_revision, [])
                # cannot happen while the keyspace is intact: the feed has no gaps
                raise StatelineError(f"change record {after_revision + 1 + i} of {tenant!r} is missing")
            out.append(decode_change(tenant, after_revision + 1 + i, body))
        return out

    def _first_change(self, tenant: str) -> int:
        # trims move T:cfirst with the records they remove, in one script: one read is one snapshot
        key = self._t(tenant) + "cfirst"
        return int(self._read("first_change", lambda: self._r.get(key)) or 1)

    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
        t = self._t(tenant)
        keys, args = [t + "rev", t + "c", t + "cfirst"], [before_revision, limit]
        with self._io("trim_changes"):
            return int(self._trim_changes_script(keys=keys, args=args))

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        deadline = time.monotonic() + timeout
        feed = self._t(tenant) + "feed"
        poll = 0.02
        while True:
            got = self._changes(tenant, after_revision, limit)
            if got or self._closed:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if self._poll:
                time.sleep(min(remaining, poll))
                poll = min(poll * 2, 0.5)
                continue
            block_ms = max(1, int(min(remaining, self._block_s) * 1000))
            try:
                with self._io("watch"):
                    # ids are "<revision>-1": this returns at once if a revision above ours exists
                    self._r.xread({feed: f"{after_revision}-1"}, count=1, block=block_ms)
            except StatelineError as exc:
                if isinstance(exc, Unavailable):
                    raise
                # the server refuses XREAD (an old server or a proxy): poll instead, from now on
                self._poll = True

    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        start = b"(" + after.encode() if after is not None else b"-"
        with self._io("tenants"):
            while len(out) < limit:
                batch = max(limit - len(out), 64)
                names = [_bstr(n) for n in self._r.zrangebylex(self._tenants_key, start, b"+", start=0, num=batch)]
                if not names:
                    break
                pipe = self._r.pipeline(transaction=False)  # not MGET: each tenant's keys have their own slot
                for n in names:
                    pipe.get(self._t(n) + "rev")
                for n, rev in zip(names, pipe.execute(), strict=True):
                    if rev and int(rev) > 0 and len(out) < limit:
                        out.append((n, int(rev)))
                if len(names) < batch:
                    break
                start = b"(" + names[-1].encode()
        return out

    def _stats(self, tenant: str) -> TenantStats:
        t = self._t(tenant)
        now = self.clock.now_us()
        spaces: dict[str, NamespaceStats] = {}
        with self._io("stats"):
            revision = int(self._r.get(t + "rev") or 0)
            for ns in sorted(_bstr(n) for n in self._r.smembers(t + "nss")):
                items = size = 0
                start = b"-"
                while True:
                    n, b, last, count = self._ns_stats_script(
                        keys=[f"{t}z:{ns}"], args=[now, start, 1000, f"{t}i:{ns}|"]
                    )
                    items += int(n)
                    size += int(b)
                    if int(count) < 1000 or last is None:
                        break
                    start = b"(" + last
                if items:
                    spaces[ns] = NamespaceStats(items, size)
            names = [_bstr(n) for n in cast("list[bytes]", self._r.zrange(t + "streams", 0, -1))]
            events = 0
            for k in range(0, len(names), 1000):
                pipe = self._r.pipeline(transaction=False)
                for n in names[k : k + 1000]:
                    pipe.zcard(f"{t}s:{n}")
                events += sum(pipe.execute())
        return TenantStats(revision, spaces, len(names), events)

    def _sweep(self, limit: int) -> int:
        removed = 0
        now = self.clock.now_us()
        after: str | None = None
        with self._io("sweep"):
            while removed < limit:
                page = [tenant for tenant, _ in self._tenant_revisions(after, 1000)]
                for tenant in page:
                    t = self._t(tenant)
                    removed += int(self._sweep_script(keys=[t + "exp"], args=[now, limit - removed, t]))
                    if removed >= limit:
                        break
                if len(page) < 1000:
                    break
                after = page[-1]
        return removed

    def _ping(self) -> None:
        self._read("ping", self._r.ping)

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.connection_pool.disconnect()
