"""The call board in Redis, shared by every process: one Lua script per transition.

Keys (all under `signaling:calls:`):
    call:<id>        hash: `status`, and `record` (the call as JSON, times in ms)
    user:<key>       set of the live calls of a user (`text.username_key`)
    session:<chan>   set of the live calls a session made or answered
    live             set of every live call
    deadlines        sorted set: ringing call -> ring deadline (ms)

A transition reads the call and its indexes and writes them in one script, so
it is atomic across processes: of two devices answering at once one script
runs first and the other finds the call answered; a busy check and the call it
allows cannot interleave with another start. The end rules are the ones of
calls/callflow/board.py, written into the script from the tables of
calls/callflow/states.py.

Expiry: a live call's key (and its sessions' and parties' sets) lasts
`live_ttl` seconds and is extended whenever the lease keeper renews one of its
sessions (`renew`), so calls of a Redis whose every process died vanish on
their own; an ended call stays readable for `keep_ended` seconds. Set members
whose call expired are dropped by the scripts that meet them. Like presence, the scripts derive keys from data: a
single Redis, not a cluster.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from calls.callflow.board import Actor, CallRecord, busy, not_ringing
from calls.callflow.board_lua import ACCEPT, END, MOVE, RENEW, RESTORE, RINGING_FOR, SESSION_CALLS, START
from calls.callflow.board_memory import KEEP_ENDED
from calls.callflow.states import EndReason
from calls.wire import protocol
from calls.wire.errors import SignalingError
from calls.wire.text import username_key

PREFIX = "signaling:calls:"
LIVE = PREFIX + "live"
DEADLINES = PREFIX + "deadlines"


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


def _moment(ms: Any) -> datetime | None:
    return None if not isinstance(ms, int | float) else datetime.fromtimestamp(ms / 1000, UTC)


def encode(record: CallRecord) -> str:
    return json.dumps(
        {
            "call_id": record.call_id,
            "caller": record.caller_username,
            "caller_key": username_key(record.caller_username),
            "caller_id": record.caller_id,
            "callee": record.callee_username,
            "callee_key": username_key(record.callee_username),
            "status": record.status,
            "end_reason": record.end_reason,
            "caller_channel": record.caller_channel,
            "callee_channel": record.callee_channel,
            "pushed": record.pushed,
            "deadline": _ms(record.ring_deadline),
            "caller_device": record.caller_device,
            "callee_device": record.callee_device,
            "created": _ms(record.created_at),
            "answered": _ms(record.answered_at),
            "ended": _ms(record.ended_at),
        },
        separators=(",", ":"),
    )


def decode(raw: str | bytes) -> CallRecord:
    call = json.loads(raw)
    return CallRecord(
        call_id=call["call_id"],
        caller_username=call["caller"],
        caller_id=call["caller_id"],
        callee_username=call["callee"],
        status=call["status"],
        end_reason=call.get("end_reason") or None,
        caller_channel=call["caller_channel"],
        callee_channel=call["callee_channel"],
        pushed=bool(call["pushed"]),
        ring_deadline=_moment(call.get("deadline")),
        caller_device=call.get("caller_device") or "",
        callee_device=call.get("callee_device") or "",
        created_at=_moment(call.get("created")),
        answered_at=_moment(call.get("answered")),
        ended_at=_moment(call.get("ended")),
    )


class RedisCallBoard:
    def __init__(self, url: str, live_ttl: float, keep_ended: float = KEEP_ENDED) -> None:
        # No retries: a script whose reply was lost with the connection may have run, and
        # running a transition twice answers differently (a second accept is refused). A
        # failed step reaches its caller: the client's request gets an error, the reaper
        # sweeps again.
        # A connection idle for 30 s is checked (PING) before a script goes on it: a Redis
        # restart or an idle cut is found before a transition, not by one. A Redis that
        # stalls fails a step within the timeouts, as presence's do, instead of holding it.
        self.redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
            socket_connect_timeout=2,
            socket_timeout=5,
        )
        self.live_ttl_ms = round(live_ttl * 1000)
        self.keep_ms = round(keep_ended * 1000)
        self._start = self.redis.register_script(START)
        self._accept = self.redis.register_script(ACCEPT)
        self._end = self.redis.register_script(END)
        self._session_calls = self.redis.register_script(SESSION_CALLS)
        self._ringing_for = self.redis.register_script(RINGING_FOR)
        self._move = self.redis.register_script(MOVE)
        self._renew = self.redis.register_script(RENEW)
        self._restore = self.redis.register_script(RESTORE)

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{PREFIX}{kind}:{name}"

    async def start(self, record: CallRecord, caller_multi: bool, callee_multi: bool) -> CallRecord:
        keys = [
            self._key("call", record.call_id),
            self._key("user", username_key(record.caller_username)),
            self._key("user", username_key(record.callee_username)),
            self._key("session", record.caller_channel),
            LIVE,
            DEADLINES,
        ]
        args = [
            encode(record),
            int(caller_multi),
            int(callee_multi),
            self.live_ttl_ms,
            _ms(record.ring_deadline),
            record.call_id,
            PREFIX,
        ]
        try:
            ringing = await self._start(keys=keys, args=args)
        except ResponseError as exc:
            if "ALREADY_IN_CALL" in str(exc):
                raise SignalingError(protocol.ALREADY_IN_CALL, "You are already in a call; end it first") from None
            raise
        if ringing:
            return record
        return busy(record)

    async def accept(self, call_id: str, callee: Actor, now: datetime) -> CallRecord:
        args = [
            username_key(callee.username),
            callee.session,
            callee.device,
            _ms(now),
            self.live_ttl_ms,
            call_id,
            PREFIX,
        ]
        try:
            raw = await self._accept(keys=[self._key("call", call_id), DEADLINES], args=args)
        except ResponseError as exc:
            if "NOT_RINGING" in str(exc):
                raise not_ringing() from None
            raise
        return decode(raw)

    async def end(self, call_id: str, reason: EndReason, actor: Actor, party: bool, now: datetime) -> CallRecord | None:
        key = username_key(actor.username) if party else ""
        args = [reason, int(party), key, _ms(now), self.keep_ms, call_id, PREFIX]
        try:
            raw = await self._end(keys=[self._key("call", call_id), LIVE, DEADLINES], args=args)
        except ResponseError as exc:
            if "NOT_RINGING" in str(exc):
                raise not_ringing() from None
            raise
        return decode(raw) if raw else None

    async def get(self, call_ids: list[str]) -> dict[str, CallRecord]:
        if not call_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for call_id in call_ids:
                pipe.hget(self._key("call", call_id), "record")
            found = await pipe.execute()
        return {call_id: decode(raw) for call_id, raw in zip(call_ids, found, strict=True) if raw}

    async def calls_of_session(self, session: str) -> list[str]:
        return list(await self._session_calls(keys=[self._key("session", session)], args=[PREFIX]))

    async def ringing_for(self, username: str) -> list[CallRecord]:
        key = username_key(username)
        found = [decode(raw) for raw in await self._ringing_for(keys=[self._key("user", key)], args=[key, PREFIX])]
        return sorted(found, key=lambda record: record.created_at)

    async def move_session(self, old: str, new: str) -> None:
        keys = [self._key("session", old), self._key("session", new)]
        await self._move(keys=keys, args=[old, new, PREFIX, self.live_ttl_ms])

    async def overdue(self, now: datetime) -> list[str]:
        return list(await self.redis.zrangebyscore(DEADLINES, "-inf", _ms(now)))

    async def live(self) -> list[CallRecord]:
        ids = list(await self.redis.smembers(LIVE))
        found = await self.get(ids)
        gone = [call_id for call_id in ids if call_id not in found or not found[call_id].live]
        if gone:
            await self.redis.srem(LIVE, *gone)
        return [record for record in found.values() if record.live]

    async def renew(self, channels: list[str], ttl: float) -> None:
        for start in range(0, len(channels), 500):
            await self._renew(args=[max(self.live_ttl_ms, round(ttl * 1000)), PREFIX, *channels[start : start + 500]])

    async def restore(self, records: list[CallRecord]) -> int:
        args: list[Any] = [self.live_ttl_ms, PREFIX]
        for record in records:
            args += [record.call_id, record.status, encode(record), _ms(record.ring_deadline) or 0]
        return int(await self._restore(keys=[LIVE, DEADLINES], args=args)) if records else 0

    async def clear(self) -> None:
        keys = [key async for key in self.redis.scan_iter(match=PREFIX + "*", count=1000)]
        if keys:
            await self.redis.delete(*keys)

    async def close(self) -> None:
        await self.redis.aclose()
