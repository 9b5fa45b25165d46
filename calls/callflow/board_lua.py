"""The Lua scripts of the Redis call board (board_redis.py), one per transition.

Keys are described in board_redis.py. The end rules come from the tables of
calls/callflow/states.py, written into `END` as JSON, so both boards apply the
same rules.
"""

from __future__ import annotations

import json

from calls.callflow.states import END_STATUS

# Shared by the scripts: whether a call id still names a live call (dropping it from `set_key` if not).
_LIVE_IN = """
local function is_live(call_key)
    local status = redis.call('HGET', call_key, 'status')
    return status == 'ringing' or status == 'answered'
end
local function live_ids(set_key, prefix)
    local ids = {}
    for _, id in ipairs(redis.call('SMEMBERS', set_key)) do
        if is_live(prefix .. 'call:' .. id) then
            table.insert(ids, id)
        else
            redis.call('SREM', set_key, id)
        end
    end
    return ids
end
"""

# KEYS: call, user:<caller>, user:<callee>, session:<caller channel>, live, deadlines.
# ARGV: record, caller may multi-call, callee may, live ttl ms, deadline ms, id, prefix.
# Returns 1 (ringing) or 0 (busy); raises ALREADY_IN_CALL.
START = (
    _LIVE_IN
    + """
if ARGV[2] ~= '1' and #live_ids(KEYS[2], ARGV[7]) > 0 then
    return redis.error_reply('ALREADY_IN_CALL')
end
if ARGV[3] ~= '1' and #live_ids(KEYS[3], ARGV[7]) > 0 then
    return 0
end
redis.call('HSET', KEYS[1], 'status', 'ringing', 'record', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
-- The sets expire with the call (RENEW extends the parties' too); members whose call
-- is gone are dropped by the scripts that meet them, and the end script removes its own.
for i = 2, 4 do
    redis.call('SADD', KEYS[i], ARGV[6])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
redis.call('SADD', KEYS[5], ARGV[6])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[6])
return 1
"""
)

# KEYS: call, deadlines. ARGV: callee key, session, device, now ms, live ttl ms, id, prefix.
ACCEPT = """
local raw = redis.call('HGET', KEYS[1], 'record')
if not raw then
    return redis.error_reply('NOT_RINGING')
end
local call = cjson.decode(raw)
if call.status ~= 'ringing' or call.callee_key ~= ARGV[1] then
    return redis.error_reply('NOT_RINGING')
end
call.status = 'answered'
call.callee_channel = ARGV[2]
call.callee_device = ARGV[3]
call.answered = tonumber(ARGV[4])
local encoded = cjson.encode(call)
redis.call('HSET', KEYS[1], 'status', 'answered', 'record', encoded)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[6])
local session = ARGV[7] .. 'session:' .. ARGV[2]
redis.call('SADD', session, ARGV[6])
redis.call('PEXPIRE', session, ARGV[5])
return encoded
"""

# KEYS: call, live, deadlines. ARGV: reason, by a party, the party's key, now ms, keep ms, id, prefix.
# Returns the ended call, or nil when the end changes nothing; raises NOT_RINGING.
END = (
    "local END_STATUS = cjson.decode('"
    + json.dumps({f"{old}/{reason}": new for (old, reason), new in END_STATUS.items()})
    + "')"
    + """
local raw = redis.call('HGET', KEYS[1], 'record')
local function unlist()
    redis.call('SREM', KEYS[2], ARGV[6])
    redis.call('ZREM', KEYS[3], ARGV[6])
end
if not raw then
    unlist()
    -- A call lost with Redis's data: mark it ended, so that no session writes it back (RESTORE).
    if redis.call('EXISTS', KEYS[1]) == 0 then
        redis.call('HSET', KEYS[1], 'status', 'gone')
        redis.call('PEXPIRE', KEYS[1], ARGV[5])
    end
    return false
end
local call = cjson.decode(raw)
if call.status ~= 'ringing' and call.status ~= 'answered' then
    return false
end
local reason = ARGV[1]
local by_caller = false
if ARGV[2] == '1' then
    by_caller = ARGV[3] == call.caller_key
    if not by_caller and ARGV[3] ~= call.callee_key then
        return false
    end
end
if reason == 'rejected' and call.status ~= 'ringing' then
    return redis.error_reply('NOT_RINGING')
end
if call.status == 'ringing' and reason == 'hangup' then
    if by_caller then reason = 'cancelled' else reason = 'rejected' end
end
local new_status = END_STATUS[call.status .. '/' .. reason]
if not new_status then
    return false
end
call.status = new_status
call.end_reason = reason
-- As decide_end: never before the answer (its time was read on another process).
call.ended = tonumber(ARGV[4])
if type(call.answered) == 'number' and call.answered > call.ended then
    call.ended = call.answered
end
local encoded = cjson.encode(call)
redis.call('HSET', KEYS[1], 'status', new_status, 'record', encoded)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
unlist()
redis.call('SREM', ARGV[7] .. 'user:' .. call.caller_key, ARGV[6])
redis.call('SREM', ARGV[7] .. 'user:' .. call.callee_key, ARGV[6])
redis.call('SREM', ARGV[7] .. 'session:' .. call.caller_channel, ARGV[6])
if call.callee_channel ~= '' then
    redis.call('SREM', ARGV[7] .. 'session:' .. call.callee_channel, ARGV[6])
end
return encoded
"""
)

# KEYS: session:<chan>. ARGV: prefix.
SESSION_CALLS = _LIVE_IN + "return live_ids(KEYS[1], ARGV[1])"

# KEYS: user:<key>. ARGV: the key, prefix. The records of calls ringing for that user.
RINGING_FOR = (
    _LIVE_IN
    + """
local found = {}
for _, id in ipairs(live_ids(KEYS[1], ARGV[2])) do
    local call_key = ARGV[2] .. 'call:' .. id
    if redis.call('HGET', call_key, 'status') == 'ringing' then
        local raw = redis.call('HGET', call_key, 'record')
        if cjson.decode(raw).callee_key == ARGV[1] then
            table.insert(found, raw)
        end
    end
end
return found
"""
)

# KEYS: session:<old>, session:<new>. ARGV: old channel, new channel, prefix, live ttl ms.
MOVE = (
    _LIVE_IN
    + """
for _, id in ipairs(live_ids(KEYS[1], ARGV[3])) do
    local call_key = ARGV[3] .. 'call:' .. id
    local call = cjson.decode(redis.call('HGET', call_key, 'record'))
    if call.caller_channel == ARGV[1] then call.caller_channel = ARGV[2] end
    if call.callee_channel == ARGV[1] then call.callee_channel = ARGV[2] end
    redis.call('HSET', call_key, 'record', cjson.encode(call))
    redis.call('SADD', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""
)

# ARGV: live ttl ms, prefix, channels... Extend the keys of these sessions' calls.
RENEW = """
for i = 3, #ARGV do
    local session = ARGV[2] .. 'session:' .. ARGV[i]
    for _, id in ipairs(redis.call('SMEMBERS', session)) do
        local call_key = ARGV[2] .. 'call:' .. id
        redis.call('PEXPIRE', call_key, ARGV[1])
        local raw = redis.call('HGET', call_key, 'record')
        if raw then
            -- Its parties stay busy as long as the call lives (a call may outlast the TTL).
            local call = cjson.decode(raw)
            redis.call('PEXPIRE', ARGV[2] .. 'user:' .. call.caller_key, ARGV[1])
            redis.call('PEXPIRE', ARGV[2] .. 'user:' .. call.callee_key, ARGV[1])
        end
    end
    redis.call('PEXPIRE', session, ARGV[1])
end
return 0
"""

# KEYS: live, deadlines. ARGV: live ttl ms, prefix, then (id, status, record, deadline ms) per call.
# Writes back the calls that are missing; returns how many.
RESTORE = """
local restored = 0
for i = 3, #ARGV, 4 do
    local id, status, raw = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local call_key = ARGV[2] .. 'call:' .. id
    if redis.call('EXISTS', call_key) == 0 then
        local call = cjson.decode(raw)
        redis.call('HSET', call_key, 'status', status, 'record', raw)
        redis.call('PEXPIRE', call_key, ARGV[1])
        local keys = {'user:' .. call.caller_key, 'user:' .. call.callee_key, 'session:' .. call.caller_channel}
        if call.callee_channel ~= '' then table.insert(keys, 'session:' .. call.callee_channel) end
        for _, key in ipairs(keys) do
            redis.call('SADD', ARGV[2] .. key, id)
            redis.call('PEXPIRE', ARGV[2] .. key, ARGV[1])
        end
        redis.call('SADD', KEYS[1], id)
        if status == 'ringing' then redis.call('ZADD', KEYS[2], ARGV[i + 3], id) end
        restored = restored + 1
    end
end
return restored
"""
