-- KEYS  none               -- ARGV  none
-- Returns  nothing: helpers that src/scripts.rs puts in front of every other script here.
-- Every script checks all it reads before its first write, because Redis does not
-- roll back a script that fails half-way.

-- Redis server time in milliseconds: the one clock every replica shares.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Aborts the script (before any write) with an error naming the key.
local function corrupt(key, why)
  error({err = 'CORRUPT ' .. key .. ' ' .. why})
end

-- Checks that `key` is missing or of type `want`; anything else is foreign data.
local function check_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    corrupt(key, 'is a ' .. t .. ', expected a ' .. want)
  end
end

-- Runs a read with redis.pcall; a WRONGTYPE (or any error) from a key that is not a
-- `want` aborts the script (before any write) with an error naming the key. Saves
-- the separate TYPE call of check_type for a key the script reads anyway.
local function read_checked(want, cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    check_type(key, want)
    error(r)
  end
  return r
end

-- The largest number the scripts read back: 15 digits, exact in a Lua double.
local MAX_INT = 999999999999999

-- An integer as a string, exact to 15 digits and cheap: tostring() gives only 14
-- significant digits, and a number passed to redis.call is formatted as a double.
local function int_s(v)
  return string.format('%d', v)
end

-- Whether v is a strict unsigned integer: digits only, at most 15 of them (exact in
-- a Lua double).
local function is_int(v)
  return type(v) == 'string' and #v > 0 and #v <= 15 and not not string.match(v, '^%d+$')
end

-- A strict unsigned integer (see is_int) as a number, or nil.
local function strict_int(v)
  if not is_int(v) then
    return nil
  end
  return tonumber(v)
end

-- Numeric fields of a held slot: these are parsed; the others only checked (parsing
-- a 13-digit number costs more than the rest of a slot's checks together).
local TIME_FIELDS = {'lease', 'deadline_ms', 'timeout_ms'}
local CHECKED_FIELDS = {'started_at_ms', 'last_keepalive_at_ms'}

-- The fields every held slot has, in the order read_slot reads them.
local HELD_FIELDS = {'state', 'task_id', 'backend', 'lease', 'deadline_ms', 'timeout_ms',
  'started_at_ms', 'last_keepalive_at_ms'}

-- Reads and validates a slot hash: one HMGET into an array (a stopping slot needs a
-- second one for its two more fields), cheaper than a table of all its fields.
-- Returns the slot as a table (numbers parsed), or nil and the reason it is
-- unreadable. Never writes.
local function read_slot(key)
  local r = redis.pcall('HMGET', key, unpack(HELD_FIELDS))
  if r.err then
    return nil, 'is a ' .. redis.call('TYPE', key)['ok'] .. ', expected a hash'
  end
  -- One constructor (sized once), not a table grown field by field. HMGET gives
  -- false for a missing field; `or nil` keeps it absent.
  local s = {state = r[1] or nil, task_id = r[2] or nil, backend = r[3] or nil,
    lease = r[4] or nil, deadline_ms = r[5] or nil, timeout_ms = r[6] or nil,
    started_at_ms = r[7] or nil, last_keepalive_at_ms = r[8] or nil,
    stopping_reason = nil, reclaim_at_ms = nil}
  if s.state == 'idle' then
    return s
  end
  if s.state == nil and redis.call('EXISTS', key) == 0 then
    return nil, 'is missing (slot not registered)'
  end
  if s.state ~= 'busy' and s.state ~= 'stopping' then
    return nil, 'has state ' .. string.format('%q', tostring(s.state)) .. ', expected idle, busy or stopping'
  end
  for i = 1, #TIME_FIELDS do
    local f = TIME_FIELDS[i]
    local n = strict_int(s[f])
    if n == nil then
      return nil, 'has a bad or missing field ' .. f
    end
    s[f] = n
  end
  for i = 1, #CHECKED_FIELDS do
    local f = CHECKED_FIELDS[i]
    if not is_int(s[f]) then
      return nil, 'has a bad or missing field ' .. f
    end
  end
  if s.task_id == nil or s.task_id == '' or s.backend == nil then
    return nil, 'has no task_id or backend'
  end
  if s.state == 'stopping' then
    local more = redis.call('HMGET', key, 'stopping_reason', 'reclaim_at_ms')
    s.stopping_reason = more[1] or nil
    local n = strict_int(more[2])
    if n == nil then
      return nil, 'has a bad or missing field reclaim_at_ms'
    end
    s.reclaim_at_ms = n
  end
  return s
end

-- The fields a slot drops when it becomes idle again.
local HOLDER_FIELDS = {'task_id', 'backend', 'lease', 'started_at_ms', 'last_keepalive_at_ms',
  'deadline_ms', 'stopping_reason', 'stopped_at_ms', 'reclaim_at_ms'}

-- Clears a slot's holder and marks it idle (the caller updates idle and deadlines).
local function clear_holder(slot_key)
  redis.call('HDEL', slot_key, unpack(HOLDER_FIELDS))
  redis.call('HSET', slot_key, 'state', 'idle')
end

-- Makes a slot idle: clears the holder, queues it in the idle set, drops its deadline.
local function make_idle(slot_key, slot_id, idle_key, deadlines_key)
  clear_holder(slot_key)
  redis.call('SADD', idle_key, slot_id)
  redis.call('ZREM', deadlines_key, slot_id)
end

-- Finds the slot that holds `task_id` through the tasks index, and checks the
-- caller's belief that it is `slot_id`. Returns the slot, or nil and the reply to
-- give: {"WRONG_TASK"} or {"MOVED", owner}. Raises CORRUPT when index and slot disagree.
local function slot_of_task(tasks_key, slot_key, task_id, slot_id)
  local owner = redis.call('HGET', tasks_key, task_id)
  if not owner then
    return nil, {'WRONG_TASK'}
  end
  if owner ~= slot_id then
    return nil, {'MOVED', owner}
  end
  local s, why = read_slot(slot_key)
  if s == nil then
    corrupt(slot_key, why)
  end
  if s.state ~= 'busy' or s.task_id ~= task_id then
    corrupt(tasks_key, 'maps the task to slot ' .. slot_id .. ', which does not hold it')
  end
  return s
end
