-- KEYS[1] idle set  KEYS[3i-1] slot hash i  KEYS[3i] task bucket of the task that stopped
-- in slot i  KEYS[3i+1] the slot's group of the deadline index
-- ARGV[3i-2] slot id i  ARGV[3i-1] lease that stopped in slot i  ARGV[3i] its task id
-- Returns  a string of n characters: "1" when slot i was stopping with that lease and
-- is idle now; "0" when it was not (a sweep reclaimed it first, or it is corrupt). One
-- string is cheaper to build and to read than an array of n integers.
-- Called once the stop/timeout callbacks of the lease have returned. The task leaves
-- the index here, not at its stop or timeout: until its callbacks returned, no claim
-- takes it again (in this slot or another). A bucket of another type is left alone
-- (the slot is freed all the same): the claims of its tasks report it; so is a foreign
-- group (the sweep reports it).
check_type(KEYS[1], 'set')
local n = (#KEYS - 1) / 3
if n % 1 ~= 0 or #ARGV ~= 3 * n then
  return redis.error_reply('ERR free: bad arguments')
end
-- Only the stopping reason and lease decide (a slot of another type or shape is not
-- freed); clearing the holder drops whatever else the hash had. The index entry goes
-- with it (where the slot's task is the caller's): everything is read before any write.
local freeing, gone = {}, {}
for i = 1, n do
  local r = redis.pcall('HMGET', KEYS[3 * i - 1], 'stopping', 'lease', 'task')
  if not r.err and r[1] and r[2] == ARGV[3 * i - 1] then
    freeing[i] = true
    local task = ARGV[3 * i]
    -- The index entry can only name this slot: while it exists no claim takes the
    -- task, and only this free drops it.
    gone[i] = r[3] == task
  end
end
local out, freed, drops, drop_keys = {}, {}, {}, {}
-- How many slots are freed (counted, not taken with #).
local nf = 0
for i = 1, n do
  if freeing[i] then
    clear_holder(KEYS[3 * i - 1])
    if gone[i] then
      redis.pcall('HDEL', KEYS[3 * i], ARGV[3 * i])
    end
    -- Its group's bound in `deadlines` may stay lower: the next sweep settles it.
    local g, id = KEYS[3 * i + 1], ARGV[3 * i - 2]
    local d = drops[g]
    if not d then
      d = {}
      drops[g] = d
      drop_keys[#drop_keys + 1] = g
    end
    d[#d + 1] = id
    nf = nf + 1
    freed[nf] = id
    out[i] = '1'
  else
    out[i] = '0'
  end
end
for _, g in ipairs(drop_keys) do
  redis.pcall('HDEL', g, unpack(drops[g]))
end
if nf > 0 then
  redis.call('SADD', KEYS[1], unpack(freed))
end
return table.concat(out)
