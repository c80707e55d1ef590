-- KEYS[1] idle set  KEYS[2] deadlines zset  KEYS[1+2i] slot hash i
-- KEYS[2+2i] slot i's group of the deadline index
-- ARGV[4i-3] slot id i  ARGV[4i-2] backends (JSON list)  ARGV[4i-1] timeout ms
-- ARGV[4i] slot i's group id
-- Returns  {status_1, ..., status_n}, each "created", "ok" or "corrupt <why>".
-- Creates missing slots as idle; refreshes backends and timeout of readable ones;
-- repairs the idle set and the deadline index of readable slots. Corrupt slots are not
-- touched. There is no registry of slots: the slot hashes are it (inspect finds them
-- by SCAN).
check_type(KEYS[1], 'set')
check_type(KEYS[2], 'zset')

local n = (#KEYS - 2) / 2
if n % 1 ~= 0 or #ARGV ~= 4 * n then
  return redis.error_reply('ERR register: bad arguments')
end
local slots, reasons, seen = {}, {}, {}
for i = 1, n do
  local key = KEYS[1 + 2 * i]
  if redis.call('EXISTS', key) == 1 then
    slots[i], reasons[i] = read_slot(key)
  end
  local group_key = KEYS[2 + 2 * i]
  if not seen[group_key] then
    seen[group_key] = true
    check_type(group_key, 'hash')
  end
end

local out = {}
for i = 1, n do
  local key, group_key, id = KEYS[1 + 2 * i], KEYS[2 + 2 * i], ARGV[4 * i - 3]
  local backends, timeout = ARGV[4 * i - 2], ARGV[4 * i - 1]
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
      local at = int_s(s.state == 'busy' and s.due or s.reclaim)
      redis.call('HSET', group_key, id, at)
      redis.call('ZADD', KEYS[2], 'LT', at, ARGV[4 * i])
    end
    out[i] = 'ok'
  end
end
return out
