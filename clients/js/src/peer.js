// PeerConnection: the WebRTC side of one call, on an RTCPeerConnection the app provides.
//
// The flow is the simple one the browser test page uses: the caller creates the offer
// once the call is accepted, the callee answers the offer, and both trickle ICE
// candidates. Candidates that arrive before the remote description is set are queued
// and added right after it. No browser global is touched: the app passes its
// RTCPeerConnection (browsers have one; node apps and tests bring their own or a fake).
// Renegotiation is limited to answering a new offer; ICE restarts are up to the app.

export class PeerConnection {
  #client;
  #pc;
  #callId;
  #role;
  #prepare;
  #onError;
  #prepared = false;
  #remoteSet = false;
  #pending = []; // remote candidates waiting for the remote description
  #steps = Promise.resolve(); // offer/answer/candidate work, strictly in arrival order
  #unsubscribe = [];
  #closed = false;
  #onLocalCandidate;

  /**
   * @param client a SignalingClient that knows the call (from `call()` or an `incoming_call`)
   * @param callId the call's id
   * @param pc an RTCPeerConnection, made with `{iceServers: client.iceServers}`
   * @param options `prepare(pc, role)`: add tracks or transceivers, called once before the
   *   first offer (caller) or after the offer is applied (callee); `onError(error)`.
   */
  constructor(client, callId, pc, { prepare = null, onError = null } = {}) {
    const info = client.calls.get(callId);
    if (!info) {
      throw new Error(`PeerConnection: no live call ${JSON.stringify(callId)} on this client`);
    }
    this.#client = client;
    this.#pc = pc;
    this.#callId = callId;
    this.#role = info.outgoing ? "caller" : "callee";
    this.#prepare = prepare;
    this.#onError = onError ?? ((err) => console.error("PeerConnection:", err));
    const onCall = (type, handler) =>
      client.on(type, (event) => {
        if (event.callId === callId) {
          handler(event);
        }
      });
    this.#unsubscribe = [
      onCall("call_accepted", () => this.#role === "caller" && this.#step(() => this.#offer())),
      onCall("offer", (event) => this.#step(() => this.#answer(event.data))),
      onCall("answer", (event) => this.#step(() => this.#applyRemote(event.data))),
      onCall("ice_candidate", (event) => this.#step(() => this.#addRemoteCandidate(event.data))),
      onCall("call_ended", () => this.close()),
      onCall("call_rejected", () => this.close()),
      client.on("closed", () => this.close()),
    ];
    this.#onLocalCandidate = (event) => {
      // A null candidate marks the end of gathering: nothing to relay.
      if (event.candidate && !this.#closed) {
        const candidate = candidateInit(event.candidate);
        this.#client.sendCandidate(callId, candidate).catch((err) => this.#onError(err));
      }
    };
    pc.addEventListener("icecandidate", this.#onLocalCandidate);
    // Made after the accept arrived (the app waited for call_accepted): offer now.
    if (info.outgoing && info.status === "answered") {
      this.#step(() => this.#offer());
    }
  }

  get callId() {
    return this.#callId;
  }

  get pc() {
    return this.#pc;
  }

  /** "caller" or "callee". */
  get role() {
    return this.#role;
  }

  get closed() {
    return this.#closed;
  }

  /** End the call for both sides and close the peer connection. */
  async hangUp() {
    const wasOpen = !this.#closed;
    this.close();
    if (wasOpen) {
      await this.#client.hangUp(this.#callId);
    }
  }

  /** Close the peer connection and stop listening, without telling the server (the call ended). */
  close() {
    if (this.#closed) {
      return;
    }
    this.#closed = true;
    for (const off of this.#unsubscribe) {
      off();
    }
    this.#pc.removeEventListener("icecandidate", this.#onLocalCandidate);
    this.#pending = [];
    try {
      this.#pc.close();
    } catch (err) {
      this.#onError(err);
    }
  }

  #step(work) {
    this.#steps = this.#steps.then(async () => {
      if (this.#closed) {
        return;
      }
      try {
        await work();
      } catch (err) {
        if (!this.#closed) {
          this.#onError(err);
        }
      }
    });
    return this.#steps;
  }

  async #ready() {
    if (!this.#prepared) {
      this.#prepared = true;
      if (this.#prepare) {
        await this.#prepare(this.#pc, this.#role);
      }
    }
  }

  async #offer() {
    await this.#ready();
    const offer = await this.#pc.createOffer();
    await this.#pc.setLocalDescription(offer);
    if (!this.#closed) {
      await this.#client.sendOffer(this.#callId, descriptionInit(this.#pc.localDescription ?? offer));
    }
  }

  async #answer(offer) {
    await this.#applyRemote(offer);
    // Tracks added after the offer is applied reuse the transceivers it created.
    await this.#ready();
    const answer = await this.#pc.createAnswer();
    await this.#pc.setLocalDescription(answer);
    if (!this.#closed) {
      await this.#client.sendAnswer(this.#callId, descriptionInit(this.#pc.localDescription ?? answer));
    }
  }

  async #applyRemote(description) {
    await this.#pc.setRemoteDescription(description);
    this.#remoteSet = true;
    for (const candidate of this.#pending.splice(0)) {
      await this.#addCandidate(candidate);
    }
  }

  async #addRemoteCandidate(candidate) {
    if (!this.#remoteSet) {
      this.#pending.push(candidate);
      return;
    }
    await this.#addCandidate(candidate);
  }

  async #addCandidate(candidate) {
    try {
      await this.#pc.addIceCandidate(candidate);
    } catch (err) {
      // Browsers refuse some candidates (an unsupported transport...); the call goes on with the rest.
      this.#onError(err);
    }
  }
}

function descriptionInit(description) {
  return { type: description.type, sdp: description.sdp };
}

function candidateInit(candidate) {
  if (typeof candidate.toJSON === "function") {
    return candidate.toJSON();
  }
  const { candidate: text, sdpMid = null, sdpMLineIndex = null, usernameFragment } = candidate;
  const init = { candidate: text, sdpMid, sdpMLineIndex };
  if (usernameFragment) {
    init.usernameFragment = usernameFragment;
  }
  return init;
}
