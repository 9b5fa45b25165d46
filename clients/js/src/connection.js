// Connection: one socket at a time, kept registered. It opens the socket, registers
// (resuming with the last resume token), pings, notices a dead socket, reconnects with
// backoff, and holds call messages while it is away. It knows nothing of calls or
// presence: what the server says goes to its owner (the SignalingClient) through a
// small interface, in order:
//
//   owner.registerMessage(resumeToken) -> the `register` frame (async: a token may be fetched)
//   owner.adopt(registered, reconnecting) -> the events to deliver once online
//   owner.receive(event)                  a server event
//   owner.deliver(event)                  an event the connection raises (state, reconnecting, closed)
//   owner.log(level, message, fields)
//
// The state machine, changed only by #setState (which checks the transition and logs it):
//
//   idle --connect()--> connecting --open--> registering --registered--> online
//                          ^                     |                         |
//                          |               refused/lost             lost (close, no pong)
//                          |                     v                         v
//                          +----- backoff ---- reconnecting <--------------+
//
//   and from any state to closed: close(), a failed first connect(), a registration
//   refused for good (unauthorized, username_taken...), or a loss with reconnect off.
//
// Frames and closes of a socket that is no longer the current one are ignored, so a
// socket given up on (no pong) can never disturb its successor.

import { ClientClosedError, ConnectionError, NotConnectedError, RegistrationError, TimeoutError } from "./errors.js";
import { decodeFrame } from "./events.js";

const TRANSITIONS = {
  idle: ["connecting", "closed"],
  connecting: ["registering", "reconnecting", "closed"],
  registering: ["online", "reconnecting", "closed"],
  online: ["reconnecting", "closed"],
  reconnecting: ["connecting", "closed"],
  closed: [],
};

const OPEN = 1; // WebSocket.OPEN, the same in browsers and in the ws package
const RESUME_FAILED = "resume_failed";
// Close code the server uses when it shuts down: reconnect at once, to another process.
const SERVICE_RESTART = 1012;
// Close code for a socket the client gives up on. Not 1000/1001: those tell the server
// the client left on purpose, and it would end the session instead of holding it for a resume.
const ABANDONED = 4000;
// How long close() waits for the server's closing handshake before dropping the socket.
const CLOSE_WAIT_MS = 2000;
// Registration refusals that another attempt will not change.
const FATAL_REGISTRATION_CODES = new Set([
  "unauthorized",
  "username_taken",
  "already_registered",
  "invalid_message",
  "watch_limit",
]);

export class Connection {
  #settings;
  #owner;
  #ws = null; // the current socket; null between sockets
  #state = "idle";
  #everOnline = false;
  #closing = false;
  #resumeToken = null;
  #attempt = null; // the registration in progress: {ws, reconnecting, resumeToken, timer, resolve, reject}
  #held = []; // encoded call messages, sent once the session is back
  #pingTimer = null;
  #pongDeadline = null;
  #nap = null; // the backoff wait: {timer, resolve}

  // `settings`: the client's options (url, WebSocket, reconnect, pingInterval, pingTimeout,
  // backoffInitial, backoffMax, openTimeout, requestTimeout, maxHeldMessages).
  constructor(settings, owner) {
    this.#settings = settings;
    this.#owner = owner;
  }

  get state() {
    return this.#state;
  }

  /** Open and register; resolves with `registered`. A connection whose first attempt fails is closed. */
  async connect() {
    if (this.#state !== "idle") {
      throw new Error("connect() was already called on this client");
    }
    if (typeof this.#settings.WebSocket !== "function") {
      throw new TypeError(
        "SignalingClient: no WebSocket constructor (pass the 'WebSocket' option, e.g. the ws package's, on node < 22)",
      );
    }
    try {
      return await this.#open(false);
    } catch (err) {
      // A client that never registered does not retry: the caller hears why at once.
      this.#finish(err.code ?? "connection_failed");
      throw err;
    }
  }

  /** Leave: close the socket with code 1000 (the server ends the session at once) and stop. */
  async close() {
    if (this.#state === "closed" || this.#closing) {
      return;
    }
    this.#closing = true;
    this.#wake();
    this.#failAttempt(new ClientClosedError("close() was called"), false);
    const ws = this.#ws;
    this.#ws = null;
    this.#stopKeepalive();
    if (ws !== null && ws.readyState <= OPEN) {
      await new Promise((resolve) => {
        const timer = setTimeout(() => {
          discard(ws);
          resolve();
        }, CLOSE_WAIT_MS);
        ws.addEventListener(
          "close",
          () => {
            clearTimeout(timer);
            resolve();
          },
          { once: true },
        );
        try {
          ws.close(1000, "client closed");
        } catch {
          clearTimeout(timer);
          discard(ws);
          resolve();
        }
      });
    }
    this.#finish("closed");
  }

  /**
   * Send a message now; while reconnecting, `hold` keeps it (up to maxHeldMessages) for the
   * resumed session. Throws NotConnectedError otherwise, ClientClosedError once closed.
   */
  send(message, { hold }) {
    if (this.#state === "closed" || this.#closing) {
      throw new ClientClosedError();
    }
    const text = JSON.stringify(message);
    if (this.#state === "online" && this.#ws !== null && this.#ws.readyState === OPEN) {
      this.#ws.send(text);
      return;
    }
    if (!hold || !this.#everOnline) {
      throw new NotConnectedError(this.#everOnline ? "not connected; the client is reconnecting" : "not connected");
    }
    if (this.#held.length >= this.#settings.maxHeldMessages) {
      throw new NotConnectedError(`not connected and ${this.#held.length} messages are already held`);
    }
    this.#held.push(text);
  }

  // --- One attempt: a socket, then register ------------------------------------

  /** Resolves with `registered`, rejects with why not. */
  #open(reconnecting) {
    const { url, WebSocket, openTimeout } = this.#settings;
    return new Promise((resolve, reject) => {
      this.#setState("connecting");
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (err) {
        reject(new ConnectionError(`cannot open ${url}: ${err.message}`));
        return;
      }
      this.#ws = ws;
      const timer = setTimeout(
        () => this.#failAttempt(new TimeoutError(`no connection within ${openTimeout} ms`)),
        openTimeout,
      );
      const resumeToken = reconnecting ? this.#resumeToken : null;
      this.#attempt = { ws, reconnecting, resumeToken, timer, resolve, reject };
      ws.addEventListener("open", () => this.#opened(ws));
      ws.addEventListener("message", (event) => this.#frame(ws, event.data));
      ws.addEventListener("close", (event) => this.#socketClosed(ws, event.code));
      // An error is always followed by a close; the listener keeps the ws package from throwing it.
      ws.addEventListener("error", () => {});
    });
  }

  #opened(ws) {
    const attempt = this.#attempt;
    if (ws !== this.#ws || attempt === null) {
      return;
    }
    this.#setState("registering");
    const { requestTimeout } = this.#settings;
    clearTimeout(attempt.timer);
    attempt.timer = setTimeout(
      () => this.#failAttempt(new TimeoutError(`no answer to register within ${requestTimeout} ms`)),
      requestTimeout,
    );
    this.#sendRegister(attempt);
  }

  async #sendRegister(attempt) {
    let message;
    try {
      message = await this.#owner.registerMessage(attempt.resumeToken);
    } catch (err) {
      if (this.#attempt === attempt) {
        this.#failAttempt(new RegistrationError("token_unavailable", `the token function failed: ${err.message}`));
      }
      return;
    }
    if (this.#attempt === attempt && attempt.ws.readyState === OPEN) {
      attempt.ws.send(JSON.stringify(message));
    }
  }

  #frame(ws, data) {
    if (ws !== this.#ws) {
      return;
    }
    if (typeof data !== "string") {
      this.#owner.log("warn", "ignored a binary frame from the server");
      return;
    }
    const event = decodeFrame(data);
    if (event === null) {
      this.#owner.log("warn", "ignored a frame that is not a JSON object");
      return;
    }
    if (event.type === "pong") {
      this.#pongArrived();
    }
    const attempt = this.#attempt;
    if (attempt !== null && (event.type === "registered" || event.type === "error")) {
      // While registering, the first registered or error is the answer to `register`.
      if (event.type === "registered") {
        this.#startSession(attempt, event);
      } else if (event.code === RESUME_FAILED && attempt.resumeToken !== null) {
        this.#owner.log("info", "the server could not resume the session; registering afresh");
        attempt.resumeToken = null;
        this.#resumeToken = null;
        this.#sendRegister(attempt);
      } else {
        this.#failAttempt(new RegistrationError(event.code, event.message));
      }
      return;
    }
    this.#owner.receive(event);
  }

  #startSession(attempt, registered) {
    clearTimeout(attempt.timer);
    this.#attempt = null;
    this.#resumeToken = registered.resumeToken;
    if (!registered.resumed && this.#held.length > 0) {
      this.#owner.log("info", "dropping messages held for the previous session", { count: this.#held.length });
      this.#held = [];
    }
    const events = this.#owner.adopt(registered, attempt.reconnecting);
    this.#everOnline = true;
    this.#setState("online");
    // Held messages go before anything a handler sends in answer to the events below.
    for (const text of this.#held.splice(0)) {
      attempt.ws.send(text);
    }
    this.#startKeepalive(attempt.ws);
    attempt.resolve(registered);
    for (const event of events) {
      this.#owner.deliver(event);
    }
  }

  /** The attempt in progress failed: give up its socket and reject it. */
  #failAttempt(error, discardSocket = true) {
    const attempt = this.#attempt;
    if (attempt === null) {
      return;
    }
    clearTimeout(attempt.timer);
    this.#attempt = null;
    if (discardSocket && this.#ws === attempt.ws) {
      this.#ws = null;
      discard(attempt.ws);
    }
    attempt.reject(error);
  }

  // --- Losing the socket, and coming back ----------------------------------------

  #socketClosed(ws, code) {
    if (ws !== this.#ws) {
      return;
    }
    this.#ws = null;
    this.#stopKeepalive();
    if (this.#attempt !== null) {
      this.#failAttempt(new ConnectionError(`the socket closed with code ${code} before the registration`, code));
      return;
    }
    this.#lost(`closed with code ${code}`, code === SERVICE_RESTART);
  }

  #lost(reason, immediately) {
    if (this.#closing || this.#state === "closed") {
      return;
    }
    if (!this.#settings.reconnect) {
      this.#finish(reason);
      return;
    }
    this.#owner.log("info", "connection lost; reconnecting", { reason });
    this.#reconnect(reason, immediately).catch((err) => {
      this.#owner.log("error", "the reconnect loop failed", { error: String(err) });
      this.#finish("internal_error");
    });
  }

  async #reconnect(reason, immediately) {
    for (let attempt = 1; !this.#closing; attempt += 1) {
      // After a 1012 (the server is shutting down) another process can take the session now.
      const delay = immediately && attempt === 1 ? 0 : this.#backoff(attempt);
      this.#setState("reconnecting");
      this.#owner.deliver({ type: "reconnecting", attempt, delay, reason, raw: null });
      await this.#sleep(delay);
      if (this.#closing) {
        return;
      }
      try {
        await this.#open(true);
        return;
      } catch (err) {
        if (this.#closing) {
          return;
        }
        if (err instanceof RegistrationError && FATAL_REGISTRATION_CODES.has(err.code)) {
          this.#owner.log("warn", "registration refused; giving up", { code: err.code });
          this.#finish(err.code);
          return;
        }
        reason = err instanceof RegistrationError ? `registration refused: ${err.code}` : err.message;
        this.#owner.log("info", "reconnect attempt failed", { attempt, reason });
      }
    }
  }

  /** 50-100% of initial * 2^(attempt-1), at most max. */
  #backoff(attempt) {
    const { backoffInitial, backoffMax } = this.#settings;
    const ceiling = Math.min(backoffMax, backoffInitial * 2 ** Math.min(attempt - 1, 30));
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      this.#nap = { timer: setTimeout(resolve, ms), resolve };
    });
  }

  #wake() {
    if (this.#nap !== null) {
      clearTimeout(this.#nap.timer);
      this.#nap.resolve();
      this.#nap = null;
    }
  }

  #finish(reason) {
    if (this.#state === "closed") {
      return;
    }
    this.#closing = true;
    this.#wake();
    this.#stopKeepalive();
    if (this.#ws !== null) {
      discard(this.#ws);
      this.#ws = null;
    }
    this.#held = [];
    this.#setState("closed");
    this.#owner.log("info", "client closed", { reason });
    this.#owner.deliver({ type: "closed", reason, raw: null });
  }

  #setState(next) {
    const previous = this.#state;
    if (previous === next) {
      return;
    }
    if (!TRANSITIONS[previous].includes(next)) {
      throw new Error(`SignalingClient: invalid state change ${previous} -> ${next}`);
    }
    this.#state = next;
    this.#owner.log("debug", `${previous} -> ${next}`);
    this.#owner.deliver({ type: "state", from: previous, to: next, raw: null });
  }

  // --- Keepalive: an app-level ping with a pong deadline ------------------------------

  #startKeepalive(ws) {
    const { pingInterval, pingTimeout } = this.#settings;
    if (!pingInterval) {
      return;
    }
    this.#pingTimer = setInterval(() => {
      if (ws !== this.#ws || ws.readyState !== OPEN || this.#pongDeadline !== null) {
        return; // gone, closing, or a ping still waiting for its pong: its deadline decides
      }
      ws.send(JSON.stringify({ type: "ping" }));
      this.#pongDeadline = setTimeout(() => {
        // No pong: the socket is dead (a phone that changed networks, a proxy that dropped
        // the connection silently). Give up on it now rather than wait for TCP to notice.
        this.#pongDeadline = null;
        if (ws === this.#ws) {
          this.#owner.log("warn", "no pong in time; dropping the connection", { timeout: pingTimeout });
          this.#ws = null;
          this.#stopKeepalive();
          discard(ws);
          this.#lost(`no pong within ${pingTimeout} ms`, false);
        }
      }, pingTimeout);
    }, pingInterval);
  }

  #pongArrived() {
    clearTimeout(this.#pongDeadline);
    this.#pongDeadline = null;
  }

  #stopKeepalive() {
    clearInterval(this.#pingTimer);
    this.#pingTimer = null;
    this.#pongArrived();
  }
}

/** Drop a socket now, without waiting for a closing handshake that may never come. */
function discard(ws) {
  try {
    if (typeof ws.terminate === "function") {
      ws.terminate(); // the ws package: destroys the TCP connection at once
    } else {
      ws.close(ABANDONED, "abandoned");
    }
  } catch {
    // Already closed, or closing: nothing left to drop.
  }
}
