"""Breaks one guarantee at a time in lua/ and checks that some test fails.

Usage: python3 .ci/mutations.py [M1 M2 ...]   (all when none given; TESTS="--test x" narrows)
Each mutation is applied to the working tree, the tests run, and the file is restored.
"""
import os, subprocess, sys, shutil, tempfile
M = [
 ("M1 claim ignores busy slot", "lua/claim.lua", "elseif state[i] ~= 'idle' then\n", "elseif false then\n"),
 ("M2 claim ignores task already held", "lua/claim.lua", "    elseif r == 0 then", "    elseif false then"),
 ("M3 claim ignores stale polls", "lua/claim.lua", "(ended_at and tonumber(ended_at) >= polled_at)", "false"),
 ("M4 sweep ignores deadline", "lua/sweep.lua", "elseif s.state == 'busy' and s.due <= now then", "elseif s.state == 'busy' then"),
 ("M5 sweep frees before callbacks", "lua/sweep.lua", "redis.call('HSET', key, 'stopping', 'timeout', 'reclaim', reclaim)", "redis.call('SADD', KEYS[2], id)\n    redis.call('HDEL', key, 'task', 'backend', 'lease', 'start', 'due')"),
 ("M6 free ignores lease", "lua/free.lua", "r[2] == ARGV[3 * i - 1]", "true"),
 ("M7 keepalive revives expired", "lua/keepalive.lua", "if s.due <= now then", "if false then"),
 ("M8 index owner unchecked", "lua/common.lua", "if owner ~= slot_id then\n    return nil, {'MOVED', owner}", "if false then\n    return nil, {'MOVED', owner}"),
 ("M9 sweep leaves slot busy", "lua/sweep.lua", "    redis.call('HSET', key, 'stopping', 'timeout', 'reclaim', reclaim)\n", ""),
 ("M10 slot type unchecked", "lua/common.lua", "local r = redis.pcall('HMGET', key, 'task',", "local r = redis.call('HMGET', key, 'task',"),
 ("M12 stopping slots never reclaimed", "lua/sweep.lua", "elseif s.state == 'stopping' and s.reclaim <= now then", "elseif false then"),
 ("M13 claim skips lease counter check", "lua/claim.lua", "if last_lease and last == nil then", "if false then"),
 ("M14 keepalive ignores lease", "lua/keepalive.lua", "if want_lease and want_lease ~= '' and lease ~= strict_int(want_lease) then", "if false then"),
 ("M15 release ignores lease", "lua/release.lua", "if want_lease and want_lease ~= '' and lease ~= strict_int(want_lease) then", "if false then"),
 ("M16 reclaim skips callbacks", "lua/sweep.lua", "    redis.call('HSET', key, 'reclaim', reclaim)\n    set_time(j, id, reclaim, now + s.timeout)\n    put(out, 'R')", "    make_idle(key, id, KEYS[2], KEYS[3 + n + j])\n    times[j][id] = nil\n    put(out, 'R')"),
 ("M17 claim ignores quarantine", "lua/claim.lua", "if now < quarantine then", "if false then"),
 ("M18 epoch change unnoticed", "lua/epoch.lua", "elseif seen ~= '' and current ~= seen then", "elseif false then"),
 ("M19 lease counter not time-based", "lua/claim.lua", "local lease = now * 100\n", "local lease = 0\n"),
 ("M21 claim's reads not type-checked", "lua/common.lua", "  if type(r) == 'table' and r.err then\n    check_type(key, want)", "  if false then\n    check_type(key, want)"),
 ("M22 claim's stale check reads the wrong task", "lua/claim.lua", "    local ended_at = ended[i]", "    local ended_at = ended[1]"),
 ("M23 slot read skips the check of start", "lua/common.lua", "  if not is_int(r[6]) then", "  if false then"),
 ("M24 holder fields without a task read as idle", "lua/common.lua", "    if r[2] or r[4] then", "    if r[2] then"),
 ("M25 claim takes a slot with holder fields", "lua/claim.lua", "cached_int(r[1])) and not r[2] and not r[3] and not r[4] then", "cached_int(r[1])) and not r[2] then"),
 ("M26 claim skips the type check of idle", "lua/claim.lua", "    check_type(idle_key, 'set')\n    error(r)\n  end\n  r = redis.pcall", "    error(r)\n  end\n  r = redis.pcall"),
 ("M27 a late detector restarts the quarantine", "lua/epoch.lua", "since = math.min(now, strict_int(fields[3] or '') or now)", "since = now"),
 ("M28 a kept timeout forgets its timeout_callback ran", "lua/timeout_done.lua", "redis.call('HSET', KEYS[1], 'stopping', 'timeout_done')", "redis.call('HSET', KEYS[1], 'stopping', 'timeout')"),
 ("M29 a stopped task leaves the index before its callbacks", "lua/release.lua", "  -- The index keeps the task until free.lua: no claim takes it again meanwhile.\n", "  redis.call('HDEL', bucket_key, task_id)\n"),
 ("M30 claim ignores the epoch's task_buckets", "lua/claim.lua", "if epoch[2] ~= ARGV[2] then", "if false then"),
 ("M31 claim keeps the index entry when its group is foreign", "lua/claim.lua", "        redis.call('HDEL', bucket_key, task_id)\n", ""),
 ("M32 claim leaves the group bounds alone", "lua/claim.lua", "  r = redis.pcall('ZADD', deadlines_key, 'LT', unpack(lower))\n", "  r = 0\n"),
 ("M35 claim leaves its slots out of the idle set when deadlines is foreign", "lua/claim.lua", "    redis.call('SADD', idle_key, unpack(cands))\n", ""),
 ("M36 claim keeps a refused candidate's slot out of the idle set", "lua/claim.lua", "  redis.call('SADD', idle_key, unpack(back))\n", ""),
 ("M37 claim skips the type check of deadlines", "lua/claim.lua", "    check_type(deadlines_key, 'zset')\n", ""),
 ("M33 sweep settles a group's bound at its latest time", "lua/sweep.lua", "if low == nil or v < low then", "if low == nil or v > low then"),
 ("M34 sweep drops a group whose due slots it was not given", "lua/sweep.lua", "    if low then\n", "    if false then\n"),
 ("M38 sweep settles a group that continues in the next call", "lua/sweep.lua", "  if j ~= open then\n    local low", "  if true then\n    local low"),
 ("M39 sweep skips the type check of a group that continues", "lua/sweep.lua", "    check_type(key, 'hash')\n  else", "  else"),
 ("M11 strict numbers off", "lua/common.lua", "find(v, '^%d+$') ~= nil", "true"),
 ("M40 keepalive writes the slot before its group's type is known", "lua/keepalive.lua", "read_checked('hash', 'HSET', group_key", "redis.call('HSET', slot_key, 'due', deadline_s)\nread_checked('hash', 'HSET', group_key"),
 ("M41 keepalive's group write is not type-checked", "lua/keepalive.lua", "read_checked('hash', 'HSET', group_key, slot_id, deadline_s)", "redis.call('HSET', group_key, slot_id, deadline_s)"),
]
ANCHOR_TEST = "every_mutation_anchor_is_found_once"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKUP = os.path.join(tempfile.gettempdir(), "task-semaphore-mutation.bak")
sel = sys.argv[1:]
TESTS = os.environ.get("TESTS", "--tests").split()
missed = []
# Every anchor first: a mutation whose text is gone from lua/ would test nothing.
stale = [name for name, path, old, new in M
         if (not sel or name.split()[0] in sel) and open(os.path.join(ROOT, path)).read().count(old) != 1]
if stale:
    print("anchors missing or not unique in lua/: " + ", ".join(stale), file=sys.stderr)
    sys.exit(2)
for name, path, old, new in M:
    if sel and name.split()[0] not in sel: continue
    p = os.path.join(ROOT, path)
    src = open(p).read()
    assert old in src, name
    shutil.copy(p, BACKUP)
    open(p, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run(["cargo", "test", "--no-fail-fast"] + TESTS, cwd=ROOT, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        failed = sorted(set(l.split()[1] for l in out.splitlines() if l.startswith("test ") and l.endswith("FAILED")))
        # tests/mutants.rs fails under every mutation (the anchor it looks for is gone
        # while the mutation is applied): it proves nothing about the guard.
        failed = [t for t in failed if t != ANCHOR_TEST]
        verdict = "caught" if r.returncode != 0 and failed else "NOT CAUGHT"
        print(f"{name}: {verdict} by {failed}", flush=True)
        if verdict != "caught":
            missed.append(name)
    finally:
        shutil.copy(BACKUP, p)
sys.exit(1 if missed else 0)
