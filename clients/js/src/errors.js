// The errors the client throws. Every one has a `code`: the server's error code for
// SignalingError and its subclasses, a fixed local code for the others.

/** The server answered a request with an error (`code` is the server's: `user_offline`...). */
export class SignalingError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "SignalingError";
    this.code = code;
  }
}

/** The server refused the registration: `unauthorized`, `username_taken`, `invalid_message`... */
export class RegistrationError extends SignalingError {
  constructor(code, message) {
    super(code, message);
    this.name = "RegistrationError";
  }
}

/** A call request failed: `busy`, `user_offline`, `already_in_call`, `call_rate_limited`... */
export class CallFailed extends SignalingError {
  constructor(code, message, callId = null) {
    super(code, message);
    this.name = "CallFailed";
    // Set for `busy`: the server records the busy attempt as a call of its own.
    this.callId = callId;
  }
}

/** The socket could not be opened, or closed before the registration finished. */
export class ConnectionError extends Error {
  constructor(message, closeCode = null) {
    super(message);
    this.name = "ConnectionError";
    this.code = "connection_failed";
    this.closeCode = closeCode;
  }
}

/** No answer in time: a request's reply, a registration, a pong. */
export class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
    this.code = "timeout";
  }
}

/** The client has no registered connection right now (it is connecting or reconnecting). */
export class NotConnectedError extends Error {
  constructor(message = "not connected") {
    super(message);
    this.name = "NotConnectedError";
    this.code = "not_connected";
  }
}

/** The client was closed (by `close()`, or for good by a refused registration). */
export class ClientClosedError extends Error {
  constructor(message = "the client was closed") {
    super(message);
    this.name = "ClientClosedError";
    this.code = "closed";
  }
}
