// Service worker of the test page, served at /sw.js so that its scope is the whole site.
// It shows the pushes that wake this device when a call rings a user with no open page:
//   {"type": "incoming_call", "call_id", "caller_username", "caller_id", "expires_at"}
//   {"type": "call_ended", "call_id", "reason"}
// A click opens (or focuses) the page; once signed in there, the server rings it again.
"use strict";

// Take over at once: an old worker must not keep showing pushes in an older way.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => {
  const payload = readPayload(event.data);
  if (!payload) {
    return;
  }
  if (payload.type === "incoming_call") {
    event.waitUntil(showIncomingCall(payload));
  } else if (payload.type === "call_ended") {
    event.waitUntil(closeNotifications(payload.call_id));
  }
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const data = event.notification.data || {};
  event.waitUntil(openPage(typeof data.call_id === "string" ? data.call_id : null));
});

function readPayload(data) {
  let payload;
  try {
    payload = data ? data.json() : null;
  } catch (err) {
    return null;
  }
  if (!payload || typeof payload.type !== "string" || typeof payload.call_id !== "string") {
    return null;
  }
  return payload;
}

function showIncomingCall(payload) {
  const caller = typeof payload.caller_username === "string" ? payload.caller_username : "someone";
  const expires = Date.parse(payload.expires_at);
  // A push held by the push service past the ring deadline: the call is over.
  if (!Number.isNaN(expires) && expires < Date.now()) {
    return self.registration.showNotification(`Missed call from ${caller}`, {
      tag: payload.call_id,
      body: "The call stopped ringing before this device woke up.",
      data: payload,
    });
  }
  return self.registration.showNotification(`Incoming call from ${caller}`, {
    tag: payload.call_id,
    body: "Open the page and sign in to answer.",
    requireInteraction: true,
    data: payload,
  });
}

async function closeNotifications(callId) {
  const shown = await self.registration.getNotifications({ tag: callId });
  shown.forEach((notification) => notification.close());
}

async function openPage(callId) {
  const url = new URL("/", self.location.origin);
  if (callId) {
    url.searchParams.set("call", callId);
  }
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  const page = windows.find((client) => new URL(client.url).pathname === "/");
  if (page) {
    page.postMessage({ type: "notification_click", call_id: callId });
    return page.focus();
  }
  return self.clients.openWindow(url.href);
}
