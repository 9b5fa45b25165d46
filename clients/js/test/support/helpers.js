// What the tests share: clients on the ws package, an event recorder, JWTs, a fake
// RTCPeerConnection and push keys, all made with node's own modules.

import { createECDH, createHmac, generateKeyPairSync, randomBytes } from "node:crypto";
import WebSocket from "ws";

import { SignalingClient } from "../../src/index.js";

export const TIMEOUT = 5000;

/** Every event a client raised, in order, and a way to await the next one that matches. */
export class Recorder {
  events = [];
  #used = new Set();
  #waiters = new Set();

  constructor(client) {
    client.on("*", (event) => {
      this.events.push(event);
      for (const waiter of [...this.#waiters]) {
        this.#offer(waiter);
      }
    });
  }

  /** The events of a type so far. */
  of(type) {
    return this.events.filter((event) => event.type === type);
  }

  types() {
    return this.events.map((event) => event.type);
  }

  /** The first event of `type` whose fields match `fields` and that no earlier expect() returned. */
  expect(type, fields = {}, timeout = TIMEOUT) {
    return new Promise((resolve, reject) => {
      const waiter = { type, fields, resolve };
      waiter.timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        reject(new Error(`no ${type} ${JSON.stringify(fields)} within ${timeout} ms; got: ${this.types().join(", ")}`));
      }, timeout);
      this.#waiters.add(waiter);
      this.#offer(waiter);
    });
  }

  #offer(waiter) {
    const found = this.events.find(
      (event) =>
        !this.#used.has(event) &&
        event.type === waiter.type &&
        Object.entries(waiter.fields).every(([name, value]) => event[name] === value),
    );
    if (found) {
      this.#used.add(found);
      this.#waiters.delete(waiter);
      clearTimeout(waiter.timer);
      waiter.resolve(found);
    }
  }
}

/** Clients of one test: made on the ws package with fast reconnects, all closed by closeAll(). */
export class Clients {
  #open = [];

  constructor(url) {
    this.url = url;
  }

  /** A connected client and its recorder. */
  async open(username, options = {}) {
    const client = this.make(username, options);
    const events = new Recorder(client);
    await client.connect();
    return { client, events };
  }

  /** A client not yet connected; `options` may name another `url` (a proxy's). */
  make(username, options = {}) {
    const client = new SignalingClient({
      url: this.url,
      username,
      userId: `id-${username}`,
      WebSocket,
      backoffInitial: 50,
      backoffMax: 200,
      ...options,
    });
    this.#open.push(client);
    return client;
  }

  async closeAll() {
    await Promise.all(this.#open.splice(0).map((client) => client.close()));
  }
}

/** Wait until `condition()` holds: now, or after one of the client's events. */
export async function until(client, condition, timeout = TIMEOUT) {
  if (!condition()) {
    await client.waitFor("*", () => condition(), timeout);
  }
}

const isOnline = (client, username) => client.onlineUsers.some((u) => u.username === username);

/** Wait until `client` sees `username` online. */
export const untilOnline = (client, username) => until(client, () => isOnline(client, username));

/** Wait until `client` no longer sees `username` online. */
export const untilOffline = (client, username) => until(client, () => !isOnline(client, username));

const base64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT, as a backend would mint it. */
export function mintToken(secret, claims) {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = base64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 600, ...claims }));
  const signature = createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

/** A VAPID key pair: the private key as PEM (for the server), the public key as base64url (what browsers get). */
export function vapidKeyPair() {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const jwk = publicKey.export({ format: "jwk" });
  const point = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x, "base64url"), Buffer.from(jwk.y, "base64url")]);
  return { privatePem: privateKey.export({ type: "pkcs8", format: "pem" }), publicKey: point.toString("base64url") };
}

/** A browser's PushSubscription.toJSON() for `endpoint`: a real P-256 point and a 16-byte auth secret. */
export function webPushSubscription(endpoint) {
  const ecdh = createECDH("prime256v1");
  ecdh.generateKeys();
  return { endpoint, keys: { p256dh: base64url(ecdh.getPublicKey()), auth: base64url(randomBytes(16)) } };
}

/**
 * A stand-in for RTCPeerConnection that records every call made on it. Setting the local
 * description "gathers" two candidates at once, before the description is even sent, so
 * the other side always gets candidates before the offer or answer they belong to.
 */
export class FakePeerConnection extends EventTarget {
  calls = [];
  localDescription = null;
  remoteDescription = null;
  #watchers = new Set();

  constructor(name) {
    super();
    this.name = name;
  }

  /** The candidates this side gathers (what the other side must receive). */
  get gathered() {
    return [0, 1].map((n) => ({
      candidate: `candidate:${n} 1 udp 2122260223 127.0.0.1 ${40000 + n} typ host ufrag ${this.name}`,
      sdpMid: "0",
      sdpMLineIndex: 0,
    }));
  }

  #record(name, arg) {
    this.calls.push(arg === undefined ? [name] : [name, arg]);
    for (const watcher of [...this.#watchers]) {
      if (watcher.predicate()) {
        this.#watchers.delete(watcher);
        clearTimeout(watcher.timer);
        watcher.resolve();
      }
    }
  }

  /** Names of the methods called, in order. */
  get callNames() {
    return this.calls.map(([name]) => name);
  }

  argsOf(name) {
    return this.calls.filter(([called]) => called === name).map(([, arg]) => arg);
  }

  /** Wait until `predicate()` holds (checked after every recorded call). */
  until(predicate, timeout = TIMEOUT) {
    if (predicate()) {
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const watcher = { predicate, resolve };
      watcher.timer = setTimeout(() => {
        this.#watchers.delete(watcher);
        reject(new Error(`${this.name}: condition not met within ${timeout} ms; calls: ${this.callNames.join(", ")}`));
      }, timeout);
      this.#watchers.add(watcher);
    });
  }

  async createOffer() {
    this.#record("createOffer");
    return { type: "offer", sdp: `v=0\r\no=${this.name} 1 1 IN IP4 127.0.0.1\r\n` };
  }

  async createAnswer() {
    this.#record("createAnswer");
    return { type: "answer", sdp: `v=0\r\no=${this.name} 2 1 IN IP4 127.0.0.1\r\n` };
  }

  async setLocalDescription(description) {
    this.#record("setLocalDescription", description);
    this.localDescription = description;
    for (const init of this.gathered) {
      const event = new Event("icecandidate");
      event.candidate = { ...init, toJSON: () => init };
      this.dispatchEvent(event);
    }
    const end = new Event("icecandidate");
    end.candidate = null;
    this.dispatchEvent(end);
  }

  async setRemoteDescription(description) {
    this.#record("setRemoteDescription", description);
    this.remoteDescription = description;
  }

  async addIceCandidate(candidate) {
    if (this.remoteDescription === null) {
      // What browsers do: a candidate needs the remote description first.
      throw new Error("InvalidStateError: the remote description is not set");
    }
    this.#record("addIceCandidate", candidate);
  }

  close() {
    this.#record("close");
  }
}
