-- KEYS[1] task bucket (the index hash of the task)  KEYS[2] slot hash
-- KEYS[3] the slot's group of the deadline index (a hash slot id -> ms)
-- ARGV[1] task id  ARGV[2] slot id the caller believes holds it
-- ARGV[3] lease the caller holds, or "" for whichever lease holds the task
-- Returns  {"OK", now_ms, lease, due, backend} | {"WRONG_TASK"}
--        | {"MOVED", slot id} | {"EXPIRED", slot id, due}
--        | {"LEASE_LOST", lease now in the slot} | error "CORRUPT <key> ..."
-- Pushes the deadline (`due`) to now + the slot's timeout. A task whose deadline has passed
-- is not revived: the next sweep times it out. With a lease, a newer hold of the same
-- task id is never extended.
local bucket_key, slot_key, group_key = KEYS[1], KEYS[2], KEYS[3]
local task_id, slot_id, want_lease = ARGV[1], ARGV[2], ARGV[3]
-- The bucket is type-checked by its read (in slot_of_task), the group by its write,
-- which comes before the slot's: a foreign key aborts the call with nothing written.
-- (Without its two TYPE calls a call costs 116,599 instructions, not 124,713.)
local s, refusal = slot_of_task(bucket_key, slot_key, task_id, slot_id)
if s == nil then
  return refusal
end
local lease = tonumber(s.lease_s)
if want_lease and want_lease ~= '' and lease ~= strict_int(want_lease) then
  return {'LEASE_LOST', lease}
end
local now = now_ms()
if s.due <= now then
  return {'EXPIRED', slot_id, s.due}
end
local deadline = now + s.timeout
local deadline_s = int_s(deadline)
-- A later deadline: the group's bound in `deadlines` stays a bound.
read_checked('hash', 'HSET', group_key, slot_id, deadline_s)
redis.call('HSET', slot_key, 'due', deadline_s)
return {'OK', now, lease, deadline, s.backend}
