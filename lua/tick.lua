-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] ended zset  KEYS[4] epoch hash
-- ARGV[1] most due groups to return  ARGV[2] how long ended tasks are remembered (ms)
-- ARGV[3] "1" to list the idle slots, "0" not to (a later call of the same sweep)
-- ARGV[4] most idle slots to list here: a larger idle set is only counted, and the
--   caller pages through it with SSCAN (listing 100,000 members in a script blocks
--   Redis for tens of milliseconds)
-- Returns  a packed reply (see `put` in common.lua): now_ms, epoch id or "",
--   quarantine_until_ms, idle count, the number of due groups, the due group ids, then
--   the idle slot ids (none for "0", or when the count is over ARGV[4])
-- The one call of a steady tick: which groups of the deadline index are due (their
-- bound, no later than any time in the group, has passed) and which slots are idle.
-- Its only write forgets ended tasks older than ARGV[2].
check_type(KEYS[1], 'zset')
check_type(KEYS[2], 'set')
check_type(KEYS[3], 'zset')
check_type(KEYS[4], 'hash')
local limit, memory, inline = strict_int(ARGV[1]), strict_int(ARGV[2]), strict_int(ARGV[4])
if limit == nil or memory == nil or inline == nil then
  return redis.error_reply('ERR tick: bad arguments')
end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local idle, idle_count = {}, 0
if ARGV[3] == '1' then
  idle_count = redis.call('SCARD', KEYS[2])
  if idle_count <= inline then
    idle = redis.call('SMEMBERS', KEYS[2])
  end
end
local epoch = redis.call('HMGET', KEYS[4], 'id', 'quarantine_until_ms')
local quarantine = strict_int(epoch[2] or '0')
if quarantine == nil then
  corrupt(KEYS[4], 'has a bad field quarantine_until_ms')
end
-- The one write, after every check.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - memory))
local out = {}
put(out, int_s(now))
put(out, epoch[1] or '')
put(out, int_s(quarantine))
put(out, int_s(idle_count))
put(out, int_s(#due))
put_all(out, due)
put_all(out, idle)
return table.concat(out)
