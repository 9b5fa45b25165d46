// Server messages as typed events: pure functions, no I/O.
//
// `parseEvent` turns one decoded server message into an event object whose `type`
// is the message type and whose fields are the message's, in camelCase, with
// defaults for what an older server leaves out (a v1 server sends no `call_id`).
// It never throws: an unknown type becomes `{type: "unknown", messageType}`, so a
// newer server's additions reach the application instead of breaking the client.
// Every event keeps `raw`, the message as the server sent it (null for the events
// the client raises itself: reconnecting, reconnected, closed, state, and the
// call_ended it reports for calls lost with a session; the user_online and
// user_offline it derives from a presence frame carry that frame).

const str = (m, name) => (typeof m[name] === "string" ? m[name] : "");
const optStr = (m, name) => (typeof m[name] === "string" ? m[name] : null);
const objects = (m, name) =>
  Array.isArray(m[name])
    ? m[name].filter((item) => item !== null && typeof item === "object" && !Array.isArray(item))
    : [];
const object = (value) => (value !== null && typeof value === "object" && !Array.isArray(value) ? value : {});
const finite = (value) => (typeof value === "number" && Number.isFinite(value) ? value : null);

function user(u) {
  return { username: str(u, "username"), userId: str(u, "user_id") };
}

function historyEntry(c) {
  return {
    callId: str(c, "call_id"),
    callerUsername: str(c, "caller_username"),
    calleeUsername: str(c, "callee_username"),
    status: str(c, "status"),
    endReason: optStr(c, "end_reason"),
    startedAt: optStr(c, "started_at"),
    answeredAt: optStr(c, "answered_at"),
    endedAt: optStr(c, "ended_at"),
    durationSeconds: finite(c.duration_s),
    callerDeviceId: optStr(c, "caller_device_id"),
    calleeDeviceId: optStr(c, "callee_device_id"),
  };
}

const signal = (m) => ({ fromUsername: str(m, "from_username"), data: object(m.data), callId: optStr(m, "call_id") });

const PARSERS = {
  registered: (m) => ({
    username: str(m, "username"),
    userId: str(m, "user_id"),
    iceServers: objects(m, "ice_servers"),
    resumeToken: optStr(m, "resume_token"),
    resumed: m.resumed === true,
    calls: objects(m, "calls").map((c) => ({
      callId: str(c, "call_id"),
      peerUsername: str(c, "peer_username"),
      status: str(c, "status"),
    })),
    deviceId: optStr(m, "device_id"),
    vapidPublicKey: optStr(m, "vapid_public_key"),
  }),
  online_users: (m) => ({ users: objects(m, "users").map(user), timestamp: optStr(m, "timestamp") }),
  presence: (m) => ({
    snapshot: m.snapshot === true,
    online: objects(m, "online").map(user),
    offline: objects(m, "offline").map(user),
  }),
  incoming_call: (m) => ({
    callerUsername: str(m, "caller_username"),
    callerId: str(m, "caller_id"),
    callId: optStr(m, "call_id"),
  }),
  call_ringing: (m) => ({
    callId: str(m, "call_id"),
    targetUsername: str(m, "target_username"),
    push: m.push === true,
  }),
  call_accepted: (m) => ({ accepterUsername: str(m, "accepter_username"), callId: optStr(m, "call_id") }),
  call_rejected: (m) => ({
    rejecterUsername: str(m, "rejecter_username"),
    callId: optStr(m, "call_id"),
    reason: optStr(m, "reason") ?? "rejected",
  }),
  call_ended: (m) => ({
    fromUsername: str(m, "from_username"),
    callId: optStr(m, "call_id"),
    reason: optStr(m, "reason"),
  }),
  offer: signal,
  answer: signal,
  ice_candidate: signal,
  call_history: (m) => ({ calls: objects(m, "calls").map(historyEntry) }),
  push_subscribed: (m) => ({ subscriptionId: str(m, "subscription_id") }),
  push_unsubscribed: (m) => ({ subscriptionId: str(m, "subscription_id") }),
  pong: (m) => ({ serverTime: optStr(m, "server_time") }),
  error: (m) => ({ code: str(m, "code"), message: str(m, "message") }),
  peer_reconnecting: (m) => ({ username: str(m, "username"), callId: optStr(m, "call_id") }),
  peer_reconnected: (m) => ({ username: str(m, "username"), callId: optStr(m, "call_id") }),
};

/** The message types the server sends, each an event type of the same name. */
export const SERVER_EVENT_TYPES = Object.freeze(Object.keys(PARSERS));

/** The event types the client raises itself (user_online / user_offline: one per user of a presence frame). */
export const CLIENT_EVENT_TYPES = Object.freeze([
  "user_online",
  "user_offline",
  "reconnecting",
  "reconnected",
  "closed",
  "state",
]);

/** Turn one decoded server message (a plain object) into an event. */
export function parseEvent(message) {
  const kind = message.type;
  const parse = typeof kind === "string" && Object.hasOwn(PARSERS, kind) ? PARSERS[kind] : null;
  if (parse === null) {
    return { type: "unknown", messageType: typeof kind === "string" ? kind : "", raw: message };
  }
  return { type: kind, ...parse(message), raw: message };
}

/** Parse one text frame: the event, or null for anything that is not a JSON object. */
export function decodeFrame(text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch {
    return null;
  }
  if (message === null || typeof message !== "object" || Array.isArray(message)) {
    return null;
  }
  return parseEvent(message);
}

/** Fold a username the way the server compares them (case and width), near enough to match replies. */
export function foldUsername(username) {
  return String(username).normalize("NFKC").toLowerCase();
}
