// Browser test page for the signaling server: go online, see who is online, call.
//
// Page code only: the DOM, the camera and the call's UI state. Every message to and
// from the server goes through the JavaScript client library (clients/js, served at
// /static/signaling-client/): it registers, pings, resumes the session after a drop,
// keeps the online list from presence deltas, and its PeerConnection runs the WebRTC
// flow on the page's RTCPeerConnection (the caller offers once the call is accepted,
// the callee answers, both trickle ICE candidates).

import { PeerConnection, RegistrationError, SignalingClient } from "../signaling-client/index.js";

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
// Errors the server may answer a message about a call that already ended here with.
const LATE_CALL_ERRORS = new Set(["not_in_call", "not_ringing"]);

const state = {
  client: null, // the SignalingClient, from "Go online" until it closes for good
  username: null, // as the server registered it
  token: null, // the registration token (token mode); null in open mode
  deviceId: null,
  requests: 0, // page requests (call, history, push) waiting for the server's answer
  pushKey: null, // the server's VAPID key
  pushBusy: false,
  call: null,
  media: null, // Promise<MediaStream|null> for the current call
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

function online() {
  return state.client !== null && state.client.connected;
}

function warn(what) {
  return (err) => console.warn(what, err);
}

// Count the page's requests while they wait: an error the server answers one with is
// the request's to report (the library hands it to the request and to `error` handlers).
async function request(promise) {
  state.requests += 1;
  try {
    return await promise;
  } finally {
    state.requests -= 1;
  }
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

// --- Going online ----------------------------------------------------

async function goOnline(username, password, token) {
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
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // Resume and keepalive pings are the library's defaults: a dropped socket comes
  // back as the same session, and a call survives it.
  const client = new SignalingClient({
    url: `${scheme}://${location.host}/ws/`,
    username,
    userId: userIdFor(username),
    token,
    deviceId: state.deviceId,
    presence: "delta",
    logger: { info: console.info, warn: console.warn, error: console.error },
  });
  state.client = client;
  state.token = token;
  for (const [type, handler] of Object.entries(handlers)) {
    client.on(type, (event) => {
      if (state.client === client) {
        handler(event);
      }
    });
  }
  setStatus(`Going online as ${username}…`, "connecting");
  try {
    await client.connect();
  } catch (err) {
    if (state.client !== client) {
      return;
    }
    state.client = null;
    if (err instanceof RegistrationError) {
      setStatus(`Could not go online: ${err.message}`, "error", err.code);
    } else {
      setStatus("Could not reach the server", "error");
    }
    goOffline();
  }
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
  ui.registerPanel.hidden = false;
  ui.mePanel.hidden = true;
  ui.registerBtn.disabled = false;
  renderUsers();
}

// --- Presence and history --------------------------------------------

function renderUsers() {
  const users = state.client ? state.client.onlineUsers : [];
  const others = users
    .filter((user) => user.username !== state.username)
    .sort((a, b) => a.username.localeCompare(b.username));
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
    button.disabled = Boolean(state.call) || !online();
    button.addEventListener("click", () => placeCall(user.username));
    item.append(name, button);
    return item;
  });
  ui.users.replaceChildren(...items);
  ui.usersEmpty.hidden = items.length > 0 || !online();
}

function refreshHistory() {
  const client = state.client;
  if (!online()) {
    return;
  }
  request(client.history(HISTORY_LIMIT)).then((calls) => {
    if (state.client === client) {
      renderHistory(calls);
    }
  }, warn("could not load the call history"));
}

function renderHistory(calls) {
  const me = state.username || "";
  const items = calls.map((call) => {
    const outgoing = call.callerUsername === me;
    const item = document.createElement("li");
    item.dataset.callId = call.callId;
    item.dataset.status = call.status;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = `${outgoing ? "↗" : "↙"} ${outgoing ? call.calleeUsername : call.callerUsername}`;
    const what = document.createElement("span");
    what.className = `what status-${call.status}`;
    const duration = call.durationSeconds != null ? ` · ${formatDuration(call.durationSeconds)}` : "";
    what.textContent = `${call.status}${duration}`;
    const when = document.createElement("time");
    when.dateTime = call.startedAt;
    when.textContent = new Date(call.startedAt).toLocaleString([], {
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

// phase: calling (no id until it rings), ringing, incoming, connecting, active.
function newCall(fields) {
  return { id: null, connection: null, remoteStream: null, connectedAt: null, ...fields };
}

function findCall(callId) {
  const call = state.call;
  return call && callId && call.id === callId ? call : null;
}

function showCallStatus(call) {
  const texts = {
    calling: [`Calling ${call.peer}…`, "calling"],
    ringing: [`Ringing ${call.peer}…`, "ringing"],
    incoming: [`Incoming call from ${call.peer}`, "incoming"],
    connecting: [`Connecting to ${call.peer}…`, "connecting"],
    active: [`In a call with ${call.peer}`, "in-call"],
  };
  setStatus(...texts[call.phase]);
}

function updateControls() {
  const call = state.call;
  ui.hangupBtn.disabled = !call || call.phase === "incoming";
  ui.hangupBtn.textContent = call && ["calling", "ringing"].includes(call.phase) ? "Cancel" : "Hang up";
  ui.muteBtn.disabled = !call;
  ui.cameraBtn.disabled = !call;
  ui.users.querySelectorAll(".call-btn").forEach((button) => (button.disabled = Boolean(call) || !online()));
  ui.remoteLabel.hidden = !call || call.phase === "incoming";
  ui.stageHint.hidden = Boolean(call) && call.phase !== "incoming";
  if (call) {
    ui.remoteLabel.textContent = call.peer;
  }
}

function placeCall(peer) {
  const client = state.client;
  if (state.call || !online()) {
    return;
  }
  const call = newCall({ peer, role: "caller", phase: "calling" });
  state.call = call;
  showCallStatus(call);
  updateControls();
  startLocalMedia();
  request(client.call(peer)).then(
    (callId) => {
      if (state.call !== call) {
        // Cancelled before it rang: end it now that it has an id.
        client.hangUp(callId).catch(warn("could not cancel the call"));
        return;
      }
      call.id = callId;
      call.phase = "ringing";
      // Made before the answer can arrive: it offers once the call is accepted.
      startPeerConnection(client, call);
      showCallStatus(call);
      updateControls();
    },
    (err) => finishCall(call, err.message, err.code),
  );
}

// The WebRTC side of the call: the page's RTCPeerConnection, with the library's
// PeerConnection carrying its offer, answer and candidates.
function startPeerConnection(client, call) {
  const pc = new RTCPeerConnection({ iceServers: client.iceServers });
  ignoreRefusedCandidates(pc);
  call.remoteStream = new MediaStream();
  pc.addEventListener("track", (event) => {
    call.remoteStream.addTrack(event.track);
    if (ui.remoteVideo.srcObject !== call.remoteStream) {
      ui.remoteVideo.srcObject = call.remoteStream;
    }
    ui.remoteVideo.play().catch(() => {});
  });
  const onStateChange = () => connectionChanged(call, pc);
  pc.addEventListener("connectionstatechange", onStateChange);
  pc.addEventListener("iceconnectionstatechange", onStateChange);
  call.connection = new PeerConnection(client, call.id, pc, {
    prepare: (_, role) => addLocalMedia(call, pc, role),
    onError: (err) => {
      if (state.call === call) {
        setStatus(`Call setup failed: ${err.message || err}`, "error");
      }
    },
  });
}

// A browser refuses some remote candidates (a transport it does not support) and the
// call goes on with the others. PeerConnection reports a refusal to onError like any
// failed step, which here means a failed call, so refusals stop at the page's pc.
function ignoreRefusedCandidates(pc) {
  const addIceCandidate = pc.addIceCandidate.bind(pc);
  pc.addIceCandidate = (candidate) =>
    addIceCandidate(candidate).catch(warn("ignored an ICE candidate the browser refused"));
}

// PeerConnection's prepare: before the offer (caller) or after the offer is applied (callee).
async function addLocalMedia(call, pc, role) {
  const stream = await startLocalMedia();
  if (state.call !== call) {
    return;
  }
  if (role === "caller") {
    // Receive both kinds even when this browser has no camera or microphone.
    for (const kind of ["audio", "video"]) {
      const track = stream && stream.getTracks().find((t) => t.kind === kind);
      if (track) {
        pc.addTrack(track, stream);
      } else {
        pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
  } else if (stream) {
    // Added after the offer is applied, so the tracks reuse its transceivers.
    stream.getTracks().forEach((track) => pc.addTrack(track, stream));
  }
}

function connectionChanged(call, pc) {
  if (state.call !== call) {
    return;
  }
  // Firefox before 113 has no connectionState; the ICE state says enough.
  const pcState = pc.connectionState || pc.iceConnectionState;
  const iceState = pc.iceConnectionState;
  if (pcState === "connected" || iceState === "connected" || iceState === "completed") {
    if (!call.connectedAt) {
      call.connectedAt = Date.now();
      startTimer(call);
    }
    call.phase = "active";
    showCallStatus(call);
    updateControls();
  } else if (pcState === "failed" || iceState === "failed") {
    setStatus(`Could not connect the media with ${call.peer} (a TURN server may be needed)`, "error");
  } else if (call.connectedAt && (pcState === "disconnected" || iceState === "disconnected")) {
    setStatus(`Connection to ${call.peer} interrupted…`, "in-call");
  }
}

function acceptCall() {
  const call = state.call;
  const client = state.client;
  if (!call || call.phase !== "incoming" || !client) {
    return;
  }
  ui.incoming.hidden = true;
  call.phase = "connecting";
  // Made before accepting: the offer follows the accept.
  startPeerConnection(client, call);
  startLocalMedia();
  client.accept(call.id).catch((err) => finishCall(call, `Could not answer: ${err.message}`, err.code));
  showCallStatus(call);
  updateControls();
}

function rejectCall() {
  const call = state.call;
  if (!call || call.phase !== "incoming") {
    return;
  }
  state.client.reject(call.id).catch(warn("could not decline the call"));
  finishCall(call, `You declined the call from ${call.peer}`, "rejected");
}

function hangUp() {
  const call = state.call;
  if (!call || call.phase === "incoming") {
    return;
  }
  // A call still without an id is ended once it rings (placeCall).
  if (call.connection) {
    call.connection.hangUp().catch(warn("could not hang up"));
  } else if (call.id) {
    state.client.hangUp(call.id).catch(warn("could not hang up"));
  }
  if (["calling", "ringing"].includes(call.phase)) {
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
  if (call.connection) {
    call.connection.close();
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
  refreshHistory();
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
  if (!state.token) {
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

function updatePushSwitch() {
  if (!state.pushBusy) {
    ui.pushSwitch.disabled = !online() || Boolean(pushBlocked());
  }
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
  state.pushKey = vapidKey || null;
  ui.pushRow.hidden = !state.pushKey;
  ui.pushSwitch.checked = false;
  const blocked = pushBlocked();
  updatePushSwitch();
  setPushNote(blocked);
  if (state.pushKey && !blocked) {
    runPush(restorePush, false);
  }
}

// Run one switch action with the switch locked; a failure shows why and
// leaves the switch as `failedState`.
async function runPush(action, failedState) {
  state.pushBusy = true;
  ui.pushSwitch.disabled = true;
  try {
    const on = await action();
    ui.pushSwitch.checked = on;
    setPushNote(on ? "Calls ring this browser even when the page is closed." : "");
  } catch (err) {
    ui.pushSwitch.checked = failedState;
    setStatus(`Notifications: ${err.message || err}`, "error", err.code);
  } finally {
    state.pushBusy = false;
    updatePushSwitch();
  }
}

function pushClient() {
  if (!state.client) {
    throw new Error("not connected to the server");
  }
  return state.client;
}

async function subscribeOnServer(username, subscription) {
  const subscriptionId = await request(
    pushClient().subscribePush({ platform: "webpush", subscription, deviceId: state.deviceId }),
  );
  rememberSubscription(username, subscriptionId);
}

async function currentSubscription() {
  const registration = await navigator.serviceWorker.getRegistration("/");
  return registration ? registration.pushManager.getSubscription() : null;
}

async function enablePush() {
  const username = state.username;
  // Asked first, while the click that turned the switch on still counts as
  // one: Firefox and Safari refuse the prompt outside a user gesture.
  const permission = await Notification.requestPermission();
  if (permission !== "granted") {
    throw new Error(permission === "denied" ? "this browser blocks them for this site" : "they were not allowed");
  }
  const registration = await navigator.serviceWorker.register("/sw.js");
  await navigator.serviceWorker.ready; // subscribing needs an active worker
  const key = keyBytes(state.pushKey);
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
  const username = state.username;
  const subscriptionId = storedSubscriptions()[username];
  if (subscriptionId) {
    try {
      await request(pushClient().unsubscribePush(subscriptionId));
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
  const username = state.username;
  if (!storedSubscriptions()[username] || Notification.permission !== "granted") {
    return false;
  }
  const subscription = await currentSubscription();
  if (!subscription || !sameBytes(subscription.options.applicationServerKey, keyBytes(state.pushKey))) {
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
  if (!state.client) {
    setStatus("Sign in to answer the call", "incoming");
    ui.username.focus();
  }
}

// --- The library's events --------------------------------------------

const handlers = {
  // After connecting, and again after every reconnect (`resumed`: the session and its calls survived).
  registered(event) {
    state.username = event.username;
    ui.registerPanel.hidden = true;
    ui.mePanel.hidden = false;
    ui.meName.textContent = event.username;
    if (state.call) {
      showCallStatus(state.call);
    } else {
      setStatus(`Online as ${event.username}. Pick someone to call.`, "online");
    }
    renderUsers();
    refreshHistory();
    if (event.resumed) {
      updatePushSwitch();
    } else {
      showPushSwitch(event.vapidPublicKey);
    }
  },

  presence() {
    renderUsers();
  },

  state() {
    renderUsers();
    updatePushSwitch();
  },

  reconnecting() {
    const text = state.call
      ? "Connection to the server lost; reconnecting (the call goes on)…"
      : "Connection to the server lost; reconnecting…";
    setStatus(text, "offline");
  },

  // The client stopped for good: a refusal on reconnecting (an expired token...). A
  // failed first connect is reported by goOnline.
  closed(event) {
    if (!state.client.registered) {
      return;
    }
    state.client = null;
    if (state.call) {
      finishCall(state.call, "Call ended: the connection to the server was lost", "disconnected");
    }
    setStatus(`Disconnected from the server (${event.reason})`, "error", event.reason);
    goOffline();
  },

  incoming_call(event) {
    if (state.call) {
      if (state.call.id !== event.callId) {
        // Already in a call in this tab: decline rather than leave it ringing.
        state.client.reject(event.callId).catch(warn("could not decline the call"));
      }
      return;
    }
    state.call = newCall({ id: event.callId, peer: event.callerUsername, role: "callee", phase: "incoming" });
    ui.incomingText.textContent = `${event.callerUsername} is calling you`;
    ui.incoming.hidden = false;
    showCallStatus(state.call);
    updateControls();
  },

  call_accepted(event) {
    const call = findCall(event.callId);
    if (call && call.role === "caller") {
      call.phase = "connecting";
      setStatus(`${call.peer} answered; connecting…`, "connecting");
      updateControls();
    }
  },

  call_rejected(event) {
    const call = findCall(event.callId);
    if (call && call.role === "caller") {
      finishCall(call, describeEnd(call, event.reason), event.reason);
    }
  },

  call_ended(event) {
    const call = findCall(event.callId);
    if (!call) {
      refreshHistory();
    } else if (event.raw === null) {
      // Raised by the library: the session could not be resumed, and the call went with it.
      finishCall(call, "Call ended: the connection to the server was lost", "disconnected");
    } else {
      finishCall(call, describeEnd(call, event.reason), event.reason);
    }
  },

  peer_reconnecting(event) {
    const call = findCall(event.callId);
    if (call) {
      setStatus(`${call.peer} is reconnecting…`, ui.status.dataset.state);
    }
  },

  peer_reconnected(event) {
    const call = findCall(event.callId);
    if (call) {
      setStatus(`${call.peer} is back`, call.phase === "active" ? "in-call" : "connecting");
    }
  },

  error(event) {
    if (state.requests > 0) {
      return; // the answer to a request: the request reports it
    }
    if (LATE_CALL_ERRORS.has(event.code) && !state.call) {
      return; // a late message about a call that already ended here
    }
    setStatus(event.message, "error", event.code);
  },
};

// --- Wiring ----------------------------------------------------------

ui.registerForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const username = ui.username.value.trim();
  if (!username || state.client || ui.registerBtn.disabled) {
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
  if (state.call && state.call.id && state.client) {
    state.client.hangUp(state.call.id).catch(() => {});
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
