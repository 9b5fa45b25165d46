// What a real server cannot be made to do on cue, played by a scripted ws server on
// loopback: a 1012 close, a refused resume, frames from a newer server, garbage.

import assert from "node:assert/strict";
import { once } from "node:events";
import { afterEach, describe, it } from "node:test";
import { WebSocketServer } from "ws";

import { ClientClosedError } from "../src/index.js";
import { Clients, TIMEOUT } from "./support/helpers.js";

const CALL_ID = "6f1d7c52-1111-4a43-9c1d-3c1f4c2b0a01";

/** One server-side socket: `recv()` the next JSON message (null once the socket closed), `send(object)`. */
class Peer {
  #queue = [];
  #waiting = [];
  #closed = false;

  constructor(ws) {
    this.ws = ws;
    ws.on("message", (data) => this.#give(JSON.parse(String(data))));
    ws.on("close", () => {
      this.#closed = true;
      while (this.#waiting.length > 0) {
        this.#give(null);
      }
    });
  }

  recv() {
    if (this.#queue.length > 0 || this.#closed) {
      return Promise.resolve(this.#queue.shift() ?? null);
    }
    return new Promise((resolve, reject) => {
      const waiter = (message) => {
        clearTimeout(timer);
        resolve(message);
      };
      const timer = setTimeout(() => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1);
        reject(new Error("the client sent nothing"));
      }, TIMEOUT);
      this.#waiting.push(waiter);
    });
  }

  send(message) {
    this.ws.send(typeof message === "string" ? message : JSON.stringify(message));
  }

  #give(message) {
    const waiter = this.#waiting.shift();
    if (waiter) {
      waiter(message);
    } else if (message !== null) {
      this.#queue.push(message);
    }
  }
}

/** A ws server on 127.0.0.1 running `script(peer, n)` for its n-th connection. */
async function scriptedServer(script) {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1" });
  await once(wss, "listening");
  let count = 0;
  const failures = [];
  wss.on("connection", (ws) => {
    count += 1;
    Promise.resolve(script(new Peer(ws), count)).catch((err) => failures.push(err));
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/`,
    failures,
    async close() {
      for (const ws of wss.clients) {
        ws.terminate();
      }
      await new Promise((resolve) => wss.close(resolve));
    },
  };
}

const registered = (username, extra = {}) => ({
  type: "registered",
  username,
  user_id: `id-${username}`,
  ice_servers: [],
  ...extra,
});

describe("behaviour only a scripted server shows", () => {
  let stub;
  let clients;

  afterEach(async () => {
    await clients?.closeAll();
    await stub?.close();
    assert.deepEqual(stub?.failures ?? [], []);
  });

  it("reconnects at once after a 1012 close and resumes with the token", async () => {
    const registers = [];
    stub = await scriptedServer(async (peer, n) => {
      registers.push(await peer.recv());
      if (n === 1) {
        peer.send(registered("ann", { resume_token: "tok-1" }));
        peer.send({ type: "incoming_call", caller_username: "bo", caller_id: "b", call_id: CALL_ID });
        assert.equal((await peer.recv()).type, "call_accepted");
        peer.ws.close(1012, "service restart");
        return;
      }
      const calls = [{ call_id: CALL_ID, peer_username: "bo", status: "answered" }];
      peer.send(registered("ann", { resume_token: "tok-2", resumed: true, calls }));
    });
    clients = new Clients(stub.url);
    const { client, events } = await clients.open("ann", { backoffInitial: 5000, backoffMax: 5000 });
    await events.expect("incoming_call", { callId: CALL_ID });
    await client.accept(CALL_ID);

    const reconnecting = await events.expect("reconnecting", { attempt: 1 });
    assert.equal(reconnecting.delay, 0, "a server shutting down means: come back now");
    assert.equal(reconnecting.reason, "closed with code 1012");
    await events.expect("reconnected", { resumed: true });
    assert.deepEqual(registers, [
      { type: "register", username: "ann", user_id: "id-ann", resume: true },
      { type: "register", username: "ann", user_id: "id-ann", resume: true, resume_token: "tok-1" },
    ]);
    assert.deepEqual(client.calls.get(CALL_ID), {
      callId: CALL_ID,
      peerUsername: "bo",
      outgoing: false,
      status: "answered",
    });
    assert.deepEqual(events.of("call_ended"), []);
  });

  it("registers afresh after resume_failed and reports the lost call once", async () => {
    const registers = [];
    stub = await scriptedServer(async (peer, n) => {
      registers.push(await peer.recv());
      if (n === 1) {
        peer.send(registered("ann", { resume_token: "tok-1" }));
        peer.send({ type: "incoming_call", caller_username: "bo", caller_id: "b", call_id: CALL_ID });
        await peer.recv(); // the accept
        peer.ws.terminate();
        return;
      }
      peer.send({ type: "error", code: "resume_failed", message: "unknown session" });
      registers.push(await peer.recv());
      peer.send(registered("ann", { resume_token: "tok-3" }));
      // A late notice for the call the client already reported lost is not repeated.
      peer.send({ type: "call_ended", from_username: "bo", call_id: CALL_ID, reason: "disconnected" });
      peer.send({ type: "from_the_future" });
    });
    clients = new Clients(stub.url);
    const { client, events } = await clients.open("ann", { pingInterval: null });
    await events.expect("incoming_call", { callId: CALL_ID });
    await client.accept(CALL_ID);

    const lost = await events.expect("call_ended", { callId: CALL_ID });
    assert.deepEqual([lost.fromUsername, lost.reason, lost.raw], ["bo", "disconnected", null]);
    await events.expect("reconnected", { resumed: false });
    await events.expect("unknown", { messageType: "from_the_future" });
    assert.equal(events.of("call_ended").length, 1);
    assert.equal(client.calls.size, 0);
    assert.deepEqual(
      registers.map((r) => r.resume_token),
      [undefined, "tok-1", undefined],
    );
  });

  it("passes unknown types on and skips frames that are not JSON objects", async () => {
    stub = await scriptedServer(async (peer) => {
      await peer.recv();
      peer.send(registered("ann"));
      peer.send({ type: "from_the_future", detail: { x: 1 } });
      peer.send("{not json");
      peer.send(JSON.stringify(["a", "list"]));
      peer.ws.send(Buffer.from([0, 1, 2]), { binary: true });
      peer.send({ type: "incoming_call", caller_username: "v1-caller", caller_id: 7 });
      while ((await peer.recv())?.type === "ping") {
        peer.send({ type: "pong", server_time: "2026-01-01T00:00:00+00:00" });
      }
    });
    clients = new Clients(stub.url);
    const warnings = [];
    const logger = { warn: (message) => warnings.push(message) };
    const { client, events } = await clients.open("ann", { pingInterval: null, logger });
    const unknown = await events.expect("unknown");
    assert.equal(unknown.messageType, "from_the_future");
    assert.deepEqual(unknown.raw.detail, { x: 1 });
    const incoming = await events.expect("incoming_call");
    assert.deepEqual([incoming.callerUsername, incoming.callerId, incoming.callId], ["v1-caller", "", null]);
    assert.equal((await client.ping()).serverTime, "2026-01-01T00:00:00+00:00");
    assert.equal(client.state, "online");
    assert.equal(warnings.length, 3);
    assert.deepEqual(
      events.types().filter((t) => t !== "state"),
      ["registered", "unknown", "incoming_call", "pong"],
    );
  });

  it("closes for good when a reconnect is refused, with the refusal's code", async () => {
    stub = await scriptedServer(async (peer, n) => {
      await peer.recv();
      if (n === 1) {
        peer.send(registered("ann"));
        peer.ws.close(1011);
        return;
      }
      peer.send({ type: "error", code: "unauthorized", message: "token expired" });
    });
    clients = new Clients(stub.url);
    const { client, events } = await clients.open("ann", { pingInterval: null });
    const closed = await events.expect("closed");
    assert.equal(closed.reason, "unauthorized");
    assert.equal(client.state, "closed");
    await assert.rejects(client.hangUp("any"), ClientClosedError);
    await assert.rejects(client.waitFor("registered"), ClientClosedError);
  });

  it("fails connect() with a ConnectionError when nothing listens", async () => {
    stub = await scriptedServer(() => {});
    const url = stub.url;
    await stub.close();
    stub = null;
    clients = new Clients(url);
    const client = clients.make("ann");
    await assert.rejects(client.connect(), (err) => err.code === "connection_failed");
    assert.equal(client.state, "closed");
  });
});
