"""CallBook: what the client knows from the events it saw: online users and its live calls."""

from __future__ import annotations

from dataclasses import dataclass, replace

from signaling_client import events as ev

# Ended call ids kept to tell a late message for a finished call from a wrong id.
REMEMBERED_ENDED_CALLS = 256


@dataclass(frozen=True, slots=True)
class CallInfo:
    """One of this client's live calls as the client knows it."""

    call_id: str
    peer_username: str
    outgoing: bool
    status: str  # "ringing" or "answered"


class CallBook:
    def __init__(self) -> None:
        self.calls: dict[str, CallInfo] = {}
        self.online: dict[str, ev.User] = {}
        # The next presence snapshot replaces the list (the first after registered).
        self._fresh = True
        self._ended: dict[str, None] = {}
        self._reported_lost: set[str] = set()

    def track(self, event: ev.Event) -> bool:
        """Update from a server event; False for a duplicate the application must not see."""
        match event:
            case ev.OnlineUsers():
                self.online = {user.username: user for user in event.users}
            case ev.Registered():
                self._fresh = True
            case ev.Presence():
                if event.snapshot and self._fresh:
                    self.online = {}
                self._fresh = False
                for user in event.offline:
                    self.online.pop(user.username, None)
                for user in event.online:
                    self.online[user.username] = user
            case ev.IncomingCall(call_id=str() as call_id):
                self.calls[call_id] = CallInfo(call_id, event.caller_username, outgoing=False, status="ringing")
            case ev.CallRinging():
                self.calls[event.call_id] = CallInfo(event.call_id, event.target_username, True, "ringing")
            case ev.CallAccepted(call_id=str() as call_id) if call_id in self.calls:
                self.answered(call_id)
            case ev.CallEnded(call_id=str() as call_id) | ev.CallRejected(call_id=str() as call_id):
                if call_id in self._reported_lost:
                    # Already reported as ended when the session could not be resumed.
                    return False
                self.forget(call_id)
        return True

    def answered(self, call_id: str) -> None:
        if call_id in self.calls:
            self.calls[call_id] = replace(self.calls[call_id], status="answered")

    def forget(self, call_id: str) -> None:
        self.calls.pop(call_id, None)
        self._ended[call_id] = None
        while len(self._ended) > REMEMBERED_ENDED_CALLS:
            oldest = next(iter(self._ended))
            del self._ended[oldest]
            self._reported_lost.discard(oldest)

    def ended(self, call_id: str) -> bool:
        """Whether this call was live here and has ended (recently)."""
        return call_id in self._ended

    def adopt(self, registered: ev.Registered) -> list[ev.CallEnded]:
        """Take the calls of a new registration; return CallEnded events for the calls it lost."""
        if registered.resumed:
            live = {call.call_id for call in registered.calls}
            lost = [info for call_id, info in self.calls.items() if call_id not in live]
            self.calls = {
                call.call_id: CallInfo(
                    call.call_id,
                    call.peer_username,
                    self.calls[call.call_id].outgoing if call.call_id in self.calls else False,
                    call.status,
                )
                for call in registered.calls
            }
        else:
            lost = list(self.calls.values())
            self.calls = {}
        for info in lost:
            self.forget(info.call_id)
            self._reported_lost.add(info.call_id)
        return [ev.CallEnded(info.peer_username, info.call_id, "disconnected") for info in lost]
