// @signaling/client: a dependency-free client for the WebRTC call signaling server.
// See README.md for an example and index.d.ts for every option, method and event.

export { SignalingClient } from "./client.js";
export { PeerConnection } from "./peer.js";
export { parseEvent, SERVER_EVENT_TYPES, CLIENT_EVENT_TYPES } from "./events.js";
export {
  SignalingError,
  RegistrationError,
  CallFailed,
  ConnectionError,
  TimeoutError,
  NotConnectedError,
  ClientClosedError,
} from "./errors.js";
