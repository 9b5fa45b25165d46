// SignalingClient: the application's side of the signaling server.
//
// Three collaborators, each owning one thing: the Connection (connection.js) owns the
// socket, its state, reconnects and held messages; the CallBook (book.js) owns what the
// events said (online users, this client's calls); the EventHub (hub.js) owns delivery
// to request waiters and handlers. Data flows one way: a frame comes up from the
// Connection, is recorded in the CallBook, then delivered by the EventHub. The client
// itself builds the messages it sends and matches the replies to its requests.

import { CallBook } from "./book.js";
import { Connection } from "./connection.js";
import { CallFailed, SignalingError } from "./errors.js";
import { foldUsername } from "./events.js";
import { EventHub } from "./hub.js";

// Error codes the server may answer a call_request with.
const CALL_REQUEST_ERRORS = new Set([
  "user_offline",
  "already_in_call",
  "call_rate_limited",
  "invalid_message",
  "rate_limited",
  "internal_error",
  "not_registered",
]);
const HISTORY_ERRORS = new Set(["invalid_message", "rate_limited", "internal_error", "not_registered"]);
const WATCH_ERRORS = new Set(["watch_limit", "invalid_message", "rate_limited", "internal_error", "not_registered"]);
// Error codes the server may answer push_subscribe and push_unsubscribe with.
const PUSH_REQUEST_ERRORS = new Set([
  "unauthorized",
  "push_unavailable",
  "too_many_subscriptions",
  "unknown_subscription",
  "invalid_message",
  "rate_limited",
  "internal_error",
  "not_registered",
]);

const DEFAULTS = {
  token: null,
  deviceId: null,
  presence: "full",
  watch: null,
  resume: true,
  reconnect: true,
  // The app-level ping: every 20 s, a pong expected within 10 s. A dead socket (a phone
  // that changed networks, a proxy that dropped the connection silently) is noticed
  // within 30 s, before the server's own keepalive gives up on it (about 40 s).
  pingInterval: 20_000,
  pingTimeout: 10_000,
  // Reconnect delays: 50-100% of initial * 2^(attempt-1), at most max. The jitter keeps
  // thousands of clients cut off at once (a deploy) from coming back in the same instant.
  backoffInitial: 500,
  backoffMax: 30_000,
  openTimeout: 10_000,
  requestTimeout: 10_000,
  maxHeldMessages: 256,
  WebSocket: null,
  logger: null,
};

export class SignalingClient {
  #settings;
  #connection;
  #book = new CallBook();
  #hub;
  #registered = null;
  #watching; // the watch list (a Set), sent with every registration; null: follow everyone
  #requests = Promise.resolve(); // call/history/push requests, one at a time
  #log;

  /** @param {object} options see index.d.ts (SignalingClientOptions); durations are in milliseconds. */
  constructor(options) {
    // An option given as undefined takes its default, as if it were left out.
    const given = Object.entries(options ?? {}).filter(([, value]) => value !== undefined);
    const o = { ...DEFAULTS, ...Object.fromEntries(given) };
    for (const name of ["url", "username", "userId"]) {
      if (typeof o[name] !== "string" || o[name] === "") {
        throw new TypeError(`SignalingClient: '${name}' must be a non-empty string`);
      }
    }
    if (o.presence !== "full" && o.presence !== "delta") {
      throw new TypeError("SignalingClient: 'presence' must be 'full' or 'delta'");
    }
    if (o.token !== null && typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("SignalingClient: 'token' must be a string or a function returning one");
    }
    if (o.watch !== null && !Array.isArray(o.watch)) {
      throw new TypeError("SignalingClient: 'watch' must be a list of usernames");
    }
    this.#watching = o.watch === null ? null : new Set(o.watch);
    // Read here, used only by connect(): importing the module or making a client needs no WebSocket.
    o.WebSocket = o.WebSocket ?? globalThis.WebSocket ?? null;
    this.#settings = Object.freeze(o);
    this.token = o.token;
    const logger = o.logger;
    this.#log = (level, message, fields) => {
      if (logger && typeof logger[level] === "function") {
        logger[level](`signaling-client ${o.username}: ${message}`, fields ?? {});
      }
    };
    this.#hub = new EventHub(this.#log);
    this.#connection = new Connection(o, {
      registerMessage: (resumeToken) => this.#registerMessage(resumeToken),
      adopt: (registered, reconnecting) => this.#adopt(registered, reconnecting),
      receive: (event) => this.#receive(event),
      deliver: (event) => this.#deliver(event),
      log: this.#log,
    });
  }

  // --- Settings ----------------------------------------------------------------

  get url() {
    return this.#settings.url;
  }
  get username() {
    return this.#settings.username;
  }
  get userId() {
    return this.#settings.userId;
  }
  get deviceId() {
    return this.#settings.deviceId;
  }
  get presence() {
    return this.#settings.presence;
  }
  get resume() {
    return this.#settings.resume;
  }

  /** The users this client watches (null: it follows everyone, as `presence` says). */
  get watching() {
    return this.#watching === null ? null : [...this.#watching];
  }

  // --- What the client knows now -------------------------------------------------

  /** "idle", "connecting", "registering", "online", "reconnecting" or "closed". */
  get state() {
    return this.#connection.state;
  }

  /** Whether the client is registered on a live socket right now. */
  get connected() {
    return this.state === "online";
  }

  get closed() {
    return this.state === "closed";
  }

  /** The latest `registered` event (null before the first). */
  get registered() {
    return this.#registered;
  }

  /** The RTCIceServer list from the latest registration: pass it to `new RTCPeerConnection({iceServers})`. */
  get iceServers() {
    return this.#registered ? this.#registered.iceServers : [];
  }

  /** Who is online now (kept current by full lists and by deltas). */
  get onlineUsers() {
    return [...this.#book.online.values()];
  }

  /** This client's live calls by call id: {callId, peerUsername, outgoing, status}. */
  get calls() {
    return new Map(this.#book.calls);
  }

  // --- Events ----------------------------------------------------------------------

  /** Call `handler(event)` for every event of `type` ("*": every event); returns a function that removes it. */
  on(type, handler) {
    return this.#hub.on(type, handler);
  }

  /** Remove a handler added with `on`. */
  off(type, handler) {
    this.#hub.off(type, handler);
  }

  /** The next event of `type` ("*": any) for which `predicate` holds; rejects with TimeoutError after `timeout` ms. */
  waitFor(type, predicate = null, timeout = undefined) {
    return this.#hub.expect((e) => (type === "*" || e.type === type) && (!predicate || predicate(e)), timeout, type);
  }

  // --- Connection ----------------------------------------------------------------------

  /** Open the socket and register; resolves with the `registered` event. */
  connect() {
    return this.#connection.connect();
  }

  /** Leave: close the socket with code 1000 (the server ends the session at once) and stop. */
  close() {
    return this.#connection.close();
  }

  async #registerMessage(resumeToken) {
    const { username, userId, deviceId, presence, resume } = this.#settings;
    const message = { type: "register", username, user_id: userId };
    // A function is called on every (re)registration, so that it can refresh an expiring token.
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (token) {
      message.token = token;
    }
    if (deviceId) {
      message.device_id = deviceId;
    }
    if (presence !== "full") {
      message.presence = presence;
    }
    if (this.#watching !== null) {
      message.watch = [...this.#watching].sort();
    }
    if (resume) {
      message.resume = true;
      if (resumeToken) {
        message.resume_token = resumeToken;
      }
    }
    return message;
  }

  /** A session started: take its calls; return what to tell the app once it is online. */
  #adopt(registered, reconnecting) {
    this.#registered = registered;
    this.#log("info", registered.resumed ? "registered (session resumed)" : "registered", { url: this.url });
    const events = [registered, ...this.#book.adopt(registered)];
    if (reconnecting) {
      events.push({ type: "reconnected", resumed: registered.resumed, raw: null });
    }
    return events;
  }

  #receive(event) {
    if (!this.#book.track(event)) {
      return;
    }
    if (event.type === "registered") {
      this.#registered = event;
    } else if (event.type === "presence") {
      // Each change also carries the whole current set, for UIs that redraw it.
      event.users = this.onlineUsers;
    }
    this.#deliver(event);
    if (event.type === "presence") {
      // One event per user too, for applications that want them.
      for (const [type, users] of [
        ["user_offline", event.offline],
        ["user_online", event.online],
      ]) {
        for (const { username, userId } of users) {
          this.#deliver({ type, username, userId, users: event.users, raw: event.raw });
        }
      }
    }
  }

  #deliver(event) {
    if (event.type === "closed") {
      this.#hub.close();
    }
    this.#hub.deliver(event);
  }

  // --- Requests --------------------------------------------------------------------------

  /** Call `username`; resolves with the call id once it rings; rejects with CallFailed (`busy`, `user_offline`...). */
  async call(username, { timeout } = {}) {
    const target = foldUsername(username);
    const reply = await this.#request(
      { type: "call_request", target_username: username },
      (e) =>
        (e.type === "call_ringing" && foldUsername(e.targetUsername) === target) ||
        (e.type === "call_rejected" && e.reason === "busy" && foldUsername(e.rejecterUsername) === target) ||
        (e.type === "error" && CALL_REQUEST_ERRORS.has(e.code)),
      timeout,
      "answer to call_request",
    );
    if (reply.type === "call_ringing") {
      return reply.callId;
    }
    if (reply.type === "call_rejected") {
      throw new CallFailed("busy", `${username} is busy`, reply.callId);
    }
    throw new CallFailed(reply.code, reply.message);
  }

  /** Accept a ringing incoming call. */
  async accept(callId) {
    const info = this.#book.calls.get(callId);
    const message = { type: "call_accepted", call_id: callId };
    if (info) {
      message.caller_username = info.peerUsername;
      this.#book.answered(callId);
    }
    this.#connection.send(message, { hold: true });
  }

  /** Refuse a ringing incoming call. */
  async reject(callId) {
    const info = this.#book.calls.get(callId);
    const message = { type: "call_rejected", call_id: callId };
    if (info) {
      message.caller_username = info.peerUsername;
    }
    this.#book.forget(callId);
    this.#connection.send(message, { hold: true });
  }

  /** End a call: hang up an answered call, or cancel one still ringing. */
  async hangUp(callId) {
    const info = this.#book.calls.get(callId);
    const message = { type: "call_ended", call_id: callId };
    if (info) {
      message.target_username = info.peerUsername;
    }
    this.#book.forget(callId);
    this.#connection.send(message, { hold: true });
  }

  /** Send an SDP offer ({type: "offer", sdp}) to the other party of a call (by call id or peer username). */
  async sendOffer(callIdOrUsername, data) {
    this.#signal("offer", callIdOrUsername, data);
  }

  /** Send an SDP answer ({type: "answer", sdp}). */
  async sendAnswer(callIdOrUsername, data) {
    this.#signal("answer", callIdOrUsername, data);
  }

  /** Send an ICE candidate ({candidate, sdpMid, sdpMLineIndex}: an RTCIceCandidate's toJSON()). */
  async sendCandidate(callIdOrUsername, data) {
    this.#signal("ice_candidate", callIdOrUsername, data);
  }

  #signal(kind, callIdOrUsername, data) {
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new TypeError(`${kind}: data must be an object`);
    }
    const info = this.#book.find(callIdOrUsername);
    if (info === null) {
      if (this.#book.ended(callIdOrUsername)) {
        // A race with the other party hanging up: nothing to deliver it to.
        this.#log("debug", `${kind} for an ended call not sent`, { call: callIdOrUsername });
        return;
      }
      throw new Error(`no live call ${JSON.stringify(callIdOrUsername)} (neither a call id nor a peer of one)`);
    }
    // The server wants target_username on every signal, with or without call_id.
    const message = { type: kind, target_username: info.peerUsername, call_id: info.callId, data };
    this.#connection.send(message, { hold: true });
  }

  /** This user's recent calls, newest first (1-100, default 20). */
  async history(limit = 20, { timeout } = {}) {
    const reply = await this.#request(
      { type: "get_call_history", limit },
      (e) => e.type === "call_history" || (e.type === "error" && HISTORY_ERRORS.has(e.code)),
      timeout,
      "call_history",
    );
    if (reply.type === "error") {
      throw new SignalingError(reply.code, reply.message);
    }
    return reply.calls;
  }

  /**
   * Let the server wake this user's device by push when a call rings; resolves with the subscription id.
   * `platform` "webpush" takes `subscription` (a PushSubscription or its toJSON()); "fcm" and "apns" take `token`.
   */
  async subscribePush({ platform, subscription, token, voip = false, deviceId, timeout } = {}) {
    const message = { type: "push_subscribe", platform };
    if (subscription !== undefined && subscription !== null) {
      message.subscription = typeof subscription.toJSON === "function" ? subscription.toJSON() : subscription;
    }
    if (token !== undefined && token !== null) {
      message.token = token;
    }
    if (voip) {
      message.voip = true;
    }
    if (deviceId) {
      message.device_id = deviceId;
    }
    const reply = await this.#pushRequest(message, "push_subscribed", timeout);
    return reply.subscriptionId;
  }

  /** Remove one of this user's push subscriptions; rejects with `unknown_subscription` if there is none. */
  async unsubscribePush(subscriptionId, { timeout } = {}) {
    await this.#pushRequest(
      { type: "push_unsubscribe", subscription_id: subscriptionId },
      "push_unsubscribed",
      timeout,
    );
  }

  async #pushRequest(message, replyType, timeout) {
    const reply = await this.#request(
      message,
      (e) => e.type === replyType || (e.type === "error" && PUSH_REQUEST_ERRORS.has(e.code)),
      timeout,
      replyType,
    );
    if (reply.type === "error") {
      throw new SignalingError(reply.code, reply.message);
    }
    return reply;
  }

  /**
   * Change the watch list (kept for reconnects): follow `add`, stop following `remove`.
   * Resolves with the snapshot `presence` event of the added users who are online;
   * rejects with SignalingError `watch_limit` past the server's limit.
   */
  async watch({ add = [], remove = [], timeout } = {}) {
    const watching = new Set(this.#watching ?? []);
    for (const name of remove) {
      watching.delete(name);
    }
    for (const name of add) {
      watching.add(name);
    }
    this.#watching = watching;
    const reply = await this.#request(
      { type: "watch", add, remove },
      (e) => (e.type === "presence" && e.snapshot) || (e.type === "error" && WATCH_ERRORS.has(e.code)),
      timeout,
      "answer to watch",
    );
    if (reply.type === "error") {
      throw new SignalingError(reply.code, reply.message);
    }
    return reply;
  }

  /** A round trip to the server: resolves with the `pong` event; TimeoutError when none comes in time. */
  async ping({ timeout } = {}) {
    this.#connection.send({ type: "ping" }, { hold: false });
    return this.#hub.expect((e) => e.type === "pong", timeout ?? this.#settings.requestTimeout, "pong");
  }

  /**
   * Send a request and wait for the first event `answers` accepts. Requests go one at a time:
   * an error reply names no request, so only one may be waiting for it.
   */
  #request(message, answers, timeout, what) {
    const run = () => {
      this.#connection.send(message, { hold: false });
      return this.#hub.expect(answers, timeout ?? this.#settings.requestTimeout, what);
    };
    const reply = this.#requests.then(run, run);
    this.#requests = reply.then(
      () => undefined,
      () => undefined,
    );
    return reply;
  }
}
