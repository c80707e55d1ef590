-- KEYS[1] epoch hash  KEYS[2] lease counter
-- ARGV[1] epoch id this replica saw last, or "" (a replica that saw none yet)
-- ARGV[2] id for a new epoch  ARGV[3] quarantine (ms) to start when state was lost
-- ARGV[4] highest lease this replica has seen
-- ARGV[5] task buckets for a new epoch (a power of two, 1 to 65536)
-- Returns  {"NEW" | "SAME" | "LOST", epoch id, quarantine_until_ms, task buckets}
-- The epoch names one unbroken life of the scheduler's state. A replica that saw
-- epoch E and finds none (a restart without persistence, FLUSHALL) or another (a
-- replica recreated it after such a loss) reports LOST: the quarantine then holds
-- back every claim until quarantine_until_ms (the epoch's creation + ARGV[3]), so
-- tasks of the lost generation can finish or time out first, and the lease counter
-- is raised past every lease this replica has seen (claim.lua keeps every lease at
-- or above Redis time in ms x 100 besides), so no lease number repeats.
-- The task index is split in `task_buckets` hashes, fixed when the epoch is created
-- (from the creating replica's slot count): every replica must agree on it, so it
-- lives here and changes only with the epoch.

-- Whether v (a number or nil) is a valid count of task buckets: a power of two from 1
-- to 65536.
local function is_buckets(v)
  if v == nil or v < 1 or v > 65536 then
    return false
  end
  while v > 1 do
    if v % 2 ~= 0 then
      return false
    end
    v = v / 2
  end
  return true
end

local epoch_key, lease_key = KEYS[1], KEYS[2]
local seen, new_id = ARGV[1], ARGV[2]
local quarantine, max_lease = strict_int(ARGV[3]), strict_int(ARGV[4])
local new_buckets = strict_int(ARGV[5])
if new_id == '' or quarantine == nil or max_lease == nil or not is_buckets(new_buckets) then
  return redis.error_reply('ERR epoch: bad arguments')
end
check_type(epoch_key, 'hash')
check_type(lease_key, 'string')
local last_lease = redis.call('GET', lease_key)
if last_lease and strict_int(last_lease) == nil then
  corrupt(lease_key, 'holds a non-number')
end
local fields = redis.call('HMGET', epoch_key, 'id', 'quarantine_until_ms', 'created_at_ms', 'task_buckets')
local current, until_ms, buckets = fields[1], 0, new_buckets
if current then
  until_ms = strict_int(fields[2] or '0')
  if until_ms == nil then
    corrupt(epoch_key, 'has a bad field quarantine_until_ms')
  end
  buckets = strict_int(fields[4])
  if not is_buckets(buckets) then
    corrupt(epoch_key, 'has a bad or missing field task_buckets')
  end
end

local now = now_ms()
local verdict = 'SAME'
if not current then
  current = new_id
  verdict = (seen == '') and 'NEW' or 'LOST'
  redis.call('HSET', epoch_key, 'id', current, 'created_at_ms', now, 'quarantine_until_ms', 0,
    'task_buckets', buckets)
elseif seen ~= '' and current ~= seen then
  verdict = 'LOST'
end
if verdict == 'LOST' then
  -- Every lease of the lost generation was granted before this epoch was created, so
  -- the quarantine runs from its creation: a replica that notices the loss late (it
  -- was cut off from Redis meanwhile) does not start a new quarantine of its own.
  -- A missing or bad created_at_ms counts as now.
  local since = now
  if fields[1] then
    since = math.min(now, strict_int(fields[3] or '') or now)
  end
  until_ms = math.max(until_ms, since + quarantine)
  redis.call('HSET', epoch_key, 'quarantine_until_ms', until_ms, 'lost_at_ms', now)
  if seen ~= '' then
    redis.call('HSET', epoch_key, 'previous_id', seen)
  end
  -- Never below a lease this replica saw. Others may have handed out leases it never
  -- saw: claim.lua's floor of Redis time in ms x 100 outruns those by the end of the
  -- quarantine.
  if max_lease > strict_int(last_lease or '0') then
    redis.call('SET', lease_key, max_lease)
  end
end
return {verdict, current, until_ms, buckets}
