-- KEYS[1] deadlines zset  KEYS[2] idle set  KEYS[3] tasks hash  KEYS[3+i] slot hash i
-- ARGV[2i-1] slot id i  ARGV[2i] lease that stopped in slot i
-- Returns  a string of n characters: "1" when slot i was stopping with that lease and
-- is idle now; "0" when it was not (a sweep reclaimed it first, or it is corrupt). One
-- string is cheaper to build and to read than an array of n integers.
-- Called once the stop/timeout callbacks of the lease have returned. The task leaves
-- the index here, not at its stop or timeout: until its callbacks returned, no claim
-- takes it again (in this slot or another).
check_type(KEYS[1], 'zset')
check_type(KEYS[2], 'set')
local n = #KEYS - 3
-- Only the stopping reason and lease decide (a slot of another type or shape is not
-- freed); clearing the holder drops whatever else the hash had.
local tasks = {}
for i = 1, n do
  local r = redis.pcall('HMGET', KEYS[3 + i], 'stopping', 'lease', 'task')
  if not r.err and r[1] and r[2] == ARGV[2 * i] then
    tasks[i] = r[3] or false
  end
end
-- The index entries of the tasks freed, read before any write.
local ids, at = {}, {}
for i = 1, n do
  if tasks[i] then
    ids[#ids + 1] = tasks[i]
    at[#ids] = i
  end
end
local owners = {}
if #ids > 0 then
  owners = read_checked('hash', 'HMGET', KEYS[3], unpack(ids))
end
local out, freed, gone = {}, {}, {}
for i = 1, n do
  if tasks[i] ~= nil then
    clear_holder(KEYS[3 + i])
    freed[#freed + 1] = ARGV[2 * i - 1]
    out[i] = '1'
  else
    out[i] = '0'
  end
end
-- An entry goes only where it still names the slot freed.
for j, task in ipairs(ids) do
  if owners[j] == ARGV[2 * at[j] - 1] then
    gone[#gone + 1] = task
  end
end
if #freed > 0 then
  redis.call('SADD', KEYS[2], unpack(freed))
  redis.call('ZREM', KEYS[1], unpack(freed))
end
if #gone > 0 then
  redis.call('HDEL', KEYS[3], unpack(gone))
end
return table.concat(out)
