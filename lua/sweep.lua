-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] ended zset
-- KEYS[3+i] slot hash i   -- ARGV[i] slot id i
-- Returns  a packed reply (see `put` in common.lua): now_ms, then one record per slot,
--   in order: "T" task backend lease (timed out), "R" task backend lease reason
--   (reclaimed), "C" why (corrupt), or "-" (not due: left alone).
-- Takes every due slot in one step. A busy slot past its deadline becomes "stopping"
-- (neither it nor its task, which stays in the index, is claimable until the caller's
-- free, or until `reclaim` = now + timeout if that caller dies). A stopping slot past
-- `reclaim` (its callbacks never finished) is handed to this caller in the same
-- way: it stays stopping with a new `reclaim` while the caller runs the callbacks
-- again (at least once), then frees it.
-- The task index is not touched here: free.lua drops the task.
check_type(KEYS[1], 'zset')
check_type(KEYS[2], 'set')
check_type(KEYS[3], 'zset')
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

local n = #KEYS - 3
local slots, reasons = {}, {}
for i = 1, n do
  slots[i], reasons[i] = read_slot(KEYS[3 + i])
end

-- Writes to the shared keys are gathered and sent once at the end.
local stale_deadlines, new_deadlines, ended = {}, {}, {}
local out = {}
put(out, now_s)
for i = 1, n do
  local key, id, s = KEYS[3 + i], ARGV[i], slots[i]
  if reasons[i] then
    put(out, 'C')
    put(out, reasons[i])
  elseif s.state == 'idle' then
    -- A stale deadline of an idle slot (a hand edit, or a lost reply): drop it.
    stale_deadlines[#stale_deadlines + 1] = id
    put(out, '-')
  elseif s.state == 'busy' and s.due <= now then
    local reclaim = reclaim_at(s.timeout)
    redis.call('HSET', key, 'stopping', 'timeout', 'reclaim', reclaim)
    new_deadlines[#new_deadlines + 1] = reclaim
    new_deadlines[#new_deadlines + 1] = id
    ended[#ended + 1] = now_s
    ended[#ended + 1] = s.task
    put(out, 'T')
    put(out, s.task)
    put(out, s.backend)
    put(out, s.lease_s)
  elseif s.state == 'stopping' and s.reclaim <= now then
    local reclaim = reclaim_at(s.timeout)
    redis.call('HSET', key, 'reclaim', reclaim)
    new_deadlines[#new_deadlines + 1] = reclaim
    new_deadlines[#new_deadlines + 1] = id
    put(out, 'R')
    put(out, s.task)
    put(out, s.backend)
    put(out, s.lease_s)
    put(out, s.stopping)
  else
    put(out, '-')
  end
end
if #stale_deadlines > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale_deadlines))
end
if #new_deadlines > 0 then
  redis.call('ZADD', KEYS[1], unpack(new_deadlines))
end
if #ended > 0 then
  redis.call('ZADD', KEYS[3], unpack(ended))
end
return table.concat(out)
