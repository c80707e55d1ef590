-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] ended zset  KEYS[4] lease counter
-- KEYS[5] epoch hash  KEYS[3+3i] slot hash of claim i  KEYS[4+3i] task bucket of claim i
-- KEYS[5+3i] the slot's group of the deadline index
-- ARGV[1] stale_after_ms: how old a poll may be
-- ARGV[2] task_buckets the caller computed buckets and groups with (the epoch's)
-- ARGV[3+6(i-1) ..] claim i: slot id, task id, backend, timeout ms,
--   polled_at_ms (Redis time of a reply received before the poll began), group id
-- Returns  a packed reply (see `put` in common.lua): now_ms, then status_i and lease_i
--   of each claim; lease is "0" unless OK.
-- Status per claim, taken in order (a task id given twice is TASK_BUSY the 2nd time):
--   OK, SLOT_BUSY, TASK_BUSY, STALE, QUARANTINE, "CORRUPT <why>" for an unreadable
--   slot hash, "INDEX <why>" for a task bucket of another type or "GROUP <why>" for a
--   deadline group of another type (that claim only, nothing written). A foreign
--   shared key aborts the whole call, before any write, with error
--   "CORRUPT <key> ...", and a task_buckets other than the epoch's with error
--   "ERR claim: task_buckets ...".
-- A task's index entry is its claim's first write (HSETNX, which also finds a task
-- that holds a slot already), its time in the slot's group the second (undone, the
-- index entry with it, if the group is foreign data): every other check comes first.
-- QUARANTINE: state was lost (see epoch.lua) and no slot is granted before
-- quarantine_until_ms. A missing lease counter starts at Redis time in ms x 100, so
-- that leases do not repeat even when the state is lost and no replica noticed.
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
-- The ids, for ZMSCORE, are checked here.
local ids = {}
for i = 1, n do
  local a = 2 + 6 * (i - 1)
  if cached_int(ARGV[a + 4]) == nil or cached_int(ARGV[a + 5]) == nil or ARGV[a + 2] == '' then
    return redis.error_reply('ERR claim: bad arguments')
  end
  ids[i] = ARGV[a + 2]
end
-- The keys the claims read are type-checked by those reads; the others here.
check_type(deadlines_key, 'zset')
check_type(idle_key, 'set')
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
  if not r.err and cached_int(r[1]) and not r[2] and not r[3] and not r[4] then
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
local out = {}
put(out, now_s)
-- Slots claimed so far in this call (a slot given twice is SLOT_BUSY the 2nd time).
local taken = n > 1 and {} or nil
-- Writes to the shared keys are gathered and sent once at the end. Numbers become
-- strings once (a Lua number passed to redis.call is formatted each time).
local lease = last
if not last_lease then
  lease = now * 100
end
local first_lease = lease
-- The last lease granted, as a string: the counter's new value.
local lease_s
local not_idle, reused = {}, nil
-- The earliest new deadline of each group: its bound in `deadlines` is lowered to it.
-- lower is ZADD's arguments (bound, group, ...); group g's bound is lower[at[g]], and
-- lower_at[at[g]] the same as a number (compared as numbers: parsing costs more).
local lower, at_of, lower_at = {}, {}, {}
-- The last timeout's deadline as a string (slots mostly share their timeout).
local last_timeout, last_deadline
for i = 1, n do
  local slot_key, bucket_key, group_key = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local a = 2 + 6 * (i - 1)
  local slot_id, task_id, group = ARGV[a + 1], ARGV[a + 2], ARGV[a + 6]
  local status, deadline, at
  if now < quarantine then
    status = 'QUARANTINE'
  elseif why and why[i] then
    status = 'CORRUPT ' .. why[i]
  elseif state[i] ~= 'idle' then
    -- A busy slot is never in the idle set; if a hand edit left it there, repair that.
    not_idle[#not_idle + 1] = slot_id
    status = 'SLOT_BUSY'
  elseif taken and taken[slot_key] then
    status = 'SLOT_BUSY'
  else
    local ended_at = ended[i]
    local polled_at = cached_int(ARGV[a + 5])
    if now - polled_at > stale_after or (ended_at and tonumber(ended_at) >= polled_at) then
      status = 'STALE'
    else
      -- The claim's first write: the index entry, unless the task holds a slot already
      -- (a task given twice in this call finds its own first entry).
      local r = redis.pcall('HSETNX', bucket_key, task_id, slot_id)
      if type(r) == 'table' then
        status = 'INDEX is a ' .. redis.call('TYPE', bucket_key)['ok'] .. ', expected a hash'
      elseif r == 0 then
        status = 'TASK_BUSY'
      else
        local timeout = cached_int(ARGV[a + 4])
        at = now + timeout
        if timeout == last_timeout then
          deadline = last_deadline
        else
          deadline = int_s(at)
          last_timeout, last_deadline = timeout, deadline
        end
        local w = redis.pcall('HSET', group_key, slot_id, deadline)
        if type(w) == 'table' then
          redis.call('HDEL', bucket_key, task_id)
          status = 'GROUP is a ' .. redis.call('TYPE', group_key)['ok'] .. ', expected a hash'
        end
      end
    end
  end
  if status then
    put(out, status)
    put(out, '0')
  else
    lease = lease + 1
    lease_s = int_s(lease)
    redis.call('HSET', slot_key, 'task', task_id, 'backend', ARGV[a + 3], 'lease', lease_s,
      'start', now_s, 'due', deadline, 'timeout', ARGV[a + 4])
    if taken then
      taken[slot_key] = true
    end
    local k = at_of[group]
    if k == nil then
      k = #lower + 1
      at_of[group] = k
      lower[k], lower[k + 1], lower_at[k] = deadline, group, at
    elseif at < lower_at[k] then
      lower[k], lower_at[k] = deadline, at
    end
    not_idle[#not_idle + 1] = slot_id
    if ended[i] then
      -- A task that ended before (re-queued) is no longer "recently ended".
      reused = reused or {}
      reused[#reused + 1] = task_id
    end
    put(out, 'OK')
    put(out, lease_s)
  end
end
if lease ~= first_lease then
  redis.call('SET', lease_key, lease_s)
  redis.call('ZADD', deadlines_key, 'LT', unpack(lower))
  if reused then
    redis.call('ZREM', ended_key, unpack(reused))
  end
end
if #not_idle > 0 then
  redis.call('SREM', idle_key, unpack(not_idle))
end
return table.concat(out)
