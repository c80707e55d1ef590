-- KEYS[1] task bucket (the index hash of the task)  KEYS[2] slot hash
-- KEYS[3] the slot's group of the deadline index  KEYS[4] ended zset  KEYS[5] idle set
-- ARGV[1] task id  ARGV[2] slot id the caller believes holds it
-- ARGV[3] reason ("stop", "start_failed", "error")  ARGV[4] "stopping" or "idle"
-- ARGV[5] lease the caller holds, or "" for whichever lease holds the task
-- Returns  {"OK", now_ms, lease, backend} | {"WRONG_TASK"}
--        | {"MOVED", slot id} | {"LEASE_LOST", lease now in the slot} | error "CORRUPT <key> ..."
-- Ends the task's hold. With "stopping" the slot stays unclaimable until free.lua
-- (after the callbacks), or until `reclaim` = now + timeout if the caller dies.
-- With "idle" the slot is free at once (a start that failed has no callbacks to wait for).
local bucket_key, slot_key, group_key, ended_key, idle_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local task_id, slot_id, reason, mode, want_lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if mode ~= 'stopping' and mode ~= 'idle' then
  return redis.error_reply('ERR release: bad mode')
end
-- The bucket is type-checked by its read (in slot_of_task).
check_type(group_key, 'hash')
check_type(ended_key, 'zset')
check_type(idle_key, 'set')
local s, refusal = slot_of_task(bucket_key, slot_key, task_id, slot_id)
if s == nil then
  return refusal
end
local lease = tonumber(s.lease_s)
if want_lease and want_lease ~= '' and lease ~= strict_int(want_lease) then
  return {'LEASE_LOST', lease}
end

local now = now_ms()
redis.call('ZADD', ended_key, now, task_id)
if mode == 'idle' then
  redis.call('HDEL', bucket_key, task_id)
  make_idle(slot_key, slot_id, idle_key, group_key)
else
  -- The index keeps the task until free.lua: no claim takes it again meanwhile.
  local reclaim_at = int_s(now + s.timeout)
  redis.call('HSET', slot_key, 'stopping', reason, 'reclaim', reclaim_at)
  -- reclaim (now + timeout) is no earlier than due: the group's bound stays a bound.
  redis.call('HSET', group_key, slot_id, reclaim_at)
end
return {'OK', now, lease, s.backend}
