"""Covers calls.realtime.layers: the in-memory channel layer used without Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from calls.realtime.layers import SignalingInMemoryLayer


@pytest.fixture
def layer() -> SignalingInMemoryLayer:
    return SignalingInMemoryLayer(expiry=60, capacity=2, sweep_interval=1.0)


async def test_expired_messages_are_swept_at_most_once_per_interval(layer, monkeypatch):
    real = time.time
    await layer.send("a.inmemory!x", {"type": "one"})
    monkeypatch.setattr(time, "time", lambda: real() + 120)  # the message is now expired
    layer._clean_expired()  # the first sweep runs and removes it
    assert "a.inmemory!x" not in layer.channels
    monkeypatch.undo()
    await layer.send("a.inmemory!x", {"type": "two"})
    monkeypatch.setattr(time, "time", lambda: real() + 120)  # expired too
    layer._clean_expired()  # within the interval: no sweep
    assert "a.inmemory!x" in layer.channels


async def test_group_membership_does_not_expire(layer, monkeypatch):
    await layer.group_add("user.a", "a.inmemory!x")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10 * 86400)  # channels' default drops members after a day
    layer._next_sweep = 0.0  # a sweep is due
    layer._clean_expired()
    monkeypatch.undo()
    await layer.group_send("user.a", {"type": "ring"})
    assert (await asyncio.wait_for(layer.receive("a.inmemory!x"), 1)) == {"type": "ring"}


async def test_a_full_member_does_not_stop_a_group_send(layer):
    for name in ("a.inmemory!full", "a.inmemory!free"):
        await layer.group_add("g", name)
    await layer.send("a.inmemory!full", {"type": "x"})
    await layer.send("a.inmemory!full", {"type": "x"})  # at capacity (2)
    await layer.group_send("g", {"type": "y"})
    assert (await asyncio.wait_for(layer.receive("a.inmemory!free"), 1)) == {"type": "y"}
    assert layer.channels["a.inmemory!full"].qsize() == 2
