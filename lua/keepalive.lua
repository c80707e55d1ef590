-- KEYS[1] tasks hash  KEYS[2] slot hash  KEYS[3] deadlines zset
-- ARGV[1] task id  ARGV[2] slot id the caller believes holds it
-- Returns  {"OK", now_ms, lease, deadline_ms, backend} | {"WRONG_TASK"}
--        | {"MOVED", slot id} | {"EXPIRED", slot id, deadline_ms} | error "CORRUPT <key> ..."
-- Pushes the deadline to now + the slot's timeout_ms. A task whose deadline has passed
-- is not revived: the next sweep times it out.
local tasks_key, slot_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3]
local task_id, slot_id = ARGV[1], ARGV[2]
check_type(tasks_key, 'hash')
check_type(deadlines_key, 'zset')
local owner = redis.call('HGET', tasks_key, task_id)
if not owner then
  return {'WRONG_TASK'}
end
if owner ~= slot_id then
  return {'MOVED', owner}
end
local s, why = read_slot(slot_key)
if s == nil then
  corrupt(slot_key, why)
end
if s.state ~= 'busy' or s.task_id ~= task_id then
  corrupt(tasks_key, 'maps the task to slot ' .. slot_id .. ', which does not hold it')
end
local now = now_ms()
if s.deadline_ms <= now then
  return {'EXPIRED', slot_id, s.deadline_ms}
end
local deadline = now + s.timeout_ms
redis.call('HSET', slot_key, 'last_keepalive_at_ms', now, 'deadline_ms', deadline)
redis.call('ZADD', deadlines_key, deadline, slot_id)
return {'OK', now, s.lease, deadline, s.backend}
