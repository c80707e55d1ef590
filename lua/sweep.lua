-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] ended zset
-- KEYS[3+i] slot hash i (i = 1..n)  KEYS[3+n+j] group hash j of the deadline index
-- ARGV[1] n  ARGV[2i] slot id i  ARGV[2i+1] which group (1..m) slot i is in
-- ARGV[2n+1+j] the id of group j (its member in `deadlines`)
-- ARGV[2n+m+2] "1" when group m (the last) continues in the next call (a group with
--   more due slots than one call takes is split across calls): its times are not
--   read here and its bound is left to the call that takes its last due slots; "0"
--   otherwise
-- Returns  a packed reply (see `put` in common.lua): now_ms, then one record per slot,
--   in order: "T" task backend lease (timed out), "R" task backend lease reason
--   (reclaimed), "C" why (corrupt), or "-" (not due: left alone).
-- Takes every due slot it is given in one step. A busy slot past its deadline becomes "stopping"
-- (neither it nor its task, which stays in the index, is claimable until the caller's
-- free, or until `reclaim` = now + timeout if that caller dies). A stopping slot past
-- `reclaim` (its callbacks never finished) is handed to this caller in the same
-- way: it stays stopping with a new `reclaim` while the caller runs the callbacks
-- again (at least once), then frees it.
-- Then it settles each group's bound in `deadlines` (but an open group's) to the
-- earliest time left in the group (none left: the group leaves `deadlines`). A group
-- may hold due slots that this call was not given (another chunk's, or a slot another
-- replica's config has): they keep its bound, so the group stays due until they are
-- swept.
check_type(KEYS[1], 'zset')
check_type(KEYS[2], 'set')
check_type(KEYS[3], 'zset')
local n = strict_int(ARGV[1])
if n == nil or #KEYS < 3 + n or #ARGV ~= 2 + 2 * n + (#KEYS - 3 - n) then
  return redis.error_reply('ERR sweep: bad arguments')
end
local m = #KEYS - 3 - n
-- The group that continues in the next call, if any (see ARGV above).
local open
if ARGV[#ARGV] == '1' and m > 0 then
  open = m
elseif ARGV[#ARGV] ~= '0' then
  return redis.error_reply('ERR sweep: bad arguments')
end
local now = now_ms()
local now_s = int_s(now)
-- now + timeout as a string, formatted once per distinct timeout.
local reclaim_of = {}
local function reclaim_at(timeout)
  local r = reclaim_of[timeout]
  if not r then
    r = int_s(now + timeout)
    reclaim_of[timeout] = r
  end
  return r
end

-- Every group's times (slot id -> ms), read and checked before any write; the open
-- group's are not read, only its type checked (it is written below).
local times = {}
for j = 1, m do
  local key = KEYS[3 + n + j]
  local t = {}
  if j == open then
    check_type(key, 'hash')
  else
    local flat = read_checked('hash', 'HGETALL', key)
    for k = 1, #flat, 2 do
      local v = strict_int(flat[k + 1])
      if v == nil then
        corrupt(key, 'has a bad time for slot ' .. flat[k])
      end
      t[flat[k]] = v
    end
  end
  times[j] = t
end
local slots, reasons, group_of = {}, {}, {}
for i = 1, n do
  slots[i], reasons[i] = read_slot(KEYS[3 + i])
  group_of[i] = cached_int(ARGV[2 * i + 1])
  if group_of[i] == nil or group_of[i] < 1 or group_of[i] > m then
    return redis.error_reply('ERR sweep: bad arguments')
  end
end

-- Group writes are gathered per group and sent once each at the end. `at_s` is the
-- time as written, `at` the same as a number (the caller has both: no parsing back).
local set_in, drop_in = {}, {}
local function set_time(j, id, at_s, at)
  local w = set_in[j]
  if not w then
    w = {}
    set_in[j] = w
  end
  w[#w + 1] = id
  w[#w + 1] = at_s
  times[j][id] = at
end
local ended = {}
local out = {}
put(out, now_s)
for i = 1, n do
  local key, id, s = KEYS[3 + i], ARGV[2 * i], slots[i]
  local j = group_of[i]
  local t = times[j]
  if reasons[i] then
    -- Left as it is, its time too (so its group stays due, and it is reported again).
    put(out, 'C')
    put(out, reasons[i])
  elseif s.state == 'idle' then
    -- A stale time of an idle slot (a hand edit, or a lost reply): drop it (in the
    -- open group, whose times are not read, whether it is there or not).
    if t[id] or j == open then
      local d = drop_in[j] or {}
      drop_in[j] = d
      d[#d + 1] = id
      t[id] = nil
    end
    put(out, '-')
  elseif s.state == 'busy' and s.due <= now then
    local reclaim = reclaim_at(s.timeout)
    redis.call('HSET', key, 'stopping', 'timeout', 'reclaim', reclaim)
    set_time(j, id, reclaim, now + s.timeout)
    ended[#ended + 1] = now_s
    ended[#ended + 1] = s.task
    put(out, 'T')
    put(out, s.task)
    put(out, s.backend)
    put(out, s.lease_s)
  elseif s.state == 'stopping' and s.reclaim <= now then
    local reclaim = reclaim_at(s.timeout)
    redis.call('HSET', key, 'reclaim', reclaim)
    set_time(j, id, reclaim, now + s.timeout)
    put(out, 'R')
    put(out, s.task)
    put(out, s.backend)
    put(out, s.lease_s)
    put(out, s.stopping)
  else
    -- Not due (a keepalive came first): its group's time is the slot's own.
    local at = s.state == 'busy' and s.due or s.reclaim
    if t[id] ~= at or j == open then
      set_time(j, id, int_s(at), at)
    end
    put(out, '-')
  end
end
-- Each group's writes, then its bound: the earliest time left in it.
local bounds, empty = {}, {}
for j = 1, m do
  if set_in[j] then
    redis.call('HSET', KEYS[3 + n + j], unpack(set_in[j]))
  end
  if drop_in[j] then
    redis.call('HDEL', KEYS[3 + n + j], unpack(drop_in[j]))
  end
  if j ~= open then
    local low
    for _, v in pairs(times[j]) do
      if low == nil or v < low then
        low = v
      end
    end
    local g = ARGV[2 * n + 1 + j]
    if low then
      bounds[#bounds + 1] = int_s(low)
      bounds[#bounds + 1] = g
    else
      empty[#empty + 1] = g
    end
  end
end
if #bounds > 0 then
  redis.call('ZADD', KEYS[1], unpack(bounds))
end
if #empty > 0 then
  redis.call('ZREM', KEYS[1], unpack(empty))
end
if #ended > 0 then
  redis.call('ZADD', KEYS[3], unpack(ended))
end
return table.concat(out)
