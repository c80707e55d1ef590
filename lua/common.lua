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
-- the separate TYPE call of check_type for a key the script reads anyway. It fits the
-- script's first write as well (a write refused for the key's type writes nothing).
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

-- Looked up once per call, not at every use (each use of a global is a table lookup).
local find, tonumber = string.find, tonumber

-- Whether v is a strict unsigned integer: digits only, at most 15 of them (exact in
-- a Lua double).
local function is_int(v)
  return type(v) == 'string' and #v <= 15 and find(v, '^%d+$') ~= nil
end

-- A strict unsigned integer (see is_int) as a number, or nil.
local function strict_int(v)
  if is_int(v) then
    return tonumber(v)
  end
  return nil
end

-- strict_int for values that repeat within a call (timeouts, group numbers, poll
-- times): each distinct string is parsed once. The memo is made on first use, and
-- only by scripts that use it (each call runs this whole file).
local INTS

-- strict_int(v), memoised in INTS.
local function cached_int(v)
  if type(v) ~= 'string' then
    return nil
  end
  local memo = INTS
  if not memo then
    memo = {}
    INTS = memo
  end
  local x = memo[v]
  if x == nil then
    x = strict_int(v) or false
    memo[v] = x
  end
  return x or nil
end

-- Replies that carry many values (tick, sweep, claim) are one bulk string of tokens
-- "<byte length>:<bytes>", read by `Packed` in src/scripts.rs: for 100 slots that
-- is about 8x cheaper, in Redis and in the client together, than nested arrays.
-- LEN[n] is "n:". Lengths up to 20 (numbers, statuses, short ids) come made, in one
-- table constructor; a longer one is made once per call at its first use. LEN is made
-- on first use, and only by scripts that pack (each call runs this whole file: a table
-- made here would cost every script). A constructor costs less than one call of a
-- metatable's __index (about 2,500 instructions against 4,500 per length).
local LEN

-- LEN, made on first use.
local function lens()
  if not LEN then
    LEN = {'1:', '2:', '3:', '4:', '5:', '6:', '7:', '8:', '9:', '10:', '11:', '12:', '13:',
      '14:', '15:', '16:', '17:', '18:', '19:', '20:'}
  end
  return LEN
end

-- "k:" for a length k that LEN does not hold yet, kept in it (`len`).
local function new_len(len, k)
  local p = k .. ':'
  len[k] = p
  return p
end

-- Appends the string v to the token list `out`.
local function put(out, v)
  local len, n, k = LEN or lens(), #out, #v
  out[n + 1] = len[k] or new_len(len, k)
  out[n + 2] = v
end

-- Appends every string of `list` to the token list `out`.
local function put_all(out, list)
  local len, n = lens(), #out
  for i = 1, #list do
    local v = list[i]
    local k = #v
    out[n + 1] = len[k] or new_len(len, k)
    out[n + 2] = v
    n = n + 2
  end
end

-- A slot hash has no state field: the state follows from the fields (README, "Redis
-- keys"), which keeps a busy slot's hash small. Every slot has `backends` and
-- `timeout`; a held one (busy or stopping) also `task`, `backend`, `lease`, `start`
-- and `due`; a stopping one also `stopping` (the reason) and `reclaim`.

-- Reads and validates a slot hash with one HMGET (a stopping slot needs a second one
-- for `reclaim`). Returns the slot as a table, its state derived: "idle" (no task),
-- "stopping" (a reason) or "busy"; numbers parsed. Or nil and the reason it is
-- unreadable (a missing key, another type, a bad or missing field). Never writes.
local function read_slot(key)
  -- Field names inline, not in a table: every call of every script runs this file.
  local r = redis.pcall('HMGET', key, 'task', 'stopping', 'timeout', 'lease', 'due', 'start', 'backend')
  if r.err then
    return nil, 'is a ' .. redis.call('TYPE', key)['ok'] .. ', expected a hash'
  end
  local timeout = cached_int(r[3])
  if not r[1] then
    -- A stopping reason or a lease without a task is foreign data. Other stray holder
    -- fields are harmless: the next claim overwrites them (its idle check reads no more).
    if r[2] or r[4] then
      return nil, 'has holder fields but no task'
    end
    if timeout == nil then
      if not r[3] and redis.call('EXISTS', key) == 0 then
        return nil, 'is missing (slot not registered)'
      end
      return nil, 'has a bad or missing field timeout'
    end
    return {state = 'idle', timeout = timeout}
  end
  -- One constructor (sized once), not a table grown field by field.
  local s = {state = r[2] and 'stopping' or 'busy', task = r[1], stopping = r[2] or nil,
    timeout = timeout, lease_s = r[4], due = strict_int(r[5]),
    backend = r[7] or nil, reclaim = nil}
  if r[1] == '' or not s.backend then
    return nil, 'has no task or backend'
  end
  if timeout == nil then
    return nil, 'has a bad or missing field timeout'
  end
  -- Checked, not parsed: scripts compare and return it as the string it is.
  if not is_int(r[4]) then
    return nil, 'has a bad or missing field lease'
  end
  if s.due == nil then
    return nil, 'has a bad or missing field due'
  end
  -- Checked, not parsed: only inspect shows it (parsing costs more than the check).
  if not is_int(r[6]) then
    return nil, 'has a bad or missing field start'
  end
  if s.stopping then
    s.reclaim = strict_int(redis.call('HGET', key, 'reclaim'))
    if s.reclaim == nil then
      return nil, 'has a bad or missing field reclaim'
    end
  end
  return s
end

-- Clears a slot's holder, so it is idle (the caller updates idle and its group): it
-- drops every holder field and keeps its config.
local function clear_holder(slot_key)
  redis.call('HDEL', slot_key, 'task', 'backend', 'lease', 'start', 'due', 'stopping', 'reclaim')
end

-- Makes a slot idle: clears the holder, queues it in the idle set, drops its time from
-- its group (the group's bound in `deadlines` may stay lower: a bound only has to be
-- no later than the times of its group).
local function make_idle(slot_key, slot_id, idle_key, group_key)
  clear_holder(slot_key)
  redis.call('SADD', idle_key, slot_id)
  redis.call('HDEL', group_key, slot_id)
end

-- Finds the slot that holds `task_id` through its bucket of the task index, and checks the
-- caller's belief that it is `slot_id`. Returns the busy slot, or nil and the reply to
-- give: {"WRONG_TASK"} (no hold, or one that is stopping) or {"MOVED", owner}. Raises
-- CORRUPT when index and slot disagree, or when the bucket is not a hash (its read
-- checks its type). Never writes.
local function slot_of_task(bucket_key, slot_key, task_id, slot_id)
  local owner = read_checked('hash', 'HGET', bucket_key, task_id)
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
  if s.state == 'stopping' and s.task == task_id then
    -- Its hold has ended; the entry stays until free.lua, so that no claim takes the
    -- task again before its callbacks returned.
    return nil, {'WRONG_TASK'}
  end
  if s.state ~= 'busy' or s.task ~= task_id then
    corrupt(bucket_key, 'maps the task to slot ' .. slot_id .. ', which does not hold it')
  end
  return s
end
