"""Covers calls.realtime.identity through the real ASGI application: who a session is.

One owner per name in open mode, one account's devices in token mode, and whose
calls a session's history shows in each mode.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from calls.models import CallEvent
from calls.realtime.security import mint_token
from calls.tests.wsclient import answer, calls_in_db, end_call, ring, users_in_db

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def actors_of(call_id: str) -> list[tuple[str, str, str, str]]:
    """Each recorded change of a call: (old status, new status, who acted, from which device)."""
    return list(CallEvent.objects.filter(call_id=call_id).values_list("old_status", "new_status", "username", "device"))


# --- Open mode: one live session per name ------------------------------------------------


async def test_a_second_register_for_an_online_name_is_refused_and_the_holder_stays(connect):
    alice = await connect("alice", "u-a")
    intruder = await connect()
    await intruder.send({"type": "register", "username": "alice", "user_id": "u-other"})
    await intruder.expect_error("username_taken")

    carol = await connect("carol")
    await ring(carol, alice)
    await intruder.nothing()
    await intruder.send({"type": "get_call_history"})
    await intruder.expect_error("not_registered")
    assert (await users_in_db())["alice"] == "u-a"


async def test_a_second_register_with_the_holders_user_id_is_refused_while_the_holder_answers(connect):
    alice = await connect("alice", "u-a")
    twin = await connect()
    await twin.send({"type": "register", "username": "alice", "user_id": "u-a"})
    await twin.expect_error("username_taken")
    carol = await connect("carol")
    await ring(carol, alice)
    await twin.nothing()


async def test_a_case_variant_of_an_online_name_is_taken(connect):
    alice = await connect("alice", "u-a")
    shouter = await connect()
    await shouter.send({"type": "register", "username": "ALICE", "user_id": "u-shout"})
    await shouter.expect_error("username_taken")
    await shouter.send({"type": "register", "username": "ａｌｉｃｅ", "user_id": "u-wide"})
    await shouter.expect_error("username_taken")
    listed = await alice.expect_online({"alice"})
    assert listed["users"] == [{"username": "alice", "user_id": "u-a"}]
    assert await users_in_db() == {"alice": "u-a"}


async def test_a_name_is_free_again_once_its_holder_closed(connect):
    alice = await connect("alice", "u-a")
    await alice.close()
    newcomer = await connect()
    registered = await newcomer.register("alice", "u-new")
    assert (registered["username"], registered["user_id"]) == ("alice", "u-new")
    assert await users_in_db() == {"alice": "u-new"}


async def test_a_full_width_name_registers_as_plain_letters(connect):
    client = await connect()
    registered = await client.register("ＢＯＢ", "u-b")
    assert registered["username"] == "BOB"
    assert await users_in_db() == {"BOB": "u-b"}


async def test_a_call_to_a_case_variant_rings_the_owner_under_its_own_name(connect):
    alice, bob = await connect("alice"), await connect("Bob")
    call_id = await ring(alice, bob, target="BOB")
    [call] = await calls_in_db()
    assert (str(call.id), call.callee.username) == (call_id, "Bob")


# --- Token mode: one account, several devices --------------------------------------------


async def register_device(connect, username: str, account: str, sent_user_id: str, device: str) -> tuple:
    client = await connect()
    token = mint_token(username, user_id=account)[0]
    registered = await client.register(username, sent_user_id, token=token, device_id=device)
    return client, registered


async def test_every_device_gets_the_accounts_user_id_whatever_it_sends(connect, multi_device):
    _, on_phone = await register_device(connect, "bob", "acct-b", "i-am-the-phone", "phone")
    _, on_laptop = await register_device(connect, "bob", "acct-b", "i-am-the-laptop", "laptop")
    assert (on_phone["user_id"], on_phone["device_id"]) == ("acct-b", "phone")
    assert (on_laptop["user_id"], on_laptop["device_id"]) == ("acct-b", "laptop")
    assert await users_in_db() == {"bob": "acct-b"}


async def test_a_token_without_a_user_id_claim_makes_the_username_the_user_id(connect, multi_device):
    client = await connect()
    registered = await client.register("bob", "chosen-by-client", token=mint_token("bob")[0])
    assert registered["user_id"] == "bob"
    assert "device_id" not in registered
    assert await users_in_db() == {"bob": "bob"}


async def test_a_call_records_the_devices_of_both_sides(connect, multi_device):
    alice, _ = await register_device(connect, "alice", "acct-a", "x", "desk")
    phone, _ = await register_device(connect, "bob", "acct-b", "y", "phone")
    laptop, _ = await register_device(connect, "bob", "acct-b", "z", "laptop")
    await alice.send({"type": "call_request", "target_username": "bob"})
    call_id = (await phone.expect("incoming_call"))["call_id"]
    await laptop.expect("incoming_call")
    await answer(alice, phone, call_id)
    await end_call(alice, phone, call_id, "hangup")

    [call] = await calls_in_db()
    assert (call.caller_device, call.callee_device, call.status) == ("desk", "phone", "completed")
    assert await actors_of(call_id) == [
        ("", "ringing", "alice", "desk"),
        ("ringing", "answered", "bob", "phone"),
        ("answered", "completed", "alice", "desk"),
    ]


async def test_history_names_the_devices_of_a_call(connect, multi_device):
    alice, _ = await register_device(connect, "alice", "acct-a", "x", "desk")
    phone, _ = await register_device(connect, "bob", "acct-b", "y", "phone")
    laptop, _ = await register_device(connect, "bob", "acct-b", "z", "laptop")
    call_id = await ring(alice, phone)
    await laptop.expect("incoming_call")
    await answer(alice, phone, call_id)
    assert (await laptop.expect("call_ended"))["reason"] == "answered_elsewhere"
    await end_call(alice, phone, call_id, "hangup")

    await laptop.send({"type": "get_call_history"})
    [item] = (await laptop.expect("call_history"))["calls"]
    assert (item["call_id"], item["caller_device_id"], item["callee_device_id"]) == (call_id, "desk", "phone")


async def test_history_shows_null_devices_for_a_call_between_sessions_without_one(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    await end_call(alice, bob, call_id, "cancelled")
    await alice.send({"type": "get_call_history"})
    [item] = (await alice.expect("call_history"))["calls"]
    assert (item["caller_device_id"], item["callee_device_id"]) == (None, None)
    [call] = await calls_in_db()
    assert (call.caller_device, call.callee_device) == ("", "")


async def test_in_token_mode_a_new_device_sees_the_accounts_earlier_calls(connect, multi_device):
    alice, _ = await register_device(connect, "alice", "acct-a", "x", "desk")
    bob, _ = await register_device(connect, "bob", "acct-b", "y", "phone")
    call_id = await ring(alice, bob)
    await answer(alice, bob, call_id)
    await end_call(alice, bob, call_id, "hangup")
    await alice.close()

    later, _ = await register_device(connect, "alice", "acct-a", "x", "tablet")
    await later.send({"type": "get_call_history"})
    assert [item["call_id"] for item in (await later.expect("call_history"))["calls"]] == [call_id]


# --- Open mode: history is the session's own ---------------------------------------------


async def test_in_open_mode_a_new_session_of_a_name_sees_none_of_the_earlier_calls(connect):
    alice, bob = await connect("alice", "u-a"), await connect("bob")
    call_id = await ring(alice, bob)
    await answer(alice, bob, call_id)
    await end_call(alice, bob, call_id, "hangup")
    await alice.close()

    again = await connect("alice", "u-a")
    await again.send({"type": "get_call_history"})
    assert (await again.expect("call_history"))["calls"] == []
    [call] = await calls_in_db()
    assert (str(call.id), call.caller.username, call.status) == (call_id, "alice", "completed")


async def test_in_open_mode_a_session_sees_the_calls_that_rang_it(connect):
    alice, bob = await connect("alice"), await connect("bob")
    call_id = await ring(alice, bob)
    await end_call(alice, bob, call_id, "cancelled")
    await bob.send({"type": "get_call_history"})
    [item] = (await bob.expect("call_history"))["calls"]
    assert (item["call_id"], item["status"]) == (call_id, "cancelled")
