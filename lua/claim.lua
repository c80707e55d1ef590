-- KEYS[1] slot hash  KEYS[2] tasks hash  KEYS[3] deadlines zset  KEYS[4] idle set
-- KEYS[5] ended zset  KEYS[6] lease counter  KEYS[7] epoch hash
-- ARGV[1] slot id  ARGV[2] task id  ARGV[3] backend  ARGV[4] timeout ms
-- ARGV[5] polled_at_ms: Redis time of a reply received before the poll began
-- ARGV[6] stale_after_ms: how old polled_at_ms may be
-- Returns  {"OK", now_ms, lease, deadline_ms} | {"SLOT_BUSY", now_ms}
--        | {"TASK_BUSY", now_ms} | {"STALE", now_ms} | {"QUARANTINE", now_ms}
--        | error "CORRUPT <key> ..."
-- QUARANTINE: state was lost (see epoch.lua) and no slot is granted before
-- quarantine_until_ms. A missing lease counter starts at Redis time in ms x 100, so
-- that leases do not repeat even when the state is lost and no replica noticed.
-- STALE: the task ended at or after polled_at_ms (the poll may predate its start),
-- or the poll is older than stale_after_ms. Either way the caller polls again later.
local slot_key, tasks_key, deadlines_key, idle_key, ended_key, lease_key, epoch_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local slot_id, task_id, backend = ARGV[1], ARGV[2], ARGV[3]
local timeout, polled_at, stale_after = strict_int(ARGV[4]), strict_int(ARGV[5]), strict_int(ARGV[6])
if timeout == nil or polled_at == nil or stale_after == nil or task_id == '' then
  return redis.error_reply('ERR claim: bad arguments')
end
check_type(tasks_key, 'hash')
check_type(deadlines_key, 'zset')
check_type(idle_key, 'set')
check_type(ended_key, 'zset')
check_type(lease_key, 'string')
check_type(epoch_key, 'hash')
local quarantine = strict_int(redis.call('HGET', epoch_key, 'quarantine_until_ms') or '0')
if quarantine == nil then
  corrupt(epoch_key, 'has a bad field quarantine_until_ms')
end
local last_lease = redis.call('GET', lease_key)
if last_lease and strict_int(last_lease) == nil then
  corrupt(lease_key, 'holds a non-number')
end
if last_lease and strict_int(last_lease) >= MAX_INT then
  -- The next lease would not be readable back: refuse before writing anything.
  corrupt(lease_key, 'is exhausted (' .. last_lease .. ')')
end
local s, why = read_slot(slot_key)
if s == nil then
  corrupt(slot_key, why)
end

local now = now_ms()
if now < quarantine then
  return {'QUARANTINE', now}
end
if s.state ~= 'idle' then
  -- A busy slot is never in the idle set; if a hand edit left it there, repair that.
  redis.call('SREM', idle_key, slot_id)
  return {'SLOT_BUSY', now}
end
if redis.call('HEXISTS', tasks_key, task_id) == 1 then
  return {'TASK_BUSY', now}
end
local ended_at = redis.call('ZSCORE', ended_key, task_id)
if now - polled_at > stale_after or (ended_at and tonumber(ended_at) >= polled_at) then
  return {'STALE', now}
end

if not last_lease then
  redis.call('SET', lease_key, now * 100)
end
local lease = redis.call('INCR', lease_key)
local deadline = now + timeout
redis.call('HSET', slot_key, 'state', 'busy', 'task_id', task_id, 'backend', backend,
  'lease', lease, 'started_at_ms', now, 'last_keepalive_at_ms', now,
  'deadline_ms', deadline, 'timeout_ms', timeout)
redis.call('HSET', tasks_key, task_id, slot_id)
redis.call('ZADD', deadlines_key, deadline, slot_id)
redis.call('SREM', idle_key, slot_id)
redis.call('ZREM', ended_key, task_id)
return {'OK', now, lease, deadline}
