"""The call board of a single process: live calls in a dictionary.

Every method runs without awaiting anything, so on one event loop each is
atomic: two sessions answering at once are served one after the other, and
the second finds the call answered. Ended calls are kept for `keep_ended`
seconds, for a session that resumes to learn how its calls ended.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from dataclasses import replace
from datetime import datetime

from calls.callflow.board import Actor, CallRecord, busy, decide_accept, decide_end, not_ringing
from calls.callflow.states import CallStatus, EndReason
from calls.wire import protocol
from calls.wire.errors import SignalingError
from calls.wire.text import username_key

# Seconds an ended call stays readable (`get`) by default: the runtime passes a resume's
# grace and a margin (calls/process/runtime.py).
KEEP_ENDED = 60.0


class MemoryCallBoard:
    def __init__(self, keep_ended: float = KEEP_ENDED) -> None:
        self.keep_ended = keep_ended
        self._live: dict[str, CallRecord] = {}
        # Live call ids by party: username key -> ids, session channel -> ids.
        self._by_user: defaultdict[str, set[str]] = defaultdict(set)
        self._by_session: defaultdict[str, set[str]] = defaultdict(set)
        # Ended calls, oldest first, with the monotonic time they may be forgotten.
        self._ended: OrderedDict[str, tuple[float, CallRecord]] = OrderedDict()

    # --- Transitions ----------------------------------------------------

    async def start(self, record: CallRecord, caller_multi: bool, callee_multi: bool) -> CallRecord:
        if not caller_multi and self._by_user.get(username_key(record.caller_username)):
            raise SignalingError(protocol.ALREADY_IN_CALL, "You are already in a call; end it first")
        if not callee_multi and self._by_user.get(username_key(record.callee_username)):
            refused = busy(record)
            self._keep(refused)
            return refused
        self._live[record.call_id] = record
        self._index(record)
        return record

    async def accept(self, call_id: str, callee: Actor, now: datetime) -> CallRecord:
        record = self._live.get(call_id)
        if record is None:
            raise not_ringing()
        answered = decide_accept(record, callee, now)
        self._live[call_id] = answered
        self._by_session[answered.callee_channel].add(call_id)
        return answered

    async def end(self, call_id: str, reason: EndReason, actor: Actor, party: bool, now: datetime) -> CallRecord | None:
        record = self._live.get(call_id)
        if record is None:
            return None
        ended = decide_end(record, reason, actor, party, now)
        if ended is None:
            return None
        del self._live[call_id]
        self._unindex(record)
        self._keep(ended)
        return ended

    # --- Reads ------------------------------------------------------------

    async def get(self, call_ids: list[str]) -> dict[str, CallRecord]:
        self._forget_old()
        found = {}
        for call_id in call_ids:
            record = self._live.get(call_id)
            if record is None and call_id in self._ended:
                record = self._ended[call_id][1]
            if record is not None:
                found[call_id] = record
        return found

    async def calls_of_session(self, session: str) -> list[str]:
        return list(self._by_session.get(session, ()))

    async def ringing_for(self, username: str) -> list[CallRecord]:
        key = username_key(username)
        ringing = [
            self._live[call_id]
            for call_id in self._by_user.get(key, ())
            if self._live[call_id].status == CallStatus.RINGING
            and username_key(self._live[call_id].callee_username) == key
        ]
        return sorted(ringing, key=lambda record: record.created_at)

    async def move_session(self, old: str, new: str) -> None:
        for call_id in self._by_session.pop(old, set()):
            record = self._live[call_id]
            if record.caller_channel == old:
                record = replace(record, caller_channel=new)
            if record.callee_channel == old:
                record = replace(record, callee_channel=new)
            self._live[call_id] = record
            self._by_session[new].add(call_id)

    async def overdue(self, now: datetime) -> list[str]:
        return [
            record.call_id
            for record in self._live.values()
            if record.status == CallStatus.RINGING and record.ring_deadline is not None and record.ring_deadline <= now
        ]

    async def live(self) -> list[CallRecord]:
        return list(self._live.values())

    async def renew(self, channels: list[str], ttl: float) -> None:
        """Nothing expires here: calls live as long as the process does."""

    async def restore(self, records: list[CallRecord]) -> int:
        """Nothing to restore: this board is lost only with its process."""
        return 0

    async def clear(self) -> None:
        self._live.clear()
        self._by_user.clear()
        self._by_session.clear()
        self._ended.clear()

    async def close(self) -> None:
        pass

    # --- Indexes ----------------------------------------------------------

    def _index(self, record: CallRecord) -> None:
        self._by_user[username_key(record.caller_username)].add(record.call_id)
        self._by_user[username_key(record.callee_username)].add(record.call_id)
        for channel in (record.caller_channel, record.callee_channel):
            if channel:
                self._by_session[channel].add(record.call_id)

    def _unindex(self, record: CallRecord) -> None:
        for index, keys in (
            (self._by_user, (username_key(record.caller_username), username_key(record.callee_username))),
            (self._by_session, (record.caller_channel, record.callee_channel)),
        ):
            for key in keys:
                ids = index.get(key)
                if ids is not None:
                    ids.discard(record.call_id)
                    if not ids:
                        del index[key]

    def _keep(self, record: CallRecord) -> None:
        self._forget_old()
        self._ended[record.call_id] = (time.monotonic() + self.keep_ended, record)

    def _forget_old(self) -> None:
        now = time.monotonic()
        while self._ended:
            call_id, (until, _) = next(iter(self._ended.items()))
            if until > now:
                return
            del self._ended[call_id]
