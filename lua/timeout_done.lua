-- KEYS[1] slot hash
-- ARGV[1] the lease whose timeout_callback returned
-- Returns  1 when the slot was stopping with reason "timeout" under that lease, and
--   now has reason "timeout_done"; 0 when not (freed or reclaimed meanwhile, corrupt).
-- Called when a timed-out slot is kept after its timeout_callback succeeded (its
-- stop_callback failed, and backend_error_callback kept the slot): its reclaim then
-- runs stop_callback only, so timeout_callback runs at most once per lease.
local r = redis.pcall('HMGET', KEYS[1], 'stopping', 'lease')
if r.err or r[1] ~= 'timeout' or r[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'stopping', 'timeout_done')
return 1
