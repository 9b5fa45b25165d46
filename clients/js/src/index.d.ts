// Type declarations for @signaling/client. Durations are in milliseconds.
// No DOM library is needed: the WebSocket and RTCPeerConnection the client uses are
// described structurally below, so browsers' and node packages' both fit.

// --- What the client is given --------------------------------------------------

/** The parts of a WebSocket the client uses (the browser's, or the ws package's). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** The ws package's immediate drop; used when present. */
  terminate?(): void;
  addEventListener(type: "open" | "error", listener: (event: unknown) => void, options?: { once?: boolean }): void;
  addEventListener(type: "message", listener: (event: { data: unknown }) => void, options?: { once?: boolean }): void;
  addEventListener(
    type: "close",
    listener: (event: { code: number; reason: string }) => void,
    options?: { once?: boolean },
  ): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** A JWT, or a function (sync or async) called on every (re)registration to get a fresh one. */
export type TokenSource = string | (() => string | Promise<string>);

/** Where the client's log lines go (`console` fits). Lines carry no SDP, candidate or token. */
export interface Logger {
  debug?(message: string, fields: Record<string, unknown>): void;
  info?(message: string, fields: Record<string, unknown>): void;
  warn?(message: string, fields: Record<string, unknown>): void;
  error?(message: string, fields: Record<string, unknown>): void;
}

export interface SignalingClientOptions {
  /** The server's WebSocket address: `wss://calls.example.com/` (`/ws/` works too). */
  url: string;
  username: string;
  /** A stable id of the user, kept on the device. In token mode the server takes it from the token. */
  userId: string;
  /** A JWT for servers with SIGNALING_AUTH=token. */
  token?: TokenSource | null;
  /** Names this device ("alice-phone"): shown in call history, the admin and logs. */
  deviceId?: string | null;
  /** "delta": a snapshot, then `presence` frames with the changes instead of whole lists. Default "full". */
  presence?: "full" | "delta";
  /** Follow only these users (a watch list, e.g. contacts), sent with every registration; see `watch()`. */
  watch?: string[] | null;
  /** Register with `resume: true` and resume the session after a drop. Default true. */
  resume?: boolean;
  /** Reconnect after a drop. Default true. */
  reconnect?: boolean;
  /** Send an app-level ping this often; 0 or null: never. Default 20000. */
  pingInterval?: number | null;
  /** A pong must come within this, or the socket is dropped and the client reconnects. Default 10000. */
  pingTimeout?: number;
  /** First reconnect delay's ceiling; doubles per attempt, each delay drawn in [ceiling/2, ceiling]. Default 500. */
  backoffInitial?: number;
  /** Ceiling of the reconnect delay. Default 30000. */
  backoffMax?: number;
  /** Time to open the socket. Default 10000. */
  openTimeout?: number;
  /** Time for the server to answer a request (register, call, history, push, ping). Default 10000. */
  requestTimeout?: number;
  /** Call messages held while reconnecting. Default 256. */
  maxHeldMessages?: number;
  /** The WebSocket constructor. Default `globalThis.WebSocket` (browsers, node >= 22). */
  WebSocket?: WebSocketConstructor | null;
  logger?: Logger | null;
}

// --- What the server sends, as events ---------------------------------------------

/** A message as the server sent it (snake_case, as on the wire). */
export type ServerMessage = { type: string; [field: string]: unknown };

export interface User {
  username: string;
  userId: string;
}

/** One of this client's live calls. */
export interface CallInfo {
  callId: string;
  peerUsername: string;
  outgoing: boolean;
  status: "ringing" | "answered" | string;
}

export interface ResumedCall {
  callId: string;
  peerUsername: string;
  status: "ringing" | "answered" | string;
}

export interface HistoryEntry {
  callId: string;
  callerUsername: string;
  calleeUsername: string;
  /** ringing, answered, completed, rejected, busy, missed, cancelled, failed */
  status: string;
  /** null while the call is live */
  endReason: string | null;
  startedAt: string | null;
  answeredAt: string | null;
  endedAt: string | null;
  durationSeconds: number | null;
  callerDeviceId: string | null;
  calleeDeviceId: string | null;
}

/** RTCIceServer, as the server hands it out. */
export interface IceServer {
  urls: string | string[];
  username?: string;
  credential?: string;
}

/** RTCSdpType. */
export type SdpType = "offer" | "answer" | "pranswer" | "rollback";

/** An SDP offer or answer as it goes over the wire: `{type, sdp}`. */
export interface SessionDescription {
  type: SdpType;
  sdp: string;
}

/** An ICE candidate: an RTCIceCandidate's toJSON(). */
export interface IceCandidateInit {
  candidate: string;
  sdpMid?: string | null;
  sdpMLineIndex?: number | null;
  usernameFragment?: string | null;
}

interface FromServer {
  /** The message as the server sent it. */
  raw: ServerMessage;
}

interface FromClient {
  /** Raised by the client itself: nothing came from the server. */
  raw: null;
}

export interface RegisteredEvent extends FromServer {
  type: "registered";
  username: string;
  userId: string;
  iceServers: IceServer[];
  resumeToken: string | null;
  /** True after a resume: `calls` lists the calls that survived. */
  resumed: boolean;
  calls: ResumedCall[];
  deviceId: string | null;
  /** The server's Web Push application key (base64url); null when it sends no Web Push. */
  vapidPublicKey: string | null;
}

/** The whole list of who is online, on every change (presence "full", v1). */
export interface OnlineUsersEvent extends FromServer {
  type: "online_users";
  users: User[];
  timestamp: string | null;
}

/**
 * One user came online (or went offline: UserOfflineEvent), one event per user of a
 * `presence` frame; `raw` is that frame; `users` is the current set after the frame.
 */
export interface UserOnlineEvent extends FromServer {
  type: "user_online";
  username: string;
  userId: string;
  users: User[];
}

export interface UserOfflineEvent extends FromServer {
  type: "user_offline";
  username: string;
  userId: string;
  users: User[];
}

/**
 * Delta presence and watch lists: who came online and who went offline in one change
 * window (each user once, in its final state). `snapshot`: the whole picture of the users
 * it covers (after registering: everyone followed; in answer to `watch()`: the users just
 * added). `users` is the current set after the frame.
 */
export interface PresenceEvent extends FromServer {
  type: "presence";
  snapshot: boolean;
  online: User[];
  offline: User[];
  users: User[];
}

export interface IncomingCallEvent extends FromServer {
  type: "incoming_call";
  callerUsername: string;
  callerId: string;
  callId: string | null;
}

/** The call this client requested rings; `push` when the callee's device is being woken by a push. */
export interface CallRingingEvent extends FromServer {
  type: "call_ringing";
  callId: string;
  targetUsername: string;
  push: boolean;
}

export interface CallAcceptedEvent extends FromServer {
  type: "call_accepted";
  accepterUsername: string;
  callId: string | null;
}

export interface CallRejectedEvent extends FromServer {
  type: "call_rejected";
  rejecterUsername: string;
  callId: string | null;
  reason: "rejected" | "busy" | string;
}

/**
 * A call ended. `reason`: hangup, cancelled, timeout, disconnected, rejected, answered_elsewhere.
 * The client raises it too (raw null, reason "disconnected") for calls lost when a session could not be resumed.
 */
export interface CallEndedEvent {
  type: "call_ended";
  fromUsername: string;
  callId: string | null;
  reason: string | null;
  raw: ServerMessage | null;
}

export interface OfferEvent extends FromServer {
  type: "offer";
  fromUsername: string;
  data: SessionDescription;
  callId: string | null;
}

export interface AnswerEvent extends FromServer {
  type: "answer";
  fromUsername: string;
  data: SessionDescription;
  callId: string | null;
}

export interface IceCandidateEvent extends FromServer {
  type: "ice_candidate";
  fromUsername: string;
  data: IceCandidateInit;
  callId: string | null;
}

export interface CallHistoryEvent extends FromServer {
  type: "call_history";
  calls: HistoryEntry[];
}

export interface PushSubscribedEvent extends FromServer {
  type: "push_subscribed";
  subscriptionId: string;
}

export interface PushUnsubscribedEvent extends FromServer {
  type: "push_unsubscribed";
  subscriptionId: string;
}

export interface PongEvent extends FromServer {
  type: "pong";
  serverTime: string | null;
}

/** The server refused a message; the connection stays usable. */
export interface ErrorEvent extends FromServer {
  type: "error";
  code: string;
  message: string;
}

/** The other party's connection dropped; the server holds the call while it comes back. */
export interface PeerReconnectingEvent extends FromServer {
  type: "peer_reconnecting";
  username: string;
  callId: string | null;
}

export interface PeerReconnectedEvent extends FromServer {
  type: "peer_reconnected";
  username: string;
  callId: string | null;
}

/** A message type this version does not know; read it from `raw`. */
export interface UnknownEvent extends FromServer {
  type: "unknown";
  messageType: string;
}

/** The socket dropped; the next attempt starts after `delay` ms. */
export interface ReconnectingEvent extends FromClient {
  type: "reconnecting";
  attempt: number;
  delay: number;
  reason: string;
}

/** Registered again after a drop; `resumed` tells whether the old session (and its calls) survived. */
export interface ReconnectedEvent extends FromClient {
  type: "reconnected";
  resumed: boolean;
}

/** The client stopped for good: "closed" (close()), a refusal's code ("unauthorized"...), or why the socket went. */
export interface ClosedEvent extends FromClient {
  type: "closed";
  reason: string;
}

export type ClientState = "idle" | "connecting" | "registering" | "online" | "reconnecting" | "closed";

export interface StateEvent extends FromClient {
  type: "state";
  from: ClientState;
  to: ClientState;
}

export interface SignalingEventMap {
  registered: RegisteredEvent;
  online_users: OnlineUsersEvent;
  user_online: UserOnlineEvent;
  user_offline: UserOfflineEvent;
  presence: PresenceEvent;
  incoming_call: IncomingCallEvent;
  call_ringing: CallRingingEvent;
  call_accepted: CallAcceptedEvent;
  call_rejected: CallRejectedEvent;
  call_ended: CallEndedEvent;
  offer: OfferEvent;
  answer: AnswerEvent;
  ice_candidate: IceCandidateEvent;
  call_history: CallHistoryEvent;
  push_subscribed: PushSubscribedEvent;
  push_unsubscribed: PushUnsubscribedEvent;
  pong: PongEvent;
  error: ErrorEvent;
  peer_reconnecting: PeerReconnectingEvent;
  peer_reconnected: PeerReconnectedEvent;
  unknown: UnknownEvent;
  reconnecting: ReconnectingEvent;
  reconnected: ReconnectedEvent;
  closed: ClosedEvent;
  state: StateEvent;
}

export type SignalingEventType = keyof SignalingEventMap;
export type SignalingEvent = SignalingEventMap[SignalingEventType];

/** The message types the server sends (each an event type of the same name). */
export declare const SERVER_EVENT_TYPES: readonly string[];
/** The event types the client raises itself. */
export declare const CLIENT_EVENT_TYPES: readonly [
  "user_online",
  "user_offline",
  "reconnecting",
  "reconnected",
  "closed",
  "state",
];

/** Turn one decoded server message into an event (pure; unknown types become "unknown"). */
export declare function parseEvent(message: ServerMessage): SignalingEvent;

// --- The client -------------------------------------------------------------------------

export interface RequestOptions {
  /** Default: the client's requestTimeout. */
  timeout?: number;
}

export interface WatchOptions extends RequestOptions {
  add?: string[];
  remove?: string[];
}

export interface PushSubscriptionOptions extends RequestOptions {
  platform: "webpush" | "fcm" | "apns";
  /** webpush: a PushSubscription (or its toJSON(): endpoint, keys.p256dh, keys.auth). */
  subscription?: { endpoint: string; keys: { p256dh: string; auth: string } } | { toJSON(): unknown };
  /** fcm: the registration token; apns: the device token in hex. */
  token?: string;
  /** apns: a PushKit VoIP token. */
  voip?: boolean;
  /** Default: the session's device id. */
  deviceId?: string;
}

export declare class SignalingClient {
  constructor(options: SignalingClientOptions);

  readonly url: string;
  readonly username: string;
  readonly userId: string;
  readonly deviceId: string | null;
  readonly presence: "full" | "delta";
  readonly resume: boolean;
  /** The watch list (null: following everyone, as `presence` says). */
  readonly watching: string[] | null;
  /** Read on every (re)registration: replace it to use another token from the next one on. */
  token: TokenSource | null;

  readonly state: ClientState;
  /** Registered on a live socket right now. */
  readonly connected: boolean;
  readonly closed: boolean;
  /** The latest `registered` event. */
  readonly registered: RegisteredEvent | null;
  /** Pass to `new RTCPeerConnection({iceServers})`. */
  readonly iceServers: IceServer[];
  /** Who is online now, kept current by full lists and deltas. */
  readonly onlineUsers: User[];
  /** This client's live calls by call id (a copy). */
  readonly calls: Map<string, CallInfo>;

  /** Open and register. Rejects with RegistrationError (`code`: unauthorized, username_taken...),
   *  ConnectionError or TimeoutError; a client whose connect() failed is closed. */
  connect(): Promise<RegisteredEvent>;
  /** Leave: close the socket with code 1000 (the session ends at once), then a `closed` event. */
  close(): Promise<void>;

  /** Handle every event of a type ("*": every event); returns a function that removes the handler. */
  on<K extends SignalingEventType>(type: K, handler: (event: SignalingEventMap[K]) => unknown): () => void;
  on(type: "*", handler: (event: SignalingEvent) => unknown): () => void;
  off<K extends SignalingEventType>(type: K, handler: (event: SignalingEventMap[K]) => unknown): void;
  off(type: "*", handler: (event: SignalingEvent) => unknown): void;
  /** The next matching event; rejects with TimeoutError after `timeout` ms (default: none). */
  waitFor<K extends SignalingEventType>(
    type: K,
    predicate?: ((event: SignalingEventMap[K]) => boolean) | null,
    timeout?: number,
  ): Promise<SignalingEventMap[K]>;
  waitFor(
    type: "*",
    predicate?: ((event: SignalingEvent) => boolean) | null,
    timeout?: number,
  ): Promise<SignalingEvent>;

  /** Ring `username`; resolves with the call id once it rings. Rejects with CallFailed
   *  (`busy`, `user_offline`, `already_in_call`, `call_rate_limited`...) or NotConnectedError. */
  call(username: string, options?: RequestOptions): Promise<string>;
  /** Accept a ringing incoming call (held while reconnecting). */
  accept(callId: string): Promise<void>;
  /** Refuse a ringing incoming call. */
  reject(callId: string): Promise<void>;
  /** Hang up an answered call, or cancel one still ringing. */
  hangUp(callId: string): Promise<void>;
  /** Relay to the other party of a call, named by call id or by peer username (held while reconnecting). */
  sendOffer(callIdOrUsername: string, data: SessionDescription): Promise<void>;
  sendAnswer(callIdOrUsername: string, data: SessionDescription): Promise<void>;
  sendCandidate(callIdOrUsername: string, data: IceCandidateInit): Promise<void>;
  /** This user's recent calls, newest first (limit 1-100). */
  history(limit?: number, options?: RequestOptions): Promise<HistoryEntry[]>;
  /** Let the server wake this device by push; resolves with the subscription id (the same id for the same address).
   *  Rejects with SignalingError: unauthorized (open mode), push_unavailable, invalid_message, too_many_subscriptions. */
  subscribePush(options: PushSubscriptionOptions): Promise<string>;
  /** Rejects with SignalingError `unknown_subscription` if this user has no such subscription. */
  unsubscribePush(subscriptionId: string, options?: RequestOptions): Promise<void>;
  /** Change the watch list (kept for reconnects); resolves with the snapshot `presence` event of the
   *  added users who are online. Rejects with SignalingError `watch_limit` past the server's limit. */
  watch(options: WatchOptions): Promise<PresenceEvent>;
  /** A round trip to the server. */
  ping(options?: RequestOptions): Promise<PongEvent>;
}

// --- The WebRTC helper ------------------------------------------------------------------

/** A description as RTCPeerConnection makes and takes them (RTCSessionDescriptionInit). */
export interface SessionDescriptionInit {
  type: SdpType;
  sdp?: string;
}

/** A listener of `icecandidate` (RTCPeerConnectionIceEvent: a null candidate ends gathering). */
export type IceCandidateListener = (event: {
  candidate: (IceCandidateInit & { toJSON?(): IceCandidateInit }) | null;
}) => void;

/** The parts of an RTCPeerConnection the helper uses. */
export interface PeerConnectionLike {
  readonly localDescription: SessionDescriptionInit | null;
  createOffer(): Promise<SessionDescriptionInit>;
  createAnswer(): Promise<SessionDescriptionInit>;
  setLocalDescription(description: SessionDescriptionInit): Promise<void>;
  setRemoteDescription(description: SessionDescriptionInit): Promise<void>;
  addIceCandidate(candidate: IceCandidateInit): Promise<void>;
  close(): void;
  addEventListener(type: "icecandidate", listener: IceCandidateListener): void;
  removeEventListener(type: "icecandidate", listener: IceCandidateListener): void;
}

export interface PeerConnectionOptions<P extends PeerConnectionLike> {
  /** Add tracks or transceivers: called once, before the offer (caller) or after the offer is applied (callee). */
  prepare?: (pc: P, role: "caller" | "callee") => void | Promise<void>;
  /** A step failed (or a remote candidate was refused). Default: console.error. */
  onError?: (error: unknown) => void;
}

/**
 * The WebRTC side of one call: the caller offers once the call is accepted, the callee answers,
 * candidates trickle both ways (queued until the remote description is set); ends with the call.
 * Create it right after `call()` resolves (caller) or before `accept()` (callee).
 */
export declare class PeerConnection<P extends PeerConnectionLike = PeerConnectionLike> {
  constructor(client: SignalingClient, callId: string, pc: P, options?: PeerConnectionOptions<P>);
  readonly callId: string;
  readonly pc: P;
  readonly role: "caller" | "callee";
  readonly closed: boolean;
  /** Hang up the call for both sides and close the peer connection. */
  hangUp(): Promise<void>;
  /** Close the peer connection and stop listening, without telling the server. */
  close(): void;
}

// --- Errors ---------------------------------------------------------------------------------

/** The server answered with an error; `code` is the server's. */
export declare class SignalingError extends Error {
  constructor(code: string, message?: string);
  readonly code: string;
}
/** The server refused the registration: unauthorized, username_taken, invalid_message... (token_unavailable: the token function threw). */
export declare class RegistrationError extends SignalingError {}
/** A call request failed: busy, user_offline, already_in_call, call_rate_limited... */
export declare class CallFailed extends SignalingError {
  constructor(code: string, message?: string, callId?: string | null);
  /** The busy attempt's call id (the server records it); null otherwise. */
  readonly callId: string | null;
}
/** The socket could not be opened, or closed before the registration finished. */
export declare class ConnectionError extends Error {
  constructor(message: string, closeCode?: number | null);
  readonly code: "connection_failed";
  readonly closeCode: number | null;
}
export declare class TimeoutError extends Error {
  readonly code: "timeout";
}
/** No registered connection right now (connecting or reconnecting). */
export declare class NotConnectedError extends Error {
  readonly code: "not_connected";
}
export declare class ClientClosedError extends Error {
  readonly code: "closed";
}
