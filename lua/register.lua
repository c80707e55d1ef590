-- KEYS[1] idle set  KEYS[2] deadlines zset  KEYS[2+i] slot hash i
-- ARGV[3i-2] slot id i  ARGV[3i-1] backends (JSON list)  ARGV[3i] timeout ms
-- Returns  {status_1, ..., status_n}, each "created", "ok" or "corrupt <why>".
-- Creates missing slots as idle; refreshes backends and timeout of readable ones;
-- repairs the idle set and the deadlines of readable slots. Corrupt slots are not touched.
-- There is no registry of slots: the slot hashes are it (inspect finds them by SCAN).
check_type(KEYS[1], 'set')
check_type(KEYS[2], 'zset')

local n = #KEYS - 2
local slots, reasons = {}, {}
for i = 1, n do
  local key = KEYS[2 + i]
  if redis.call('EXISTS', key) == 1 then
    slots[i], reasons[i] = read_slot(key)
  end
end

local out = {}
for i = 1, n do
  local key, id = KEYS[2 + i], ARGV[3 * i - 2]
  local backends, timeout = ARGV[3 * i - 1], ARGV[3 * i]
  local s = slots[i]
  if reasons[i] then
    out[i] = 'corrupt ' .. reasons[i]
  elseif s == nil then
    redis.call('HSET', key, 'backends', backends, 'timeout', timeout)
    redis.call('SADD', KEYS[1], id)
    out[i] = 'created'
  else
    if s.state == 'idle' then
      -- Only an idle slot takes the new timeout: a holder keeps the one it claimed with.
      redis.call('HSET', key, 'backends', backends, 'timeout', timeout)
      redis.call('SADD', KEYS[1], id)
    else
      redis.call('HSET', key, 'backends', backends)
      redis.call('ZADD', KEYS[2], 'NX', s.state == 'busy' and s.due or s.reclaim, id)
    end
    out[i] = 'ok'
  end
end
return out
