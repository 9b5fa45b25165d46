// The client against a real daphne in open mode: registering, presence, calls with the
// PeerConnection helper, refusals and errors. Each test uses its own usernames.

import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";

import { CallFailed, PeerConnection, RegistrationError, SignalingError } from "../src/index.js";
import { Clients, FakePeerConnection, untilOffline, untilOnline } from "./support/helpers.js";
import { startServer } from "./support/server.js";

describe("open mode", () => {
  let server;
  let clients;

  before(async () => {
    server = await startServer();
    clients = new Clients(server.url);
  });
  after(async () => {
    await server?.stop();
  });
  afterEach(async () => {
    await clients?.closeAll();
  });

  const open = (username, options) => clients.open(username, options);

  /** Ring `callee` from `caller` and accept; return the call id. */
  async function answeredCall(caller, callee) {
    await untilOnline(caller.client, callee.client.username);
    const callId = await caller.client.call(callee.client.username);
    await callee.events.expect("incoming_call", { callId });
    await callee.client.accept(callId);
    await caller.events.expect("call_accepted", { callId });
    return callId;
  }

  it("registers and goes through connecting, registering and online", async () => {
    const { client, events } = await open("ann1");
    const registered = client.registered;
    assert.equal(registered.username, "ann1");
    assert.equal(registered.userId, "id-ann1");
    assert.deepEqual(registered.iceServers, []);
    assert.ok(registered.resumeToken, "register with resume: true must return a resume token");
    assert.equal(registered.resumed, false);
    assert.equal(client.state, "online");
    assert.deepEqual(
      events.of("state").map((e) => `${e.from}->${e.to}`),
      ["idle->connecting", "connecting->registering", "registering->online"],
    );
    await client.close();
    assert.equal(client.state, "closed");
    assert.deepEqual(
      events.of("closed").map((e) => e.reason),
      ["closed"],
    );
  });

  it("refuses a name that is online with username_taken and closes that client", async () => {
    await open("taken1");
    const second = clients.make("taken1", { userId: "someone-else" });
    await assert.rejects(second.connect(), (err) => err instanceof RegistrationError && err.code === "username_taken");
    assert.equal(second.state, "closed");
  });

  it("keeps the whole list current with full presence", async () => {
    const ann = await open("ann2");
    const bob = await open("bob2");
    await untilOnline(ann.client, "bob2");
    const withBob = ann.events.of("online_users").at(-1);
    assert.ok(withBob.users.some((u) => u.username === "bob2" && u.userId === "id-bob2"));
    assert.ok(withBob.timestamp.endsWith("+00:00"));
    await bob.client.close();
    await untilOffline(ann.client, "bob2");
    assert.ok(
      !ann.events
        .of("online_users")
        .at(-1)
        .users.some((u) => u.username === "bob2"),
    );
    assert.equal(ann.events.of("user_online").length, 0, "full presence sends no deltas");
  });

  it("follows changes with delta presence: a snapshot, then presence frames and one event per user", async () => {
    const ann = await open("ann3", { presence: "delta" });
    const snapshot = await ann.events.expect("presence", { snapshot: true });
    assert.ok(snapshot.online.some((u) => u.username === "ann3"));
    const bob = await open("bob3");
    const online = await ann.events.expect("user_online", { username: "bob3" });
    assert.equal(online.userId, "id-bob3");
    assert.equal(online.raw.type, "presence", "derived from the frame");
    assert.ok(
      online.users.some((u) => u.username === "bob3"),
      "it carries the current set",
    );
    assert.ok(ann.client.onlineUsers.some((u) => u.username === "bob3"));
    await bob.client.close();
    const offline = await ann.events.expect("user_offline", { username: "bob3" });
    assert.ok(!offline.users.some((u) => u.username === "bob3"));
    assert.ok(!ann.client.onlineUsers.some((u) => u.username === "bob3"));
    assert.deepEqual(ann.events.of("online_users"), [], "delta presence sends no full lists");
  });

  it("follows only the users on its watch list, and changes the list", async () => {
    const ann = await open("ann8", { watch: ["bob8"] });
    await ann.events.expect("presence", { snapshot: true });
    await open("carol8");
    await open("bob8");
    await ann.events.expect("user_online", { username: "bob8" });
    // carol8 came online first: had she been followed, her frame would have come by now.
    assert.deepEqual(
      ann.client.onlineUsers.map((u) => u.username),
      ["bob8"],
    );
    const added = await ann.client.watch({ add: ["carol8"], remove: ["bob8"] });
    assert.equal(added.snapshot, true);
    assert.deepEqual(
      added.online.map((u) => u.username),
      ["carol8"],
    );
    assert.deepEqual(ann.client.watching, ["carol8"]);
    assert.ok(ann.client.onlineUsers.some((u) => u.username === "carol8"));
    assert.deepEqual(ann.events.of("online_users"), []);
  });

  it("runs a call from request to hang-up with offers, answers and candidates through PeerConnection", async () => {
    const alice = await open("alice4");
    const bob = await open("bob4");
    const alicePc = new FakePeerConnection("alice");
    const bobPc = new FakePeerConnection("bob");
    const errors = [];
    const onError = (err) => errors.push(err);
    let bobPeer = null;
    const prepared = [];
    // Bob answers once alice has checked the ringing state: the server is fast enough
    // for an answer to arrive in the same read as call_ringing.
    let answerNow;
    const mayAnswer = new Promise((resolve) => {
      answerNow = resolve;
    });
    bob.client.on("incoming_call", async (event) => {
      bobPeer = new PeerConnection(bob.client, event.callId, bobPc, {
        onError,
        prepare: (pc, role) => prepared.push(["bob", role]),
      });
      await mayAnswer;
      await bob.client.accept(event.callId);
    });

    await untilOnline(alice.client, "bob4");
    const callId = await alice.client.call("bob4");
    const ringing = alice.events.of("call_ringing")[0];
    assert.equal(ringing.callId, callId);
    assert.equal(ringing.targetUsername, "bob4");
    assert.equal(ringing.push, false);
    assert.deepEqual(alice.client.calls.get(callId), {
      callId,
      peerUsername: "bob4",
      outgoing: true,
      status: "ringing",
    });
    const alicePeer = new PeerConnection(alice.client, callId, alicePc, {
      onError,
      prepare: (pc, role) => prepared.push(["alice", role]),
    });
    answerNow();
    assert.equal(alicePeer.role, "caller");

    const incoming = await bob.events.expect("incoming_call", { callId });
    assert.equal(incoming.callerUsername, "alice4");
    assert.equal(incoming.callerId, "id-alice4");
    const accepted = await alice.events.expect("call_accepted", { callId });
    assert.equal(accepted.accepterUsername, "bob4");

    // Each side ends up with the other's description and both of its candidates.
    await alicePc.until(() => alicePc.argsOf("addIceCandidate").length === 2);
    await bobPc.until(() => bobPc.argsOf("addIceCandidate").length === 2);
    assert.deepEqual(alicePc.callNames, [
      "createOffer",
      "setLocalDescription",
      "setRemoteDescription",
      "addIceCandidate",
      "addIceCandidate",
    ]);
    // The callee's candidates came before its answer was applied: they waited in the queue.
    assert.deepEqual(bobPc.callNames, [
      "setRemoteDescription",
      "addIceCandidate",
      "addIceCandidate",
      "createAnswer",
      "setLocalDescription",
    ]);
    assert.deepEqual(bobPc.argsOf("setRemoteDescription"), [alicePc.localDescription]);
    assert.deepEqual(alicePc.argsOf("setRemoteDescription"), [bobPc.localDescription]);
    assert.deepEqual(bobPc.argsOf("addIceCandidate"), alicePc.gathered);
    assert.deepEqual(alicePc.argsOf("addIceCandidate"), bobPc.gathered);
    assert.deepEqual(prepared, [
      ["alice", "caller"],
      ["bob", "callee"],
    ]);
    // What went over the wire, as each side received it.
    assert.deepEqual(
      bob.events.of("offer").map((e) => [e.fromUsername, e.callId, e.data]),
      [["alice4", callId, alicePc.localDescription]],
    );
    assert.deepEqual(
      alice.events.of("answer").map((e) => [e.fromUsername, e.callId, e.data]),
      [["bob4", callId, bobPc.localDescription]],
    );
    assert.deepEqual(
      alice.events.of("ice_candidate").map((e) => e.data),
      bobPc.gathered,
    );

    await alicePeer.hangUp();
    const ended = await bob.events.expect("call_ended", { callId });
    assert.equal(ended.fromUsername, "alice4");
    assert.equal(ended.reason, "hangup");
    assert.ok(alicePc.callNames.at(-1) === "close" && alicePeer.closed);
    await bobPc.until(() => bobPc.callNames.includes("close"));
    assert.ok(bobPeer.closed);
    assert.equal(alice.client.calls.size, 0);
    assert.equal(bob.client.calls.size, 0);
    assert.deepEqual(errors, []);

    const history = await bob.client.history(5);
    assert.deepEqual(
      history.map((h) => [h.callId, h.callerUsername, h.calleeUsername, h.status, h.endReason]),
      [[callId, "alice4", "bob4", "completed", "hangup"]],
    );
    assert.ok(history[0].durationSeconds >= 0);
  });

  it("tells the caller when the callee rejects", async () => {
    const alice = await open("alice5");
    const bob = await open("bob5");
    await untilOnline(alice.client, "bob5");
    const callId = await alice.client.call("bob5");
    await bob.events.expect("incoming_call", { callId });
    await bob.client.reject(callId);
    const rejected = await alice.events.expect("call_rejected", { callId });
    assert.equal(rejected.rejecterUsername, "bob5");
    assert.equal(rejected.reason, "rejected");
    assert.equal(alice.client.calls.size, 0);
    assert.equal(bob.client.calls.size, 0);
  });

  it("fails a call to a user in a call with busy, without ringing them", async () => {
    const alice = await open("alice6");
    const bob = await open("bob6");
    const carol = await open("carol6");
    await answeredCall(alice, bob);
    await untilOnline(carol.client, "bob6");
    await assert.rejects(carol.client.call("bob6"), (err) => {
      assert.ok(err instanceof CallFailed);
      assert.equal(err.code, "busy");
      assert.ok(err.callId, "the busy attempt has a call id");
      return true;
    });
    assert.equal(carol.events.of("call_rejected")[0].reason, "busy");
    assert.equal(bob.events.of("incoming_call").length, 1, "bob must not ring for the busy call");
  });

  it("surfaces the server's errors with their codes, and stays usable", async () => {
    const ann = await open("ann7");
    await assert.rejects(ann.client.call("nobody7"), (err) => err instanceof CallFailed && err.code === "user_offline");
    assert.equal(ann.events.of("error").at(-1).code, "user_offline");
    await assert.rejects(
      ann.client.history(0),
      (err) => err instanceof SignalingError && err.code === "invalid_message",
    );
    await assert.rejects(
      ann.client.subscribePush({ platform: "fcm", token: "fcm-token" }),
      (err) => err instanceof SignalingError && err.code === "unauthorized",
    );
    await assert.rejects(ann.client.sendOffer("no-such-call", { type: "offer", sdp: "" }), /no live call/);
    assert.equal(ann.client.state, "online");
    const pong = await ann.client.ping();
    assert.match(pong.serverTime, /\+00:00$/);
  });
});
