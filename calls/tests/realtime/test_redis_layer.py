"""Covers calls.realtime.redis_layer: the pub/sub layer publishing in batches, against a real redis-server.

Two layers on one event loop stand for two processes: each has its own
connections to Redis, so what one sends reaches the other only through Redis.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from django.core.exceptions import ImproperlyConfigured
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from calls.realtime import redis_layer
from calls.realtime.redis_layer import TESTED_VERSIONS, SignalingPubSubLayer, check_versions
from calls.testing.services import RedisServer
from calls.tests.netclient import TIMEOUT

pytestmark = pytest.mark.services


@pytest.fixture
async def layers(redis_server: RedisServer) -> AsyncIterator[tuple[SignalingPubSubLayer, SignalingPubSubLayer]]:
    """A sending and a receiving layer, as on two processes; both flushed afterwards."""
    sender = SignalingPubSubLayer(hosts=[redis_server.url])
    receiver = SignalingPubSubLayer(hosts=[redis_server.url])
    yield sender, receiver
    for layer in (sender, receiver):
        await layer.flush()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the same redis-server, for what the test asks of Redis itself."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Inbox:
    """What the receiving layer hears on one new channel (in `group`), read by one task all along.

    Cancelling a `receive()` makes channels-redis drop the channel (it takes it for the
    consumer leaving), so the test waits on this queue, never on `receive()` itself.
    """

    def __init__(self, receiver: SignalingPubSubLayer, channel: str) -> None:
        self.channel = channel
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read(receiver))

    @classmethod
    async def open(cls, receiver: SignalingPubSubLayer, group: str = "people") -> Inbox:
        channel = await receiver.new_channel()
        await receiver.group_add(group, channel)
        return cls(receiver, channel)

    async def _read(self, receiver: SignalingPubSubLayer) -> None:
        while True:
            self.messages.put_nowait(await receiver.receive(self.channel))

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout)


@pytest.fixture
async def inbox(layers) -> AsyncIterator[Callable[[], Awaitable[Inbox]]]:
    """Open inboxes on the receiving layer; their readers are stopped afterwards."""
    opened: list[Inbox] = []

    async def open_inbox() -> Inbox:
        opened.append(await Inbox.open(layers[1]))
        return opened[-1]

    yield open_inbox
    for box in opened:
        box.reader.cancel()
    await asyncio.gather(*(box.reader for box in opened), return_exceptions=True)


def count_writes(layer: SignalingPubSubLayer, channel: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the writes to Redis of the publisher that carries `channel`: one entry per write, its command count."""
    connection = layer._get_layer().publisher_for(channel).connection
    assert connection is not None, "send once first: the publisher connects on its first message"
    writes: list[int] = []
    original = connection.send_packed_command

    async def counted(command: Any, check_health: bool = True) -> None:
        writes.append(b"".join(command).count(b"PUBLISH"))
        await original(command, check_health)

    monkeypatch.setattr(connection, "send_packed_command", counted)
    return writes


async def publish_calls(admin: aioredis.Redis) -> int:
    return (await admin.info("commandstats")).get("cmdstat_publish", {}).get("calls", 0)


async def test_sends_issued_in_one_loop_iteration_go_to_redis_in_one_pipeline(layers, inbox, admin, monkeypatch):
    sender, _ = layers
    box = await inbox()
    await sender.send(box.channel, {"type": "warm.up"})
    assert await box.next() == {"type": "warm.up"}
    writes = count_writes(sender, box.channel, monkeypatch)
    before = await publish_calls(admin)

    await asyncio.gather(
        *(sender.send(box.channel, {"type": "direct", "n": n}) for n in range(25)),
        *(sender.group_send("people", {"type": "group", "n": n}) for n in range(25)),
    )

    assert writes == [50]
    assert await publish_calls(admin) - before == 50
    received = [await box.next() for _ in range(50)]
    assert [(m["type"], m["n"]) for m in received] == [("direct", n) for n in range(25)] + [
        ("group", n) for n in range(25)
    ]


async def test_interleaved_sends_and_group_sends_arrive_in_the_order_they_were_sent(layers, inbox, monkeypatch):
    sender, _ = layers
    box = await inbox()
    await sender.send(box.channel, {"type": "warm.up"})
    await box.next()
    writes = count_writes(sender, box.channel, monkeypatch)

    sends: list[asyncio.Future] = []
    for n in range(1000):
        message = {"type": "numbered", "n": n}
        send = sender.send(box.channel, message) if n % 3 else sender.group_send("people", message)
        sends.append(asyncio.ensure_future(send))
        if n % 37 == 36:
            # Let a batch leave: the next ones queue behind it while it is on its way.
            await sends[-1]
    await asyncio.gather(*sends)

    assert [(await box.next())["n"] for _ in range(1000)] == list(range(1000))
    assert sum(writes) == 1000 and 27 <= len(writes) < 1000


async def test_a_channel_hears_its_group_until_it_leaves_it(layers, inbox):
    sender, receiver = layers
    staying, leaving = await inbox(), await inbox()
    await receiver.group_discard("people", leaving.channel)
    await sender.group_send("people", {"type": "hello"})
    await sender.send(leaving.channel, {"type": "direct"})
    assert await staying.next() == {"type": "hello"}
    # The direct message was published after the group's: had the group's reached `leaving`, it would come first.
    assert await leaving.next() == {"type": "direct"}


async def test_an_error_reply_during_a_flush_reaches_every_sender_and_the_next_batch_is_sent(layers, inbox, admin):
    sender, _ = layers
    box = await inbox()
    await sender.send(box.channel, {"type": "warm.up"})
    await box.next()
    await admin.execute_command("ACL", "SETUSER", "default", "-publish")

    outcomes = await asyncio.gather(
        *(sender.send(box.channel, {"type": "refused", "n": n}) for n in range(10)),
        *(sender.group_send("people", {"type": "refused", "n": n}) for n in range(10)),
        return_exceptions=True,
    )

    assert len(outcomes) == 20
    assert all(isinstance(outcome, NoPermissionError) for outcome in outcomes), outcomes
    await admin.execute_command("ACL", "SETUSER", "default", "+publish")
    # Nineteen replies of the failed batch were never read: the next batch must not take them for its own.
    await asyncio.gather(
        sender.send(box.channel, {"type": "after"}), sender.group_send("people", {"type": "after.group"})
    )
    assert await box.next() == {"type": "after"}
    assert await box.next() == {"type": "after.group"}


async def test_every_sender_gets_the_error_while_redis_is_down_and_sends_work_again_after_it_restarts(
    layers, inbox, redis_server
):
    sender, _ = layers
    box = await inbox()
    await sender.send(box.channel, {"type": "before"})
    assert await box.next() == {"type": "before"}

    redis_server.stop()
    outcomes = await asyncio.gather(
        *(sender.send(box.channel, {"type": "lost"}) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(outcome, RedisConnectionError) for outcome in outcomes), outcomes

    redis_server.start()
    # The receiving layer subscribes again on its own schedule (channels-redis retries every
    # second): send as a caller that retries would, until a message gets through.
    async with asyncio.timeout(20):
        for attempt in itertools.count():
            try:
                await sender.send(box.channel, {"type": "after", "attempt": attempt})
                message = await box.next(timeout=0.5)
                break
            except (RedisConnectionError, TimeoutError):
                continue
    assert message["type"] == "after"
    await sender.group_send("people", {"type": "after.group"})
    while (message := await box.next())["type"] == "after":
        pass  # earlier attempts that arrived late
    assert message == {"type": "after.group"}


def test_it_refuses_versions_it_was_not_tested_with():
    check_versions(dict(TESTED_VERSIONS))
    with pytest.raises(ImproperlyConfigured, match="channels-redis 4.3.0, but found channels-redis 4.4.0"):
        check_versions({**TESTED_VERSIONS, "channels-redis": "4.4.0"})


async def test_messages_beyond_the_queue_limit_are_refused_at_once_and_the_rest_arrive(layers, inbox, monkeypatch):
    # Relayed signals are not waited for: while Redis is slow, only the limit bounds the queue.
    monkeypatch.setattr(redis_layer, "MAX_QUEUED", 5)
    sender, _ = layers
    box = await inbox()
    sent = [sender.send_soon(box.channel, {"type": "signal", "n": n}) for n in range(7)]
    outcomes = await asyncio.gather(*sent, return_exceptions=True)
    assert outcomes[:5] == [None] * 5
    assert all(isinstance(outcome, ChannelFull) for outcome in outcomes[5:])
    assert [(await box.next())["n"] for _ in range(5)] == list(range(5))
