"""The channel layer over Redis: channels-redis's pub/sub layer, publishing in batches.

Why: channels-redis 4.3.0's `RedisPubSubChannelLayer` awaits one PUBLISH round
trip per `send` and `group_send`, one at a time behind a lock, through redis-py's
per-command machinery (a pooled connection, a retry wrapper, a read timer): a
socket write, a wake-up and a reply parse per message. Relaying ICE candidates
between two daphne processes through Redis (bench/run.py's `relay_two_processes`:
20 calls, 4 candidates in flight each) reached 2,300-2,800 messages per
CPU-second of both processes, against 13,700-15,000 on one process in memory.

Here every message sent during one event-loop iteration, and while the batch
before it is on its way, goes to Redis as one pipeline of PUBLISH commands on one
connection (`Publisher`; ~6-9 messages a batch under that load): one write, the
replies read under one timer. The same relay reached 5,500-6,000 messages per
CPU-second (6,000-6,500 with redis-py's `hiredis` parser installed), ~0.4 of the
in-memory figure. What remains is mostly the cost of two half-loaded processes:
per message, their WebSocket reads and writes and their loops' wake-ups cost
about twice what they do in one saturated process (py-spy); this layer's own
work is about a sixth of each process's CPU.

Each caller awaits its own message's outcome: an error reaches every caller of
the batch (a caller that retries while Redis is down still sees it), and the
connection is opened afresh for the next batch. Batches leave one at a time in
the order their messages were sent, on one connection per Redis host, so what a
process publishes reaches each channel in the order it was sent, `send` and
`group_send` alike (across several Redis hosts, per host only). A batch is never
retried: a message is delivered at most once, as with channels-redis.

Subscriptions, `receive`, groups and `flush` are channels-redis's, with two
changes on the receiving side: the read loop blocks on the socket (`Subscriber`)
instead of polling it every 0.1 s, which cost a timer per message, and the
layer's connections speak RESP2 (redis-py parses a pub/sub message in RESP3 for
a quarter more CPU). Together: 15 instead of 24 microseconds of CPU per message
received (7 instead of 13 with hiredis).

This relies on channels-redis internals (the per-loop layer class, its shard
connections, the group channel name) and on redis-py's `math.inf` read timeout:
it was written for `TESTED_VERSIONS`, and refuses to start with any other.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from channels.exceptions import ChannelFull
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _consistent_hash, _wrap_close, create_pool, decode_hosts
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from calls.realtime.versions import require_tested

logger = logging.getLogger(__name__)

# The versions this module was written and tested for (requirements.lock pins them).
TESTED_VERSIONS = {"channels-redis": "4.3.0", "redis": "8.1.0"}


def check_versions(installed: dict[str, str | None] | None = None) -> None:
    """Refuse to run with versions of channels-redis or redis-py this layer was not tested with."""
    require_tested(
        TESTED_VERSIONS, installed, "calls/realtime/redis_layer.py relies on", "check the layer against the new version"
    )


# Messages that may wait for Redis on one connection, and seconds a batch may take, when
# Redis stalls without closing the connection (a pause, a partition, a fail-over).
MAX_QUEUED = 10_000
BATCH_TIMEOUT = 5.0


class PublisherClosed(ConnectionError):
    """The layer was flushed or closed before a message queued for Redis was sent."""


class Publisher:
    """One Redis connection that sends the messages queued while it was busy as one pipeline, in order."""

    def __init__(self, host: dict[str, Any]) -> None:
        self.pool: ConnectionPool = create_pool(host)
        self.connection: AbstractConnection | None = None
        self._commands: list[tuple[str, str, bytes]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None

    def publish(self, channel: str, data: bytes) -> asyncio.Future[None]:
        """Queue one message; the future is done once Redis has taken it (or failed).

        While Redis does not answer, at most MAX_QUEUED messages wait: more are
        refused at once (relayed signals are not waited for, so nothing else bounds them).
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if len(self._commands) >= MAX_QUEUED:
            waiter.set_exception(ChannelFull(f"{len(self._commands)} messages already wait for Redis"))
            return waiter
        self._commands.append(("PUBLISH", channel, data))
        self._waiters.append(waiter)
        if self._flusher is None:
            # It first runs on the loop's next iteration: everything sent during this one goes along.
            self._flusher = loop.create_task(self._send_queued())
        return waiter

    async def close(self) -> None:
        """Stop sending, fail what is still queued, and close the connection."""
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        self._fail(self._waiters, PublisherClosed("the channel layer was flushed"))
        self._commands, self._waiters = [], []
        if self.connection is not None:
            await self.pool.release(self.connection)
            self.connection = None
        await self.pool.disconnect()

    async def _send_queued(self) -> None:
        try:
            while self._commands:
                commands, waiters = self._commands, self._waiters
                self._commands, self._waiters = [], []
                try:
                    await self._send(commands)
                except asyncio.CancelledError:
                    self._fail(waiters, PublisherClosed("the channel layer was flushed"))
                    raise
                except Exception as exc:  # noqa: BLE001 - every caller gets what went wrong
                    self._fail(waiters, exc)
                else:
                    for waiter in waiters:
                        if not waiter.done():  # its caller was cancelled: the message went anyway
                            waiter.set_result(None)
        finally:
            self._flusher = None

    async def _send(self, commands: list[tuple[str, str, bytes]]) -> None:
        connection = await self._connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
            # One timeout for the whole batch: redis-py's own would start a timer per reply.
            async with asyncio.timeout(connection.socket_timeout or BATCH_TIMEOUT):
                for _ in commands:
                    await connection.read_response(timeout=math.inf)
        except BaseException:
            # Replies may be left unread: the next batch must not read them as its own.
            await connection.disconnect(nowait=True)
            raise

    async def _connection(self) -> AbstractConnection:
        if self.connection is None:
            self.connection = await self.pool.get_connection()
        elif self.connection.is_connected and await self.connection.can_read():
            # Nothing is owed to us: the server closed the socket (Redis restarted) or sent
            # what we did not ask for. Connect afresh (send_packed_command connects).
            await self.connection.disconnect(nowait=True)
        return self.connection

    @staticmethod
    def _fail(waiters: list[asyncio.Future[None]], exc: BaseException) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)


class Subscriber(RedisSingleShardConnection):
    """channels-redis's subscriber connection, reading by blocking on the socket instead of polling it."""

    async def _do_receiving(self) -> None:
        while True:
            try:
                if self._pubsub and self._pubsub.subscribed:
                    # Blocks until a message comes (no timer per message); a closed
                    # socket raises, and the next read reconnects and subscribes again.
                    self._receive_message(await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None))
                else:
                    await asyncio.sleep(0.1)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - as channels-redis: log, wait, read again
                logger.warning("channel layer: reading from Redis failed (%r); retrying in 1 s", exc)
                await asyncio.sleep(1)


class BatchedLoopLayer(RedisPubSubLoopLayer):
    """The layer of one event loop: channels-redis's, publishing through a `Publisher` per Redis host."""

    def __init__(self, hosts: list[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(hosts, *args, **kwargs)
        # RESP2 unless the host says otherwise: redis-py parses a pub/sub message in RESP3 for
        # a quarter more CPU (a push-notification handler per message), and nothing here needs RESP3.
        decoded = [{"protocol": 2, **host} for host in decode_hosts(hosts)]
        self._shards = [Subscriber(host, self) for host in decoded]
        self._publishers = [Publisher(host) for host in decoded]

    def publisher_for(self, name: str) -> Publisher:
        """The publisher of the Redis host that carries this channel (the one its subscribers read)."""
        return self._publishers[_consistent_hash(name, len(self._publishers))]

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        await self.send_soon(channel, message)

    def send_soon(self, channel: str, message: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a message for the next batch; the future says how it went."""
        return self.publisher_for(channel).publish(channel, self.channel_layer.serialize(message))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        name = self._get_group_channel_name(group)
        await self.publisher_for(name).publish(name, self.channel_layer.serialize(message))

    async def flush(self) -> None:
        await super().flush()
        for publisher in self._publishers:
            await publisher.close()


class SignalingPubSubLayer(RedisPubSubChannelLayer):
    """channels-redis's pub/sub layer, publishing in one pipeline per loop iteration (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_versions()
        super().__init__(*args, **kwargs)

    def _get_layer(self) -> BatchedLoopLayer:
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = BatchedLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            # As channels-redis does: the layer is flushed (its connections closed) when its loop closes.
            _wrap_close(self, loop)
        return layer

    # Called directly rather than through channels-redis's proxy (`__getattr__`, a partial
    # and a coroutine per call): these run for every message.
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        await self._get_layer().send(channel, message)

    def send_soon(self, channel: str, message: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a message behind everything sent before it, without waiting for Redis to take it.

        For relayed offers, answers and candidates (`SessionRegistry.relay`): the
        sender reads its next frame while the batch is on its way, so batches
        grow with the load instead of one message per waiting consumer.
        """
        return self._get_layer().send_soon(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self._get_layer().group_send(group, message)
