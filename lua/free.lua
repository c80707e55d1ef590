-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[2+i] slot hash i
-- ARGV[2i-1] slot id i  ARGV[2i] lease that stopped in slot i
-- Returns  a string of n characters: "1" when slot i was stopping with that lease and
-- is idle now; "0" when it was not (a sweep reclaimed it first, or it is corrupt). One
-- string is cheaper to build and to read than an array of n integers.
-- Called once the stop/timeout callbacks of the lease have returned.
check_type(KEYS[1], 'zset')
check_type(KEYS[2], 'set')
local n = #KEYS - 2
-- Only the stopping reason and lease decide (a slot of another type or shape is not
-- freed); clearing the holder drops whatever else the hash had.
local slots = {}
for i = 1, n do
  local r = redis.pcall('HMGET', KEYS[2 + i], 'stopping', 'lease')
  if not r.err then
    slots[i] = r
  end
end
local out, freed = {}, {}
for i = 1, n do
  local s = slots[i]
  if s and s[1] and s[2] == ARGV[2 * i] then
    clear_holder(KEYS[2 + i])
    freed[#freed + 1] = ARGV[2 * i - 1]
    out[i] = '1'
  else
    out[i] = '0'
  end
end
if #freed > 0 then
  redis.call('SADD', KEYS[2], unpack(freed))
  redis.call('ZREM', KEYS[1], unpack(freed))
end
return table.concat(out)
