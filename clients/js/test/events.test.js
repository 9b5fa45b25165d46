// The pure parts, with no network: parsing server messages into events, and the CallBook.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { CallBook } from "../src/book.js";
import { parseEvent, SERVER_EVENT_TYPES } from "../src/index.js";

describe("parseEvent", () => {
  it("turns every documented message into an event of the same type, fields in camelCase", () => {
    const message = {
      type: "registered",
      username: "john",
      user_id: "u1",
      ice_servers: [{ urls: ["turn:127.0.0.1:3478"], username: "1:john", credential: "c" }],
      resume_token: "tok",
      resumed: true,
      calls: [{ call_id: "c1", peer_username: "jane", status: "answered" }],
      device_id: "phone-1",
      vapid_public_key: "BPk",
    };
    assert.deepEqual(parseEvent(message), {
      type: "registered",
      username: "john",
      userId: "u1",
      iceServers: message.ice_servers,
      resumeToken: "tok",
      resumed: true,
      calls: [{ callId: "c1", peerUsername: "jane", status: "answered" }],
      deviceId: "phone-1",
      vapidPublicKey: "BPk",
      raw: message,
    });
    for (const type of SERVER_EVENT_TYPES) {
      assert.equal(parseEvent({ type }).type, type);
    }
  });

  it("fills what a v1 server leaves out with defaults", () => {
    const { raw, ...incoming } = parseEvent({ type: "incoming_call", caller_username: "john", caller_id: 7 });
    assert.deepEqual(incoming, { type: "incoming_call", callerUsername: "john", callerId: "", callId: null });
    assert.equal(parseEvent({ type: "call_rejected", rejecter_username: "jane" }).reason, "rejected");
    assert.deepEqual(parseEvent({ type: "offer", from_username: "john", data: "not an object" }).data, {});
    const entry = parseEvent({ type: "call_history", calls: [{ call_id: "c", duration_s: "42" }, 5] }).calls;
    assert.equal(entry.length, 1);
    assert.equal(entry[0].durationSeconds, null);
  });

  it("passes an unknown type on as 'unknown' with the message in raw", () => {
    const message = { type: "from_the_future", x: 1 };
    assert.deepEqual(parseEvent(message), { type: "unknown", messageType: "from_the_future", raw: message });
    assert.equal(parseEvent({ type: "__proto__" }).type, "unknown");
    assert.equal(parseEvent({}).messageType, "");
  });
});

describe("CallBook", () => {
  const incoming = (callId, caller) =>
    parseEvent({ type: "incoming_call", caller_username: caller, caller_id: "x", call_id: callId });

  it("keeps the calls a resume kept and reports the others lost, once", () => {
    const book = new CallBook();
    book.track(incoming("kept", "jane"));
    book.track(incoming("gone", "bob"));
    const lost = book.adopt(
      parseEvent({
        type: "registered",
        resumed: true,
        calls: [{ call_id: "kept", peer_username: "jane", status: "answered" }],
      }),
    );
    assert.deepEqual(lost, [
      { type: "call_ended", fromUsername: "bob", callId: "gone", reason: "disconnected", raw: null },
    ]);
    assert.deepEqual([...book.calls.keys()], ["kept"]);
    assert.equal(book.calls.get("kept").status, "answered");
    assert.equal(book.track(parseEvent({ type: "call_ended", call_id: "gone", reason: "disconnected" })), false);
  });

  it("applies full lists and presence frames to who is online; a fresh session's snapshot replaces the list", () => {
    const book = new CallBook();
    const frame = (online, offline, snapshot = false) =>
      parseEvent({
        type: "presence",
        snapshot,
        online: online.map((username) => ({ username, user_id: `id-${username}` })),
        offline: offline.map((username) => ({ username, user_id: `id-${username}` })),
      });
    book.track(parseEvent({ type: "online_users", users: [{ username: "ann", user_id: "id-ann" }] }));
    book.track(frame(["bob"], [], true));
    assert.deepEqual([...book.online.keys()], ["bob"], "the first snapshot replaces the list");
    book.track(frame(["cy"], ["bob"]));
    book.track(frame(["dee"], [], true)); // a watch answer: the users just added
    assert.deepEqual([...book.online.keys()], ["cy", "dee"]);
    book.adopt(parseEvent({ type: "registered", resumed: false }));
    book.track(frame(["eve"], [], true));
    assert.deepEqual([...book.online.keys()], ["eve"]);
  });

  it("finds a call by id or by its peer's name in any case", () => {
    const book = new CallBook();
    book.track(parseEvent({ type: "call_ringing", call_id: "c1", target_username: "Jane" }));
    assert.equal(book.find("c1").peerUsername, "Jane");
    assert.equal(book.find("JANE").callId, "c1");
    assert.equal(book.find("nobody"), null);
    book.forget("c1");
    assert.equal(book.ended("c1"), true);
  });
});
