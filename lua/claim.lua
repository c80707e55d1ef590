-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] ended zset  KEYS[4] lease counter
-- KEYS[5] epoch hash  KEYS[3+3i] slot hash of claim i  KEYS[4+3i] task bucket of claim i
-- KEYS[5+3i] the slot's group of the deadline index
-- ARGV[1] stale_after_ms: how old a poll may be
-- ARGV[2] task_buckets the caller computed buckets and groups with (the epoch's)
-- ARGV[3+6(i-1) ..] claim i: slot id, task id, backend, timeout ms,
--   polled_at_ms (Redis time of a reply received before the poll began), group id
-- Returns  a packed reply (see `put` in common.lua): now_ms, then status_i and lease_i
--   of each claim; lease is "0" unless OK.
-- Status per claim, taken in order (a task id given twice is TASK_BUSY the 2nd time,
-- a slot given twice SLOT_BUSY):
--   OK, SLOT_BUSY, TASK_BUSY, STALE, QUARANTINE, "CORRUPT <why>" for an unreadable
--   slot hash, "INDEX <why>" for a task bucket of another type or "GROUP <why>" for a
--   deadline group of another type. A refused claim leaves no trace, but for at most
--   its group's bound in `deadlines`, lowered (harmless: see below). A foreign shared
--   key aborts the whole call with nothing written, with error "CORRUPT <key> ...",
--   and a task_buckets other than the epoch's with error "ERR claim: task_buckets ...".
-- Every check comes before the first write but three, which are writes themselves:
-- the type of the idle set and of `deadlines` (the call's first writes: see below),
-- and whether the task holds a slot already (HSETNX of its index entry; a claim that
-- fails there undoes its earlier writes, or leaves them harmless).
-- QUARANTINE: state was lost (see epoch.lua) and no slot is granted before
-- quarantine_until_ms. A lease is never below Redis time in ms x 100 (a missing
-- counter starts there), so that leases do not repeat even when the state is lost
-- and no replica noticed.
-- STALE: the task ended at or after polled_at_ms (the poll may predate its start),
-- or the poll is older than stale_after_ms. Either way the caller polls again later.
local deadlines_key, idle_key, ended_key, lease_key, epoch_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local stale_after = strict_int(ARGV[1])
local n = (#KEYS - 5) / 3
if stale_after == nil or n % 1 ~= 0 or #ARGV ~= 2 + 6 * n then
  return redis.error_reply('ERR claim: bad arguments')
end
-- Claim i's arguments are read where they are used, from KEYS and ARGV (a table per
-- claim would cost more than the claim's own checks): its slot hash, task bucket and
-- group are KEYS[3 + 3i], KEYS[4 + 3i], KEYS[5 + 3i]; its slot id, task id, backend,
-- timeout, poll time and group id ARGV[a + 1] .. ARGV[a + 6], with a = 2 + 6(i - 1).
-- The ids, for ZMSCORE, are checked here; a timeout or poll time the same as the
-- previous claim's (the usual case: compared as strings, by address) is not checked
-- again.
local ids = {}
local ok_ts, ok_ps
for i = 1, n do
  local a = 2 + 6 * (i - 1)
  local ts, ps, id = ARGV[a + 4], ARGV[a + 5], ARGV[a + 2]
  if (ts ~= ok_ts and cached_int(ts) == nil) or (ps ~= ok_ps and cached_int(ps) == nil)
      or id == '' then
    return redis.error_reply('ERR claim: bad arguments')
  end
  ok_ts, ok_ps = ts, ps
  ids[i] = id
end
-- The keys the claims read are type-checked by those reads; the idle set and
-- `deadlines` by the first writes (see below).
local epoch = read_checked('hash', 'HMGET', epoch_key, 'quarantine_until_ms', 'task_buckets')
local quarantine = strict_int(epoch[1] or '0')
if quarantine == nil then
  corrupt(epoch_key, 'has a bad field quarantine_until_ms')
end
if epoch[2] ~= ARGV[2] then
  -- The epoch changed under the caller: its buckets would not be the ones others read.
  return redis.error_reply('ERR claim: task_buckets is ' .. tostring(epoch[2]) .. ', not ' .. ARGV[2])
end
local last_lease = read_checked('string', 'GET', lease_key)
local last = last_lease and strict_int(last_lease)
if last_lease and last == nil then
  corrupt(lease_key, 'holds a non-number')
end
if last and last + n > MAX_INT then
  -- The next lease would not be readable back: refuse before writing anything.
  corrupt(lease_key, 'is exhausted (' .. last_lease .. ')')
end
-- When each task last ended, in one call.
local ended = read_checked('zset', 'ZMSCORE', ended_key, unpack(ids))
-- Only an idle slot is claimed: a registered slot with its `timeout`, and no `task`,
-- `stopping` or `lease` (read_slot's rule). Those are all a claim reads of an idle
-- slot; any other slot (rare: the caller saw it idle) is read and checked whole.
-- state[i] is "idle", "busy" or "stopping", or false for an unreadable slot (why[i]).
local state, why = {}, nil
for i = 1, n do
  local slot_key = KEYS[3 + 3 * i]
  local r = redis.pcall('HMGET', slot_key, 'timeout', 'task', 'stopping', 'lease')
  -- (A timeout the same as the last one given is known to be a number.)
  if not r.err and (r[1] == ok_ts or cached_int(r[1])) and not r[2] and not r[3] and not r[4] then
    state[i] = 'idle'
  else
    local s, bad = read_slot(slot_key)
    state[i] = s and s.state or false
    if bad then
      why = why or {}
      why[i] = bad
    end
  end
end

local now = now_ms()
local now_s = int_s(now)
-- First, without writing: each claim's refusal, or its deadline. A claim that passes
-- these checks is a candidate: its slot leaves the idle set and its group's bound is
-- lowered before the task is written (see below), and both are undone or harmless if
-- the task turns out to be held already.
-- refused[i] is claim i's refusal (the table is made at the first one): the others are
-- candidates.
local refused
-- Slots claimed in this call (a slot given twice is SLOT_BUSY the 2nd time).
local taken = n > 1 and {} or nil
-- The candidates' slots, which leave the idle set; and busy slots, which a hand edit
-- may have left in it (a busy slot is never in the idle set: that is repaired).
local cands, busy = {}, nil
-- The earliest new deadline of each group: its bound in `deadlines` is lowered to it.
-- lower is ZADD's arguments (bound, group, ...); group g's bound is lower[k] with
-- k = at_of[g], and lower_at[k] the same as a number (numbers compare cheaper).
local lower, at_of, lower_at = {}, {}, {}
-- The deadline of the last timeout (slots mostly share theirs): the timeout as given
-- (compared as the string: Lua compares strings by their address), the deadline as a
-- number and as a string.
local last_ts, last_at, last_deadline
-- How many candidates; how many entries in lower (counted, not taken with #).
local nc, nl = 0, 0
-- The last poll time, as given and as a number.
local last_ps, polled_at
for i = 1, n do
  local a = 2 + 6 * (i - 1)
  local slot_id = ARGV[a + 1]
  local refusal
  if now < quarantine then
    refusal = 'QUARANTINE'
  elseif why and why[i] then
    refusal = 'CORRUPT ' .. why[i]
  elseif state[i] ~= 'idle' then
    busy = busy or {}
    busy[#busy + 1] = slot_id
    refusal = 'SLOT_BUSY'
  elseif taken and taken[slot_id] then
    refusal = 'SLOT_BUSY'
  else
    local ended_at = ended[i]
    local ps = ARGV[a + 5]
    if ps ~= last_ps then
      last_ps, polled_at = ps, cached_int(ps)
    end
    if now - polled_at > stale_after or (ended_at and tonumber(ended_at) >= polled_at) then
      refusal = 'STALE'
    else
      if taken then
        taken[slot_id] = true
      end
      nc = nc + 1
      cands[nc] = slot_id
      local ts = ARGV[a + 4]
      if ts ~= last_ts then
        last_ts, last_at = ts, now + cached_int(ts)
        last_deadline = int_s(last_at)
      end
      local t, d = last_at, last_deadline
      local group = ARGV[a + 6]
      local k = at_of[group]
      if k == nil then
        k = nl + 1
        nl = nl + 2
        at_of[group] = k
        lower[k], lower[k + 1], lower_at[k] = d, group, t
      elseif t < lower_at[k] then
        lower[k], lower_at[k] = d, t
      end
    end
  end
  if refusal then
    refused = refused or {}
    refused[i] = refusal
  end
end

-- The first writes, which also type-check the idle set and `deadlines` (a TYPE call
-- each would cost as much as the write). The candidates' slots leave the idle set;
-- then their groups' bounds are lowered, and if `deadlines` is foreign data the
-- slots go back to the idle set: nothing is written. A bound lowered for a claim that
-- fails below is lower than its group needs, which is harmless: a bound only has to be
-- no later than its group's times, and the sweep that finds it due settles it.
-- The busy slots leave the idle set after the candidates' (a foreign set has been
-- found by then) or as the call's only write.
if nc > 0 then
  local r = redis.pcall('SREM', idle_key, unpack(cands))
  if type(r) == 'table' then
    check_type(idle_key, 'set')
    error(r)
  end
  r = redis.pcall('ZADD', deadlines_key, 'LT', unpack(lower))
  if type(r) == 'table' then
    redis.call('SADD', idle_key, unpack(cands))
    check_type(deadlines_key, 'zset')
    error(r)
  end
end
if busy then
  local r = redis.pcall('SREM', idle_key, unpack(busy))
  if type(r) == 'table' then
    check_type(idle_key, 'set')
    error(r)
  end
end

local out = {}
put(out, now_s)
-- Numbers become strings once (a Lua number passed to redis.call is formatted each
-- time). The counter never lags Redis time in ms x 100 (a missing one starts there):
-- after a loss of the state, the first lease granted once the quarantine is over is
-- above every lease of the lost generation, unless those ran more than 100 x the
-- quarantine's milliseconds ahead of that clock (README, Limits).
local lease = now * 100
if last and last > lease then
  lease = last
end
local first_lease = lease
-- The last lease granted, as a string: the counter's new value.
local lease_s
-- Tasks that ended before and are claimed again; candidate slots whose claim failed,
-- which go back to the idle set.
local reused, back
for i = 1, n do
  local refusal = refused and refused[i]
  local a = 2 + 6 * (i - 1)
  local slot_id, task_id = ARGV[a + 1], ARGV[a + 2]
  local deadline
  if not refusal then
    -- The deadline made above, again (the timeout mostly is the last one).
    local ts = ARGV[a + 4]
    if ts ~= last_ts then
      last_ts, last_at = ts, now + cached_int(ts)
      last_deadline = int_s(last_at)
    end
    deadline = last_deadline
    local bucket_key, group_key = KEYS[4 + 3 * i], KEYS[5 + 3 * i]
    -- The task's index entry, unless the task holds a slot already (a task given twice
    -- in this call finds its own first entry).
    local r = redis.pcall('HSETNX', bucket_key, task_id, slot_id)
    if type(r) == 'table' then
      refusal = 'INDEX is a ' .. redis.call('TYPE', bucket_key)['ok'] .. ', expected a hash'
    elseif r == 0 then
      refusal = 'TASK_BUSY'
    else
      local w = redis.pcall('HSET', group_key, slot_id, deadline)
      if type(w) == 'table' then
        redis.call('HDEL', bucket_key, task_id)
        refusal = 'GROUP is a ' .. redis.call('TYPE', group_key)['ok'] .. ', expected a hash'
      end
    end
    if refusal then
      back = back or {}
      back[#back + 1] = slot_id
    end
  end
  if refusal then
    put(out, refusal)
    put(out, '0')
  else
    lease = lease + 1
    lease_s = int_s(lease)
    redis.call('HSET', KEYS[3 + 3 * i], 'task', task_id, 'backend', ARGV[a + 3], 'lease',
      lease_s, 'start', now_s, 'due', deadline, 'timeout', ARGV[a + 4])
    if ended[i] then
      -- A task that ended before (re-queued) is no longer "recently ended".
      reused = reused or {}
      reused[#reused + 1] = task_id
    end
    put(out, 'OK')
    put(out, lease_s)
  end
end
if back then
  redis.call('SADD', idle_key, unpack(back))
end
if lease ~= first_lease then
  redis.call('SET', lease_key, lease_s)
  if reused then
    redis.call('ZREM', ended_key, unpack(reused))
  end
end
return table.concat(out)
