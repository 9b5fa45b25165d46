// Browser test page for the signaling server: register, see who is online, call.
// Plain WebRTC with one simple flow: the caller makes the offer once the call is
// accepted, the callee answers, both trickle ICE candidates.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    timer: $("call-timer"),
    registerPanel: $("register-panel"),
    registerForm: $("register-form"),
    username: $("username"),
    token: $("token"),
    password: $("password"),
    registerBtn: $("register-btn"),
    mePanel: $("me-panel"),
    meName: $("me-name"),
    pushRow: $("push-row"),
    pushSwitch: $("push-switch"),
    pushNote: $("push-note"),
    users: $("online-users"),
    usersEmpty: $("online-empty"),
    history: $("call-history"),
    historyEmpty: $("history-empty"),
    localVideo: $("local-video"),
    remoteVideo: $("remote-video"),
    remoteLabel: $("remote-label"),
    stageHint: $("stage-hint"),
    muteBtn: $("mute-btn"),
    cameraBtn: $("camera-btn"),
    hangupBtn: $("hangup-btn"),
    incoming: $("incoming-call"),
    incomingText: $("incoming-text"),
    acceptBtn: $("accept-btn"),
    rejectBtn: $("reject-btn"),
  };

  const HISTORY_LIMIT = 20;
  const RECONNECT_MAX_MS = 15000;
  // Call errors that mean an outgoing call never started.
  const CALL_REFUSALS = new Set(["user_offline", "already_in_call", "invalid_message", "rate_limited"]);
  // Errors the server may answer push_subscribe and push_unsubscribe with.
  const PUSH_REFUSALS = new Set([
    "unauthorized",
    "push_unavailable",
    "invalid_message",
    "too_many_subscriptions",
    "unknown_subscription",
    "rate_limited",
    "internal_error",
  ]);
  const PUSH_REPLY_TIMEOUT_MS = 10000;

  const state = {
    ws: null,
    wantOnline: false,
    registered: false,
    me: null, // {username, userId, token}
    deviceId: null,
    push: { key: null, request: null }, // the server's VAPID key; the push request awaiting its reply
    iceServers: [],
    users: [],
    call: null,
    media: null, // Promise<MediaStream|null> for the current call
    reconnectDelay: 1000,
    timerHandle: null,
  };

  // --- Small helpers ---------------------------------------------------

  function setStatus(text, phase, reason) {
    ui.status.textContent = text;
    ui.status.dataset.state = phase;
    if (reason) {
      ui.status.dataset.reason = reason;
    } else {
      delete ui.status.dataset.reason;
    }
  }

  function send(message) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  function randomId() {
    if (window.crypto && crypto.randomUUID) {
      return crypto.randomUUID();
    }
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // One user_id per username, kept in this browser, so the same name in two
  // tabs is the same user (the server refuses a name held by another user_id).
  function userIdFor(username) {
    let ids = {};
    try {
      ids = JSON.parse(localStorage.getItem("calls.userIds") || "{}") || {};
    } catch (err) {
      ids = {};
    }
    if (!ids[username]) {
      ids[username] = randomId();
      try {
        localStorage.setItem("calls.userIds", JSON.stringify(ids));
      } catch (err) {
        // Private browsing may refuse storage: the id then lives for this tab only.
      }
    }
    return ids[username];
  }

  // One device id per browser profile: it names this browser in the server's
  // call history and on its push subscription.
  function browserDeviceId() {
    let id = null;
    try {
      id = localStorage.getItem("calls.deviceId");
    } catch (err) {
      id = null;
    }
    if (!id) {
      id = `browser-${randomId().slice(0, 8)}`;
      try {
        localStorage.setItem("calls.deviceId", id);
      } catch (err) {
        // Private browsing may refuse storage: the id then lives for this tab only.
      }
    }
    return id;
  }

  function formatDuration(totalSeconds) {
    const s = Math.max(0, Math.floor(totalSeconds));
    const hours = Math.floor(s / 3600);
    const mm = String(Math.floor((s % 3600) / 60)).padStart(2, "0");
    const ss = String(s % 60).padStart(2, "0");
    return hours ? `${hours}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  // --- Server connection -----------------------------------------------

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/`);
    state.ws = ws;
    ws.addEventListener("open", () => {
      state.reconnectDelay = 1000;
      const message = {
        type: "register",
        username: state.me.username,
        user_id: state.me.userId,
        device_id: state.deviceId,
      };
      if (state.me.token) {
        message.token = state.me.token;
      }
      send(message);
    });
    ws.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (message && Object.prototype.hasOwnProperty.call(handlers, message.type)) {
        handlers[message.type](message);
      }
    });
    ws.addEventListener("close", (event) => {
      if (state.ws !== ws) {
        return;
      }
      state.ws = null;
      state.registered = false;
      ui.pushSwitch.disabled = true;
      if (state.push.request) {
        state.push.request.settle(null, new Error("the connection to the server was lost"));
      }
      if (state.call) {
        finishCall(state.call, "Call ended: the connection to the server was lost", "disconnected");
      }
      renderUsers([]);
      // Retry only a session that once worked: a first failure is reported as it is.
      if (event.code === 4401 || !state.wantOnline || !state.me.wasOnline) {
        if (state.wantOnline) {
          setStatus(event.code === 4401 ? "The server refused the token" : "Could not reach the server", "error");
        }
        goOffline();
        return;
      }
      setStatus("Connection to the server lost; reconnecting…", "offline");
      window.setTimeout(() => {
        if (state.wantOnline && !state.ws) {
          connect();
        }
      }, state.reconnectDelay);
      state.reconnectDelay = Math.min(state.reconnectDelay * 2, RECONNECT_MAX_MS);
    });
  }

  async function goOnline(username, password, token) {
    state.wantOnline = true;
    ui.registerBtn.disabled = true;
    try {
      localStorage.setItem("calls.lastUsername", username);
    } catch (err) {
      // Only a convenience: the name is not prefilled next time.
    }
    if (password) {
      setStatus("Signing in…", "connecting");
      try {
        token = await fetchToken(username, password);
      } catch (err) {
        setStatus(`Could not sign in: ${err.message}`, "error");
        goOffline();
        return;
      }
    }
    state.me = { username, userId: userIdFor(username), token, wasOnline: false };
    setStatus(`Going online as ${username}…`, "connecting");
    connect();
  }

  // Servers in token mode: trade a password for a registration token.
  async function fetchToken(username, password) {
    const response = await fetch("/api/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username, password }),
      credentials: "omit",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok || !body.token) {
      throw new Error(body.message || `HTTP ${response.status}`);
    }
    return body.token;
  }

  function goOffline() {
    state.wantOnline = false;
    ui.registerPanel.hidden = false;
    ui.mePanel.hidden = true;
    ui.registerBtn.disabled = false;
  }

  // --- Presence and history --------------------------------------------

  function renderUsers(users) {
    state.users = users;
    const me = state.me && state.registered ? state.me.username : null;
    const others = users.filter((user) => user.username !== me);
    const items = others.map((user) => {
      const item = document.createElement("li");
      item.dataset.username = user.username;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = user.username;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "call-btn";
      button.textContent = "Call";
      button.setAttribute("aria-label", `Call ${user.username}`);
      button.disabled = Boolean(state.call);
      button.addEventListener("click", () => placeCall(user.username));
      item.append(name, button);
      return item;
    });
    ui.users.replaceChildren(...items);
    ui.usersEmpty.hidden = items.length > 0 || !state.registered;
  }

  function requestHistory() {
    send({ type: "get_call_history", limit: HISTORY_LIMIT });
  }

  function renderHistory(calls) {
    const me = state.me ? state.me.username : "";
    const items = calls.map((call) => {
      const outgoing = call.caller_username === me;
      const item = document.createElement("li");
      item.dataset.callId = call.call_id;
      item.dataset.status = call.status;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = `${outgoing ? "↗" : "↙"} ${outgoing ? call.callee_username : call.caller_username}`;
      const what = document.createElement("span");
      what.className = `what status-${call.status}`;
      const duration = call.duration_s != null ? ` · ${formatDuration(call.duration_s)}` : "";
      what.textContent = `${call.status}${duration}`;
      const when = document.createElement("time");
      when.dateTime = call.started_at;
      when.textContent = new Date(call.started_at).toLocaleString([], {
        month: "short",
        day: "numeric",
        hour: "2-digit",
        minute: "2-digit",
      });
      item.append(who, what, when);
      return item;
    });
    ui.history.replaceChildren(...items);
    ui.historyEmpty.hidden = items.length > 0;
  }

  // --- Local media -----------------------------------------------------

  function startLocalMedia() {
    if (!state.media) {
      const constraints = { audio: true, video: { width: { ideal: 640 }, height: { ideal: 480 } } };
      const media = navigator.mediaDevices
        .getUserMedia(constraints)
        .catch(() => navigator.mediaDevices.getUserMedia({ audio: true }))
        .then((stream) => {
          if (state.media !== media) {
            // The call ended while the browser was still asking for the camera.
            stream.getTracks().forEach((track) => track.stop());
            return null;
          }
          ui.localVideo.srcObject = stream;
          ui.localVideo.hidden = false;
          applyToggles(stream);
          return stream;
        })
        .catch((err) => {
          if (state.media === media) {
            setStatus(`No camera or microphone (${err.name}); the call goes on without them`, "connecting");
          }
          return null;
        });
      state.media = media;
    }
    return state.media;
  }

  function stopLocalMedia() {
    const media = state.media;
    state.media = null;
    ui.localVideo.srcObject = null;
    ui.localVideo.hidden = true;
    if (media) {
      media.then((stream) => stream && stream.getTracks().forEach((track) => track.stop()));
    }
  }

  function applyToggles(stream) {
    const micOff = ui.muteBtn.getAttribute("aria-pressed") === "true";
    const cameraOff = ui.cameraBtn.getAttribute("aria-pressed") === "true";
    stream.getAudioTracks().forEach((track) => (track.enabled = !micOff));
    stream.getVideoTracks().forEach((track) => (track.enabled = !cameraOff));
  }

  function toggle(button, onLabel, offLabel) {
    const pressed = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(pressed));
    button.textContent = pressed ? offLabel : onLabel;
    if (state.media) {
      state.media.then((stream) => stream && applyToggles(stream));
    }
    ui.localVideo.classList.toggle("camera-off", ui.cameraBtn.getAttribute("aria-pressed") === "true");
  }

  function resetToggle(button, label) {
    button.setAttribute("aria-pressed", "false");
    button.textContent = label;
  }

  // --- Calls -----------------------------------------------------------

  function newCall(fields) {
    return { id: null, pc: null, pending: [], remoteStream: null, connectedAt: null, chain: Promise.resolve(), ...fields };
  }

  // Run call work one step at a time, so an offer, its answer and the
  // candidates that follow are applied in the order they arrived.
  function inCall(call, work) {
    call.chain = call.chain
      .then(() => (state.call === call ? work() : undefined))
      .catch((err) => {
        if (state.call === call) {
          setStatus(`Call setup failed: ${err.message || err}`, "error");
        }
      });
  }

  function findCall(callId, peer) {
    const call = state.call;
    if (!call) {
      return null;
    }
    if (callId && call.id) {
      return call.id === callId ? call : null;
    }
    return call.peer === peer ? call : null;
  }

  function updateControls() {
    const call = state.call;
    ui.hangupBtn.disabled = !call || call.phase === "incoming";
    ui.hangupBtn.textContent = call && ["calling", "ringing"].includes(call.phase) ? "Cancel" : "Hang up";
    ui.muteBtn.disabled = !call;
    ui.cameraBtn.disabled = !call;
    ui.users.querySelectorAll(".call-btn").forEach((button) => (button.disabled = Boolean(call)));
    ui.remoteLabel.hidden = !call || call.phase === "incoming";
    ui.stageHint.hidden = Boolean(call) && call.phase !== "incoming";
    if (call) {
      ui.remoteLabel.textContent = call.peer;
    }
  }

  function placeCall(peer) {
    if (state.call || !state.registered) {
      return;
    }
    state.call = newCall({ peer, role: "caller", phase: "calling" });
    send({ type: "call_request", target_username: peer });
    setStatus(`Calling ${peer}…`, "calling");
    updateControls();
    startLocalMedia();
  }

  function signal(call, type, data) {
    send({ type, target_username: call.peer, call_id: call.id, data });
  }

  function createPeerConnection(call) {
    const pc = new RTCPeerConnection({ iceServers: state.iceServers });
    call.pc = pc;
    call.remoteStream = new MediaStream();
    pc.addEventListener("icecandidate", (event) => {
      if (event.candidate && state.call === call) {
        signal(call, "ice_candidate", event.candidate.toJSON());
      }
    });
    pc.addEventListener("track", (event) => {
      call.remoteStream.addTrack(event.track);
      if (ui.remoteVideo.srcObject !== call.remoteStream) {
        ui.remoteVideo.srcObject = call.remoteStream;
      }
      ui.remoteVideo.play().catch(() => {});
    });
    const onStateChange = () => connectionChanged(call);
    pc.addEventListener("connectionstatechange", onStateChange);
    pc.addEventListener("iceconnectionstatechange", onStateChange);
    return pc;
  }

  function connectionChanged(call) {
    if (state.call !== call || !call.pc) {
      return;
    }
    // Firefox before 113 has no connectionState; the ICE state says enough.
    const pcState = call.pc.connectionState || call.pc.iceConnectionState;
    const iceState = call.pc.iceConnectionState;
    if (pcState === "connected" || iceState === "connected" || iceState === "completed") {
      if (!call.connectedAt) {
        call.connectedAt = Date.now();
        startTimer(call);
      }
      call.phase = "active";
      setStatus(`In a call with ${call.peer}`, "in-call");
      updateControls();
    } else if (pcState === "failed" || iceState === "failed") {
      setStatus(`Could not connect the media with ${call.peer} (a TURN server may be needed)`, "error");
    } else if (call.connectedAt && (pcState === "disconnected" || iceState === "disconnected")) {
      setStatus(`Connection to ${call.peer} interrupted…`, "in-call");
    }
  }

  async function drainCandidates(call) {
    const queued = call.pending;
    call.pending = [];
    for (const candidate of queued) {
      await addCandidate(call, candidate);
    }
  }

  async function addCandidate(call, candidate) {
    try {
      await call.pc.addIceCandidate(candidate);
    } catch (err) {
      console.warn("ignored an ICE candidate the browser refused", err);
    }
  }

  async function sendOffer(call) {
    const stream = await startLocalMedia();
    if (state.call !== call) {
      return;
    }
    const pc = createPeerConnection(call);
    for (const kind of ["audio", "video"]) {
      const track = stream && stream.getTracks().find((t) => t.kind === kind);
      if (track) {
        pc.addTrack(track, stream);
      } else {
        pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
    await pc.setLocalDescription(await pc.createOffer());
    signal(call, "offer", { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
  }

  async function sendAnswer(call, offer) {
    const pc = call.pc;
    await pc.setRemoteDescription(offer);
    await drainCandidates(call);
    const stream = await startLocalMedia();
    if (state.call !== call) {
      return;
    }
    // Added after the offer is applied, so the tracks reuse its transceivers.
    if (stream) {
      stream.getTracks().forEach((track) => pc.addTrack(track, stream));
    }
    await pc.setLocalDescription(await pc.createAnswer());
    signal(call, "answer", { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
  }

  function acceptCall() {
    const call = state.call;
    if (!call || call.phase !== "incoming") {
      return;
    }
    ui.incoming.hidden = true;
    call.phase = "connecting";
    createPeerConnection(call);
    startLocalMedia();
    send({ type: "call_accepted", call_id: call.id });
    setStatus(`Connecting to ${call.peer}…`, "connecting");
    updateControls();
  }

  function rejectCall() {
    const call = state.call;
    if (!call || call.phase !== "incoming") {
      return;
    }
    send({ type: "call_rejected", call_id: call.id });
    finishCall(call, `You declined the call from ${call.peer}`, "rejected");
  }

  function hangUp() {
    const call = state.call;
    if (!call || call.phase === "incoming") {
      return;
    }
    const beforeAnswer = ["calling", "ringing"].includes(call.phase);
    send(call.id ? { type: "call_ended", call_id: call.id } : { type: "call_ended", target_username: call.peer });
    if (beforeAnswer) {
      finishCall(call, `You cancelled the call to ${call.peer}`, "cancelled");
    } else {
      finishCall(call, `Call ended: you hung up on ${call.peer}`, "hangup");
    }
  }

  function describeEnd(call, reason) {
    const peer = call.peer;
    const caller = call.role === "caller";
    switch (reason) {
      case "hangup":
        return `Call ended: ${peer} hung up`;
      case "cancelled":
        return `Missed call: ${peer} cancelled`;
      case "timeout":
        return caller ? `No answer from ${peer}` : `Missed call from ${peer}`;
      case "disconnected":
        return `Call ended: ${peer} disconnected`;
      case "rejected":
        return caller ? `${peer} declined the call` : `Declined in another tab`;
      case "busy":
        return `${peer} is busy`;
      case "answered_elsewhere":
        return `Answered in another tab`;
      default:
        return `Call ended (${reason})`;
    }
  }

  function finishCall(call, text, reason) {
    if (state.call !== call) {
      return;
    }
    state.call = null;
    if (call.pc) {
      call.pc.close();
    }
    stopTimer();
    stopLocalMedia();
    resetToggle(ui.muteBtn, "Mute mic");
    resetToggle(ui.cameraBtn, "Camera off");
    ui.localVideo.classList.remove("camera-off");
    ui.remoteVideo.srcObject = null;
    ui.incoming.hidden = true;
    setStatus(text, "ended", reason);
    updateControls();
    requestHistory();
  }

  function startTimer(call) {
    stopTimer();
    ui.timer.hidden = false;
    const tick = () => {
      ui.timer.textContent = formatDuration((Date.now() - call.connectedAt) / 1000);
    };
    tick();
    state.timerHandle = window.setInterval(tick, 1000);
  }

  function stopTimer() {
    window.clearInterval(state.timerHandle);
    state.timerHandle = null;
    ui.timer.hidden = true;
  }

  // --- Push notifications ----------------------------------------------
  // With the switch on, a call to this user while no page of theirs is open
  // wakes the service worker (sw.js), which shows a notification; a click on it
  // opens the page, and once the page is online the server rings it.

  function pushSupported() {
    return "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
  }

  // Why the switch cannot be turned on here, or "" when it can.
  function pushBlocked() {
    if (!state.me || !state.me.token) {
      return "Notifications need sign-in: go online with a password or a token.";
    }
    if (!pushSupported()) {
      return "This browser cannot receive push notifications on this page (they need https or localhost).";
    }
    return "";
  }

  function setPushNote(text) {
    ui.pushNote.textContent = text;
    ui.pushNote.hidden = !text;
  }

  // The server's id of this browser's subscription, per username.
  function storedSubscriptions() {
    try {
      return JSON.parse(localStorage.getItem("calls.pushSubscriptions") || "{}") || {};
    } catch (err) {
      return {};
    }
  }

  function rememberSubscription(username, subscriptionId) {
    const ids = storedSubscriptions();
    if (subscriptionId) {
      ids[username] = subscriptionId;
    } else {
      delete ids[username];
    }
    try {
      localStorage.setItem("calls.pushSubscriptions", JSON.stringify(ids));
    } catch (err) {
      // Storage unavailable: the switch starts off on the next visit.
    }
  }

  // The VAPID key (base64url) as the bytes PushManager.subscribe takes.
  function keyBytes(base64url) {
    const base64 = base64url.replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")), (ch) => ch.charCodeAt(0));
  }

  function sameBytes(buffer, bytes) {
    const other = new Uint8Array(buffer || new ArrayBuffer(0));
    return other.length === bytes.length && other.every((byte, i) => byte === bytes[i]);
  }

  function showPushSwitch(vapidKey) {
    state.push.key = typeof vapidKey === "string" && vapidKey ? vapidKey : null;
    ui.pushRow.hidden = !state.push.key;
    ui.pushSwitch.checked = false;
    const blocked = pushBlocked();
    ui.pushSwitch.disabled = Boolean(blocked);
    setPushNote(blocked);
    if (state.push.key && !blocked) {
      runPush(restorePush, false);
    }
  }

  // Run one switch action with the switch locked; a failure shows why and
  // leaves the switch as `failedState`.
  async function runPush(action, failedState) {
    ui.pushSwitch.disabled = true;
    try {
      const on = await action();
      ui.pushSwitch.checked = on;
      setPushNote(on ? "Calls ring this browser even when the page is closed." : "");
    } catch (err) {
      ui.pushSwitch.checked = failedState;
      setStatus(`Notifications: ${err.message || err}`, "error", err.code);
    } finally {
      ui.pushSwitch.disabled = !state.registered || Boolean(pushBlocked());
    }
  }

  // Send push_subscribe or push_unsubscribe and wait for its reply (or the error refusing it).
  function pushRequest(message, replyType) {
    return new Promise((resolve, reject) => {
      if (state.push.request) {
        reject(new Error("another notifications request is under way"));
        return;
      }
      const request = {
        replyType,
        settle(reply, error) {
          if (state.push.request !== request) {
            return;
          }
          state.push.request = null;
          window.clearTimeout(request.timer);
          if (error) {
            reject(error);
          } else {
            resolve(reply);
          }
        },
      };
      request.timer = window.setTimeout(
        () => request.settle(null, new Error("the server did not answer")),
        PUSH_REPLY_TIMEOUT_MS,
      );
      state.push.request = request;
      if (!send(message)) {
        request.settle(null, new Error("not connected to the server"));
      }
    });
  }

  function settlePushRequest(replyType, message) {
    const request = state.push.request;
    if (request && request.replyType === replyType) {
      request.settle(message, null);
    }
  }

  async function subscribeOnServer(username, subscription) {
    const reply = await pushRequest(
      {
        type: "push_subscribe",
        platform: "webpush",
        subscription: subscription.toJSON(),
        device_id: state.deviceId,
      },
      "push_subscribed",
    );
    rememberSubscription(username, reply.subscription_id);
  }

  async function currentSubscription() {
    const registration = await navigator.serviceWorker.getRegistration("/");
    return registration ? registration.pushManager.getSubscription() : null;
  }

  async function enablePush() {
    const username = state.me.username;
    // Asked first, while the click that turned the switch on still counts as
    // one: Firefox and Safari refuse the prompt outside a user gesture.
    const permission = await Notification.requestPermission();
    if (permission !== "granted") {
      throw new Error(permission === "denied" ? "this browser blocks them for this site" : "they were not allowed");
    }
    const registration = await navigator.serviceWorker.register("/sw.js");
    await navigator.serviceWorker.ready; // subscribing needs an active worker
    const key = keyBytes(state.push.key);
    let subscription = await registration.pushManager.getSubscription();
    if (subscription && !sameBytes(subscription.options.applicationServerKey, key)) {
      // Made for another server key (it was rotated): nothing can push to it any more.
      await subscription.unsubscribe();
      subscription = null;
    }
    if (!subscription) {
      subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
    }
    await subscribeOnServer(username, subscription);
    return true;
  }

  async function disablePush() {
    const username = state.me.username;
    const subscriptionId = storedSubscriptions()[username];
    if (subscriptionId) {
      try {
        await pushRequest({ type: "push_unsubscribe", subscription_id: subscriptionId }, "push_unsubscribed");
      } catch (err) {
        if (err.code !== "unknown_subscription") {
          throw err;
        }
      }
      rememberSubscription(username, null);
    }
    const subscription = await currentSubscription();
    if (subscription) {
      await subscription.unsubscribe();
    }
    return false;
  }

  // After going online: the switch is on when this browser still holds the
  // subscription the server gave this user an id for.
  async function restorePush() {
    const username = state.me.username;
    if (!storedSubscriptions()[username] || Notification.permission !== "granted") {
      return false;
    }
    const subscription = await currentSubscription();
    if (!subscription || !sameBytes(subscription.options.applicationServerKey, keyBytes(state.push.key))) {
      rememberSubscription(username, null);
      return false;
    }
    // Subscribed again on every sign-in: the endpoint keeps its id, and comes
    // back to this user if another one subscribed it since.
    await subscribeOnServer(username, subscription);
    return true;
  }

  // Opened from a call notification (sw.js): the server rings the page once it is online.
  function openedFromNotification() {
    if (!state.registered && !state.wantOnline) {
      setStatus("Sign in to answer the call", "incoming");
      ui.username.focus();
    }
  }

  // --- Server messages -------------------------------------------------

  const handlers = {
    registered(message) {
      state.registered = true;
      state.me.wasOnline = true;
      state.me.username = message.username;
      state.iceServers = Array.isArray(message.ice_servers) ? message.ice_servers : [];
      ui.registerPanel.hidden = true;
      ui.mePanel.hidden = false;
      ui.meName.textContent = message.username;
      setStatus(`Online as ${message.username}. Pick someone to call.`, "online");
      renderUsers(state.users);
      requestHistory();
      showPushSwitch(message.vapid_public_key);
    },

    push_subscribed(message) {
      settlePushRequest("push_subscribed", message);
    },

    push_unsubscribed(message) {
      settlePushRequest("push_unsubscribed", message);
    },

    online_users(message) {
      renderUsers(message.users || []);
    },

    call_history(message) {
      renderHistory(message.calls || []);
    },

    incoming_call(message) {
      if (state.call) {
        // Already in a call in this tab: decline rather than leave it ringing.
        send({ type: "call_rejected", call_id: message.call_id });
        return;
      }
      state.call = newCall({ id: message.call_id, peer: message.caller_username, role: "callee", phase: "incoming" });
      ui.incomingText.textContent = `${message.caller_username} is calling you`;
      ui.incoming.hidden = false;
      setStatus(`Incoming call from ${message.caller_username}`, "incoming");
      updateControls();
    },

    call_ringing(message) {
      const call = state.call;
      if (call && call.role === "caller" && !call.id && call.peer === message.target_username) {
        call.id = message.call_id;
        call.phase = "ringing";
        setStatus(`Ringing ${call.peer}…`, "ringing");
        updateControls();
      }
    },

    call_accepted(message) {
      const call = findCall(message.call_id, message.accepter_username);
      if (!call || call.role !== "caller") {
        return;
      }
      call.id = call.id || message.call_id;
      call.phase = "connecting";
      setStatus(`${call.peer} answered; connecting…`, "connecting");
      updateControls();
      inCall(call, () => sendOffer(call));
    },

    call_rejected(message) {
      const call = findCall(message.call_id, message.rejecter_username);
      if (call && call.role === "caller") {
        const reason = message.reason || "rejected";
        finishCall(call, describeEnd(call, reason), reason);
      }
    },

    call_ended(message) {
      const call = findCall(message.call_id, message.from_username);
      if (call) {
        finishCall(call, describeEnd(call, message.reason), message.reason);
      } else {
        requestHistory();
      }
    },

    offer(message) {
      const call = findCall(message.call_id, message.from_username);
      if (call && call.role === "callee" && call.pc) {
        inCall(call, () => sendAnswer(call, message.data));
      }
    },

    answer(message) {
      const call = findCall(message.call_id, message.from_username);
      if (call && call.role === "caller") {
        inCall(call, async () => {
          await call.pc.setRemoteDescription(message.data);
          await drainCandidates(call);
        });
      }
    },

    ice_candidate(message) {
      const call = findCall(message.call_id, message.from_username);
      if (!call || !message.data) {
        return;
      }
      inCall(call, async () => {
        if (call.pc && call.pc.remoteDescription) {
          await addCandidate(call, message.data);
        } else {
          call.pending.push(message.data);
        }
      });
    },

    peer_reconnecting(message) {
      const call = findCall(message.call_id, message.username);
      if (call) {
        setStatus(`${call.peer} is reconnecting…`, ui.status.dataset.state);
      }
    },

    peer_reconnected(message) {
      const call = findCall(message.call_id, message.username);
      if (call) {
        setStatus(`${call.peer} is back`, call.phase === "active" ? "in-call" : "connecting");
      }
    },

    error(message) {
      if (!state.registered) {
        setStatus(`Could not go online: ${message.message}`, "error", message.code);
        state.wantOnline = false;
        if (state.ws) {
          state.ws.close();
        }
        goOffline();
        return;
      }
      if (state.push.request && PUSH_REFUSALS.has(message.code)) {
        const error = new Error(message.message);
        error.code = message.code;
        state.push.request.settle(null, error);
        return;
      }
      const call = state.call;
      if (call && call.role === "caller" && !call.id && CALL_REFUSALS.has(message.code)) {
        finishCall(call, message.message, message.code);
        return;
      }
      if (["not_in_call", "not_ringing"].includes(message.code) && !call) {
        return; // a late message about a call that already ended here
      }
      setStatus(message.message, "error", message.code);
    },
  };

  // --- Wiring ----------------------------------------------------------

  ui.registerForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const username = ui.username.value.trim();
    if (!username || state.wantOnline) {
      return;
    }
    goOnline(username, ui.password.value, ui.token.value.trim() || null);
    ui.password.value = "";
  });
  ui.acceptBtn.addEventListener("click", acceptCall);
  ui.rejectBtn.addEventListener("click", rejectCall);
  ui.hangupBtn.addEventListener("click", hangUp);
  ui.pushSwitch.addEventListener("change", () => {
    if (ui.pushSwitch.checked) {
      runPush(enablePush, false);
    } else {
      runPush(disablePush, true);
    }
  });
  ui.muteBtn.addEventListener("click", () => toggle(ui.muteBtn, "Mute mic", "Unmute mic"));
  ui.cameraBtn.addEventListener("click", () => toggle(ui.cameraBtn, "Camera off", "Camera on"));
  window.addEventListener("pagehide", () => {
    if (state.call && state.call.id) {
      send({ type: "call_ended", call_id: state.call.id });
    }
  });

  if (navigator.serviceWorker) {
    navigator.serviceWorker.addEventListener("message", (event) => {
      if (event.data && event.data.type === "notification_click") {
        openedFromNotification();
      }
    });
  }

  state.deviceId = browserDeviceId();
  try {
    ui.username.value = localStorage.getItem("calls.lastUsername") || "";
  } catch (err) {
    // Storage unavailable: start with an empty name.
  }
  if (new URLSearchParams(location.search).has("call")) {
    history.replaceState(null, "", location.pathname);
    openedFromNotification();
  }
  if (!window.RTCPeerConnection || !navigator.mediaDevices) {
    setStatus("This browser (or an insecure http:// page) cannot make WebRTC calls; use https or localhost", "error");
  }
})();
