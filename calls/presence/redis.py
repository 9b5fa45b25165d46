"""Session leases in Redis, shared by every process of the service.

Keys (all under `signaling:presence:`):
    leases          sorted set: channel -> lease expiry (Redis server time, ms)
    sessions        hash: channel -> JSON [username, user_id, key]
    user:<key>      set of the user's channels
    online          hash: key -> JSON [username, user_id], for users with at least one session

`key` is `text.username_key(username)`: names that differ only in case or
width have one owner.
    epoch           a random id, written when the data set is new (see `epoch`)
    parked:<channel> JSON state of a session parked by a process shutting down
    held            set of channels whose socket is gone (held for a resume, or parked)

Every change is one Lua script, so a join is atomic across processes: two
processes cannot both hand one username to different user_ids, nor let a user
past the session cap. Expiry uses the Redis server's clock, so processes on
machines whose clocks disagree still agree on which leases ran out. The scripts
derive `user:<username>` keys from data, so presence needs a single Redis (not
a cluster), like the layer's groups do.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from calls.presence.base import JoinRefused, SessionInfo, StoreUnavailable
from calls.wire import protocol, text

logger = logging.getLogger(__name__)

PREFIX = "signaling:presence:"
LEASES = PREFIX + "leases"
SESSIONS = PREFIX + "sessions"
ONLINE = PREFIX + "online"
EPOCH = PREFIX + "epoch"
USER_PREFIX = PREFIX + "user:"
PARKED_PREFIX = PREFIX + "parked:"
HELD = PREFIX + "held"
# Channels per renewal script; the batches of one renewal go in one pipeline.
RENEW_BATCH = 500
EXPIRE_BATCH = 1000

_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# Drop one session from every structure; set `gone` when its user has no session left.
_DROP = """
local function drop(channel, user_prefix)
    local info = redis.call('HGET', KEYS[2], channel)
    redis.call('ZREM', KEYS[1], channel)
    redis.call('SREM', KEYS[4], channel)
    if not info then
        return nil, 0
    end
    redis.call('HDEL', KEYS[2], channel)
    local fields = cjson.decode(info)
    local key = fields[3] or fields[1]
    local user_key = user_prefix .. key
    redis.call('SREM', user_key, channel)
    if redis.call('SCARD', user_key) == 0 then
        redis.call('HDEL', KEYS[3], key)
        return info, 1
    end
    return info, 0
end
"""

# KEYS: leases, sessions, online, user:<key>, held.
# ARGV: channel, key, user_id, max, ttl_ms, info, online entry, displaced channel...
# Returns {1} (user came online), {0} (joined), or {-1 (username taken) or -2 (too many
# sessions), then channel, info of each session that holds the name against it}.
JOIN = (
    _NOW_MS
    + """
-- Sessions whose lease ran out (a dead process) hold neither the name nor a slot.
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local expires = redis.call('ZSCORE', KEYS[1], channel)
    if not expires or tonumber(expires) <= now then
        redis.call('SREM', KEYS[4], channel)
        redis.call('ZREM', KEYS[1], channel)
        redis.call('HDEL', KEYS[2], channel)
    end
end
local total = redis.call('SCARD', KEYS[4])
if total == 0 then
    redis.call('HDEL', KEYS[3], ARGV[2])
end
-- Displaced sessions (found dead, or held for a resume) count for nothing.
local displaced = {}
for i = 8, #ARGV do
    displaced[ARGV[i]] = true
end
local others = {}
local taken = false
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local info = redis.call('HGET', KEYS[2], channel)
    if info and channel ~= ARGV[1] and not displaced[channel] then
        table.insert(others, channel)
        table.insert(others, info)
        if cjson.decode(info)[2] ~= ARGV[3] then
            taken = true
        end
    end
end
if taken then
    table.insert(others, 1, -1)
    return others
end
if #others / 2 >= tonumber(ARGV[4]) then
    table.insert(others, 1, -2)
    return others
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
-- The first session's written name stays the user's name while any session is online.
redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[7])
if total == 0 then
    return {1}
end
return {0}
"""
)

# KEYS: leases, sessions, online, held. ARGV: channel, user prefix. Returns nil or {info, gone}.
LEAVE = (
    _DROP
    + """
local info, gone = drop(ARGV[1], ARGV[2])
if not info then
    return nil
end
return {info, gone}
"""
)

# KEYS: leases. ARGV: ttl_ms, channel... Returns the channels that had no lease.
RENEW = (
    _NOW_MS
    + """
local expires = now + tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
    if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
        redis.call('ZADD', KEYS[1], expires, ARGV[i])
    else
        table.insert(missing, ARGV[i])
    end
end
return missing
"""
)

# KEYS: leases, sessions, online, held. ARGV: user prefix, limit. Returns {channel, info, ...}.
EXPIRE = (
    _NOW_MS
    + _DROP
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, channel in ipairs(dead) do
    local info = drop(channel, ARGV[1])
    if info then
        table.insert(out, channel)
        table.insert(out, info)
    end
end
return out
"""
)

# KEYS: leases, user:<key>, sessions, held. Returns {channel, info, held, ...} of the user's sessions
# whose lease has not run out.
SESSIONS_OF = (
    _NOW_MS
    + """
local live = {}
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local expires = redis.call('ZSCORE', KEYS[1], channel)
    local info = redis.call('HGET', KEYS[3], channel)
    if expires and tonumber(expires) > now and info then
        table.insert(live, channel)
        table.insert(live, info)
        table.insert(live, redis.call('SISMEMBER', KEYS[4], channel))
    end
end
return live
"""
)

# KEYS: leases, parked:<channel>, held. ARGV: channel, ttl_ms, state.
PARK = (
    _NOW_MS
    + """
redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[2]))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('SADD', KEYS[3], ARGV[1])
end
return 1
"""
)

# KEYS: parked:<channel>. ARGV: nonce. Returns the state, deleted, if the nonce matches.
CLAIM = """
local state = redis.call('GET', KEYS[1])
if not state or cjson.decode(state)['nonce'] ~= ARGV[1] then
    return nil
end
redis.call('DEL', KEYS[1])
return state
"""

# KEYS: sessions, held. ARGV: channel, 1 (held) or 0. Only a listed session can be held.
SET_HELD = """
if ARGV[2] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
    redis.call('SADD', KEYS[2], ARGV[1])
else
    redis.call('SREM', KEYS[2], ARGV[1])
end
return 1
"""

# KEYS: epoch. ARGV: a new id. Returns the current id, writing ARGV[1] if there was none.
EPOCH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
    return current
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

P = ParamSpec("P")
T = TypeVar("T")


def _unavailable_on_connection_errors(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn a lost or refused Redis connection into StoreUnavailable."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    return wrapper


class RedisPresenceStore:
    """Leases in Redis: every process sees the same sessions, and a dead one's lapse."""

    shared = True

    def __init__(self, url: str, client: aioredis.Redis | None = None) -> None:
        # Few, fast retries: a request waiting on a Redis that is down should fail
        # within a second or two, and the background jobs retry on their own.
        self.redis = client or aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._join = self.redis.register_script(JOIN)
        self._leave = self.redis.register_script(LEAVE)
        self._renew = self.redis.register_script(RENEW)
        self._expire = self.redis.register_script(EXPIRE)
        self._sessions_of = self.redis.register_script(SESSIONS_OF)
        self._epoch = self.redis.register_script(EPOCH_SCRIPT)
        self._park = self.redis.register_script(PARK)
        self._claim = self.redis.register_script(CLAIM)
        self._set_held = self.redis.register_script(SET_HELD)

    @staticmethod
    def _join_args(
        session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()
    ) -> tuple[list[str], list[Any]]:
        key = text.username_key(session.username)
        keys = [LEASES, SESSIONS, ONLINE, USER_PREFIX + key, HELD]
        info = json.dumps([session.username, session.user_id, key])
        online = json.dumps([session.username, session.user_id])
        return keys, [session.channel, key, session.user_id, max_sessions, _ms(ttl), info, online, *displace]

    @staticmethod
    def _join_result(result: list[Any], max_sessions: int) -> bool:
        code = int(result[0])
        holders = tuple(_session(channel, info) for channel, info in zip(result[1::2], result[2::2], strict=True))
        if code == -1:
            raise JoinRefused(protocol.USERNAME_TAKEN, "That username is in use by another user_id", holders)
        if code == -2:
            raise JoinRefused(protocol.TOO_MANY_SESSIONS, f"At most {max_sessions} sessions per user", holders)
        return code == 1

    @_unavailable_on_connection_errors
    async def join(self, session: SessionInfo, max_sessions: int, ttl: float, displace: Collection[str] = ()) -> bool:
        keys, args = self._join_args(session, max_sessions, ttl, displace)
        return self._join_result(await self._join(keys=keys, args=args), max_sessions)

    @_unavailable_on_connection_errors
    async def restore(
        self, sessions: list[SessionInfo], max_sessions: int, ttl: float
    ) -> list[tuple[SessionInfo, JoinRefused]]:
        pipe = self.redis.pipeline(transaction=False)
        for session in sessions:
            keys, args = self._join_args(session, max_sessions, ttl)
            await self._join(keys=keys, args=args, client=pipe)
        refused = []
        for session, result in zip(sessions, await pipe.execute(), strict=True):
            try:
                self._join_result(result, max_sessions)
            except JoinRefused as exc:
                refused.append((session, exc))
        return refused

    @_unavailable_on_connection_errors
    async def leave(self, channel: str) -> tuple[SessionInfo | None, bool]:
        result = await self._leave(keys=[LEASES, SESSIONS, ONLINE, HELD], args=[channel, USER_PREFIX])
        if result is None:
            return None, False
        info, gone = result
        return _session(channel, info), bool(int(gone))

    @_unavailable_on_connection_errors
    async def renew(self, channels: list[str], ttl: float) -> list[str]:
        if not channels:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(channels), RENEW_BATCH):
            await self._renew(keys=[LEASES], args=[_ms(ttl), *channels[start : start + RENEW_BATCH]], client=pipe)
        return [channel for missing in await pipe.execute() for channel in missing]

    @_unavailable_on_connection_errors
    async def expire(self) -> list[SessionInfo]:
        gone: list[SessionInfo] = []
        while True:
            result = await self._expire(keys=[LEASES, SESSIONS, ONLINE, HELD], args=[USER_PREFIX, EXPIRE_BATCH])
            gone += [_session(channel, info) for channel, info in zip(result[::2], result[1::2], strict=True)]
            if len(result) < 2 * EXPIRE_BATCH:
                return gone

    @_unavailable_on_connection_errors
    async def online_users(self) -> list[dict[str, str]]:
        users = [json.loads(entry) for entry in (await self.redis.hvals(ONLINE))]
        return [{"username": username, "user_id": user_id} for username, user_id in sorted(users)]

    @_unavailable_on_connection_errors
    async def sessions_of(self, username: str) -> list[SessionInfo]:
        keys = [LEASES, USER_PREFIX + text.username_key(username), SESSIONS, HELD]
        result = await self._sessions_of(keys=keys)
        triples = zip(result[::3], result[1::3], result[2::3], strict=True)
        return [replace(_session(channel, info), held=bool(int(held))) for channel, info, held in triples]

    @_unavailable_on_connection_errors
    async def live_channels(self) -> set[str]:
        return set(await self.redis.hkeys(SESSIONS))

    @_unavailable_on_connection_errors
    async def epoch(self) -> str:
        return await self._epoch(keys=[EPOCH], args=[uuid.uuid4().hex])

    @_unavailable_on_connection_errors
    async def park(self, channel: str, state: dict, ttl: float) -> None:
        await self._park(keys=[LEASES, PARKED_PREFIX + channel, HELD], args=[channel, _ms(ttl), json.dumps(state)])

    @_unavailable_on_connection_errors
    async def set_held(self, channel: str, held: bool) -> None:
        await self._set_held(keys=[SESSIONS, HELD], args=[channel, int(held)])

    @_unavailable_on_connection_errors
    async def claim_parked(self, channel: str, nonce: str) -> dict | None:
        state = await self._claim(keys=[PARKED_PREFIX + channel], args=[nonce])
        return None if state is None else json.loads(state)

    @_unavailable_on_connection_errors
    async def clear(self) -> None:
        keys = [key async for key in self.redis.scan_iter(match=PREFIX + "*", count=1000)]
        if keys:
            await self.redis.delete(*keys)

    async def close(self) -> None:
        await self.redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _session(channel: str, info: str) -> SessionInfo:
    username, user_id, *_ = json.loads(info)
    return SessionInfo(channel, username, user_id)
