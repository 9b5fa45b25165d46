// Token mode and push subscriptions against a real daphne with SIGNALING_AUTH=token and a
// VAPID key. The Web Push endpoint is a fake address: subscribing posts nothing to it.

import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";

import { RegistrationError, SignalingError } from "../src/index.js";
import { Clients, mintToken, vapidKeyPair, webPushSubscription } from "./support/helpers.js";
import { TcpProxy } from "./support/proxy.js";
import { startServer } from "./support/server.js";

const SECRET = `js-client-secret-${"x".repeat(32)}`;
const VAPID = vapidKeyPair();
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

describe("token mode and push", () => {
  let server;
  let clients;
  let proxy = null;

  before(async () => {
    server = await startServer({
      SIGNALING_AUTH: "token",
      SIGNALING_JWT_SECRET: SECRET,
      SIGNALING_VAPID_PRIVATE_KEY: VAPID.privatePem,
      SIGNALING_VAPID_SUBJECT: "mailto:ops@example.com",
      // The fake endpoint is plain http on loopback.
      SIGNALING_PUSH_ALLOW_PRIVATE_ENDPOINTS: "true",
    });
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

  /** A client that registers with a fresh token for `username`. */
  const open = (username, options = {}) =>
    clients.open(username, { token: mintToken(SECRET, { sub: username, user_id: `account-${username}` }), ...options });

  it("registers with a token from an async function, asked again on every registration", async () => {
    proxy = await new TcpProxy(server.port).start();
    const issued = [];
    const token = async () => {
      issued.push(mintToken(SECRET, { sub: "dana", user_id: "account-dana" }));
      return issued.at(-1);
    };
    const { client, events } = await clients.open("dana", { url: proxy.url, token, userId: "whatever" });
    assert.equal(client.registered.username, "dana");
    assert.equal(client.registered.userId, "account-dana", "token mode takes the user id from the token");
    proxy.cut();
    await events.expect("reconnected", { resumed: true });
    assert.equal(issued.length, 2);
  });

  it("refuses a bad token with unauthorized", async () => {
    const forged = mintToken(`another-secret-${"y".repeat(32)}`, { sub: "mallory" });
    const client = clients.make("mallory", { token: forged });
    await assert.rejects(client.connect(), (err) => err instanceof RegistrationError && err.code === "unauthorized");
    assert.equal(client.state, "closed");
    const missing = clients.make("mallory");
    await assert.rejects(missing.connect(), (err) => err instanceof RegistrationError && err.code === "unauthorized");
  });

  it("gets the server's VAPID key in registered", async () => {
    const { client } = await open("vera", { deviceId: "vera-laptop" });
    assert.equal(client.registered.vapidPublicKey, VAPID.publicKey);
    assert.equal(client.registered.deviceId, "vera-laptop");
  });

  it("subscribes a Web Push endpoint, keeps its id when it subscribes again, and unsubscribes", async () => {
    const { client, events } = await open("wanda", { deviceId: "wanda-laptop" });
    const subscription = webPushSubscription("http://127.0.0.1:1/x");
    const id = await client.subscribePush({ platform: "webpush", subscription });
    assert.match(id, UUID);
    assert.equal(events.of("push_subscribed").at(-1).subscriptionId, id);
    assert.equal(
      await client.subscribePush({ platform: "webpush", subscription }),
      id,
      "the same endpoint, the same id",
    );

    await client.unsubscribePush(id);
    assert.equal(events.of("push_unsubscribed").at(-1).subscriptionId, id);
    await assert.rejects(
      client.unsubscribePush(id),
      (err) => err instanceof SignalingError && err.code === "unknown_subscription",
    );
  });

  it("refuses what the server cannot push to, with the code", async () => {
    const { client } = await open("xena");
    await assert.rejects(
      client.subscribePush({ platform: "fcm", token: "fcm-registration-token" }),
      (err) => err instanceof SignalingError && err.code === "push_unavailable",
    );
    const bad = { endpoint: "http://127.0.0.1:1/x", keys: { p256dh: "AAAA", auth: "AAAA" } };
    await assert.rejects(
      client.subscribePush({ platform: "webpush", subscription: bad }),
      (err) => err instanceof SignalingError && err.code === "invalid_message",
    );
  });
});
