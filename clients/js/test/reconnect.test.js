// Reconnect, resume and the ping deadline against a real daphne: one client reaches the
// server through a TCP proxy the test breaks, the other directly.

import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";

import { Clients, untilOnline } from "./support/helpers.js";
import { TcpProxy } from "./support/proxy.js";
import { startServer } from "./support/server.js";

describe("reconnect and resume", () => {
  let server;
  let proxy = null;
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
    await proxy?.stop();
    proxy = null;
  });

  /** alice directly, bob through a fresh proxy, in an answered call; returns all three. */
  async function callThroughProxy(n, bobOptions = {}) {
    proxy = await new TcpProxy(server.port).start();
    const alice = await clients.open(`alice${n}`);
    const bob = await clients.open(`bob${n}`, { url: proxy.url, ...bobOptions });
    await untilOnline(alice.client, `bob${n}`);
    const callId = await alice.client.call(`bob${n}`);
    await bob.events.expect("incoming_call", { callId });
    await bob.client.accept(callId);
    await alice.events.expect("call_accepted", { callId });
    return { alice, bob, callId };
  }

  it("resumes a dropped session with its call, and delivers what was sent in the gap", async () => {
    const { alice, bob, callId } = await callThroughProxy(1);
    const firstToken = bob.client.registered.resumeToken;

    proxy.refusing = true;
    proxy.cut();
    const reconnecting = await bob.events.expect("reconnecting", { attempt: 1 });
    assert.ok(reconnecting.delay > 0 && reconnecting.delay <= 50, `delay ${reconnecting.delay}`);
    await alice.events.expect("peer_reconnecting", { username: "bob1", callId });
    const toBob = { candidate: "candidate:1 1 udp 1 127.0.0.1 40000 typ host", sdpMLineIndex: 0 };
    await alice.client.sendCandidate(callId, toBob); // queued by the server for bob's session
    const fromBob = { candidate: "candidate:2 1 udp 1 127.0.0.1 40002 typ host", sdpMLineIndex: 0 };
    await bob.client.sendCandidate("alice1", fromBob); // held by the client until the session is back
    proxy.refusing = false;

    const resumed = await bob.events.expect("registered", { resumed: true });
    assert.ok(resumed.resumeToken && resumed.resumeToken !== firstToken, "a resume token works once");
    assert.deepEqual(resumed.calls, [{ callId, peerUsername: "alice1", status: "answered" }]);
    await bob.events.expect("reconnected", { resumed: true });
    assert.deepEqual((await bob.events.expect("ice_candidate", { callId })).data, toBob);
    await alice.events.expect("peer_reconnected", { username: "bob1", callId });
    assert.deepEqual((await alice.events.expect("ice_candidate", { callId })).data, fromBob);
    assert.deepEqual(bob.client.calls.get(callId), {
      callId,
      peerUsername: "alice1",
      outgoing: false,
      status: "answered",
    });
    assert.deepEqual(alice.events.of("call_ended"), []);
    assert.deepEqual(bob.events.of("call_ended"), []);
    const states = bob.events.of("state").map((e) => e.to);
    assert.deepEqual(states.slice(0, 4), ["connecting", "registering", "online", "reconnecting"]);
    assert.deepEqual(states.slice(-3), ["connecting", "registering", "online"]);

    await bob.client.hangUp(callId);
    const ended = await alice.events.expect("call_ended", { callId });
    assert.equal(ended.reason, "hangup");
  });

  it("drops a socket that answers no ping within the deadline, then resumes", async () => {
    const { alice, bob, callId } = await callThroughProxy(2, { pingInterval: 200, pingTimeout: 300 });
    assert.ok(await bob.client.ping(), "pongs come while the link is up");

    proxy.freeze(); // the link goes dark: no close, no reset, nothing
    const reconnecting = await bob.events.expect("reconnecting", { attempt: 1 });
    assert.equal(reconnecting.reason, "no pong within 300 ms");
    const resumed = await bob.events.expect("registered", { resumed: true });
    assert.deepEqual(resumed.calls, [{ callId, peerUsername: "alice2", status: "answered" }]);
    await bob.events.expect("reconnected", { resumed: true });
    await bob.events.expect("pong"); // the keepalive runs on the new socket

    await alice.client.hangUp(callId);
    assert.equal((await bob.events.expect("call_ended", { callId })).reason, "hangup");
  });

  it("registers afresh when resume is off, reporting its calls as lost", async () => {
    const { alice, bob, callId } = await callThroughProxy(3, { resume: false });
    assert.equal(bob.client.registered.resumeToken, null);
    proxy.cut();
    const lost = await bob.events.expect("call_ended", { callId });
    assert.equal(lost.reason, "disconnected");
    assert.equal(lost.raw, null, "raised by the client: the server never said it");
    await bob.events.expect("reconnected", { resumed: false });
    assert.equal(bob.client.calls.size, 0);
    assert.equal((await alice.events.expect("call_ended", { callId })).reason, "disconnected");
    assert.equal(bob.client.state, "online");
  });
});
