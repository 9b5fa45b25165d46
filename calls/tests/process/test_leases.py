"""Covers calls.process.leases: `LeaseKeeper` alone, among one process's parts (`process_parts`).

Its sessions are stand-ins registered in a real `SessionRegistry`, its layer the in-memory one.

Renewal and lapses run on the memory store with a fake clock (`clock`); the store
losing its data (a Redis restart) runs on a real redis-server, whose data `clear()`
wipes, epoch and all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from calls.presence.base import SessionInfo
from calls.presence.memory import MemoryPresenceStore
from calls.presence.redis import RedisPresenceStore
from calls.realtime.groups import PRESENCE_GROUP, user_group
from calls.wire import events, protocol


@pytest.fixture
async def memory(clock, process_parts):
    """A process on the memory store, its lease keeper started."""
    process = process_parts(MemoryPresenceStore())
    await process.leases.start()
    return process


@pytest.fixture
async def redis_store(redis_server) -> AsyncIterator[RedisPresenceStore]:
    store = RedisPresenceStore(redis_server.url)
    yield store
    await store.close()


async def channels_of(store: Any, username: str) -> list[str]:
    return sorted(session.channel for session in await store.sessions_of(username))


# --- renew -------------------------------------------------------------------------------


async def test_renew_extends_the_leases_of_this_process_sessions(memory, clock):
    alice = await memory.session("alice", "u-a")
    clock.advance(memory.LEASE - 1)
    await memory.leases.renew()
    clock.advance(memory.LEASE - 1)  # past the first lease, within the renewed one
    assert await memory.store.expire() == []
    assert await channels_of(memory.store, "alice") == [alice.channel_name]
    assert memory.announced == 0


async def test_renew_joins_again_a_session_whose_lease_lapsed_and_announces_it(memory, clock):
    alice = await memory.session("alice", "u-a")
    clock.advance(memory.LEASE + 1)  # this process stalled: another one's reaper expired the lease
    assert await memory.store.expire() == [alice.session]

    await memory.leases.renew()

    assert await memory.store.sessions_of("alice") == [alice.session]
    assert await memory.store.online_users() == [{"username": "alice", "user_id": "u-a"}]
    assert memory.announced == 1
    assert (alice.errors, alice.closed_with) == ([], None)


async def test_a_lapsed_session_whose_name_went_to_another_user_meanwhile_is_told_and_closed_with_1012(memory, clock):
    alice = await memory.session("alice", "u-a")
    bob = await memory.session("bob", "u-b")
    clock.advance(memory.LEASE + 1)
    await memory.store.expire()
    await memory.store.join(SessionInfo("elsewhere", "Alice", "u-other"), 5, memory.LEASE)

    await memory.leases.renew()

    assert alice.errors == [(protocol.USERNAME_TAKEN, "That username is in use by another user_id")]
    assert alice.closed_with == protocol.CLOSE_SERVICE_RESTART
    assert await channels_of(memory.store, "alice") == ["elsewhere"]
    # Only the session that lost its name is refused: the other one is listed again.
    assert (bob.errors, bob.closed_with) == ([], None)
    assert await channels_of(memory.store, "bob") == [bob.channel_name]
    assert memory.announced == 1


# --- check_store: the store lost its data ---------------------------------------------------


@pytest.mark.services
async def test_check_store_with_the_same_data_set_restores_nothing(redis_store, process_parts):
    process = process_parts(redis_store)
    await process.leases.start()
    alice = await process.session("alice", "u-a")
    await process.leases.check_store(await process.layer.new_channel())
    assert process.announced == 0
    assert await channels_of(redis_store, "alice") == [alice.channel_name]
    assert process.leases.may_reap_vanished()


@pytest.mark.services
async def test_check_store_after_a_restart_restores_the_leases_and_the_groups(redis_store, process_parts):
    process = process_parts(redis_store)
    layer, keeper = process.layer, process.leases
    await keeper.start()
    before = keeper.epoch
    alice = await process.session("alice", "u-a")
    bob = await process.session("bob", "u-b")
    process_channel = await layer.new_channel()
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def listen() -> None:
        """This process's own channel, as the runtime reads it: probes answered, the rest kept."""
        while True:
            event = await layer.receive(process_channel)
            if event["type"] == events.RUNTIME_PROBE:
                keeper.layer_probe_arrived(event["token"])
            else:
                await heard.put(event)

    listener = asyncio.get_running_loop().create_task(listen())
    try:
        # Redis restarted: every lease and the epoch are gone, and so are the layer's groups
        # (this layer never had them).
        await redis_store.clear()

        await keeper.check_store(process_channel)

        assert await channels_of(redis_store, "alice") == [alice.channel_name]
        assert await channels_of(redis_store, "bob") == [bob.channel_name]
        assert await redis_store.online_users() == [
            {"username": "alice", "user_id": "u-a"},
            {"username": "bob", "user_id": "u-b"},
        ]
        assert process.announced == 1
        assert keeper.epoch == await redis_store.epoch() != before
        # Other processes are still writing theirs back: a missing session is not a dead one yet.
        assert not keeper.may_reap_vanished()

        # The groups are back: the process hears presence changes, each session its user's events.
        await layer.group_send(PRESENCE_GROUP, {"type": "presence.changed", "origin": "elsewhere"})
        assert (await asyncio.wait_for(heard.get(), 5))["origin"] == "elsewhere"
        for session in (alice, bob):
            await layer.group_send(user_group(session.session.username), {"type": "call.incoming", "n": 1})
            assert await asyncio.wait_for(layer.receive(session.channel_name), 5) == {"type": "call.incoming", "n": 1}
        assert (alice.errors, bob.errors) == ([], [])
    finally:
        listener.cancel()
