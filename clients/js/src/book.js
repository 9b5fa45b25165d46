// CallBook: what the client knows from the events it saw: who is online and its live calls.
// Pure bookkeeping, no I/O: the client feeds it every server event, in order.

import { foldUsername } from "./events.js";

// Ended call ids kept to tell a late message for a finished call from a wrong id.
const REMEMBERED_ENDED_CALLS = 256;

export class CallBook {
  /** @type {Map<string, {callId: string, peerUsername: string, outgoing: boolean, status: string}>} */
  calls = new Map();
  /** @type {Map<string, {username: string, userId: string}>} */
  online = new Map();
  #fresh = true; // the next presence snapshot replaces the list (the first after registered)
  #ended = new Set(); // insertion order: the oldest is dropped first
  #reportedLost = new Set();

  /** Update from a server event; false for a duplicate the application must not see. */
  track(event) {
    switch (event.type) {
      case "online_users":
        this.online = new Map(event.users.map((u) => [u.username, u]));
        break;
      case "presence":
        if (event.snapshot && this.#fresh) {
          this.online = new Map();
        }
        this.#fresh = false;
        // Each user is listed once, in its final state: the two lists never overlap.
        for (const u of event.offline) {
          this.online.delete(u.username);
        }
        for (const u of event.online) {
          this.online.set(u.username, u);
        }
        break;
      case "incoming_call":
        if (event.callId) {
          this.calls.set(event.callId, call(event.callId, event.callerUsername, false, "ringing"));
        }
        break;
      case "call_ringing":
        this.calls.set(event.callId, call(event.callId, event.targetUsername, true, "ringing"));
        break;
      case "call_accepted":
        if (event.callId) {
          this.answered(event.callId);
        }
        break;
      case "call_ended":
      case "call_rejected":
        if (event.callId) {
          if (this.#reportedLost.has(event.callId)) {
            // Already reported as ended when the session could not be resumed.
            return false;
          }
          this.forget(event.callId);
        }
        break;
      default:
        break;
    }
    return true;
  }

  answered(callId) {
    const info = this.calls.get(callId);
    if (info) {
      this.calls.set(callId, { ...info, status: "answered" });
    }
  }

  forget(callId) {
    this.calls.delete(callId);
    this.#ended.delete(callId);
    this.#ended.add(callId);
    while (this.#ended.size > REMEMBERED_ENDED_CALLS) {
      const oldest = this.#ended.values().next().value;
      this.#ended.delete(oldest);
      this.#reportedLost.delete(oldest);
    }
  }

  /** Whether this call was live here and has ended (recently). */
  ended(callId) {
    return this.#ended.has(callId);
  }

  /** The live call named by its id, or else by its peer's username (the most recent call with them). */
  find(callIdOrUsername) {
    const byId = this.calls.get(callIdOrUsername);
    if (byId) {
      return byId;
    }
    const peer = foldUsername(callIdOrUsername);
    let found = null;
    for (const info of this.calls.values()) {
      if (foldUsername(info.peerUsername) === peer) {
        found = info;
      }
    }
    return found;
  }

  /** Take the calls of a new registration; return call_ended events for the calls it lost. */
  adopt(registered) {
    let lost;
    if (registered.resumed) {
      const live = new Set(registered.calls.map((c) => c.callId));
      lost = [...this.calls.values()].filter((info) => !live.has(info.callId));
      this.calls = new Map(
        registered.calls.map((c) => [
          c.callId,
          call(c.callId, c.peerUsername, this.calls.get(c.callId)?.outgoing ?? false, c.status),
        ]),
      );
    } else {
      lost = [...this.calls.values()];
      this.calls = new Map();
    }
    this.#fresh = true;
    for (const info of lost) {
      this.forget(info.callId);
      this.#reportedLost.add(info.callId);
    }
    return lost.map((info) => ({
      type: "call_ended",
      fromUsername: info.peerUsername,
      callId: info.callId,
      reason: "disconnected",
      raw: null,
    }));
  }
}

function call(callId, peerUsername, outgoing, status) {
  return { callId, peerUsername, outgoing, status };
}
