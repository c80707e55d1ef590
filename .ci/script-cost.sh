#!/usr/bin/env bash
# Instructions each Lua script costs inside Redis, counted by callgrind: unlike
# wall-clock time, the counts repeat within about 1% from run to run, even on a busy
# or drifting VM.
#
# Usage: .ci/script-cost.sh [workload options]   (default: --slots 1000 --poll-many --sweep)
# Needs valgrind, redis-server and redis-cli; builds the release binary.
# Runs `task-semaphore workload` against a redis-server under callgrind that dumps its
# counts after every EVALSHA, names each dump's script from the SLOWLOG (on for every
# command; its bookkeeping, 10-20% of a script's count, is subtracted per dump with
# callgrind_annotate), and prints, per
# script: calls, total instructions, and instructions per call and per slot (a slot is
# the KEYS beyond the script's fixed keys:
# see `per_slot_keys` below).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--slots 1000 --poll-many --sweep)
for tool in valgrind redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "script-cost: $tool is missing" >&2; exit 2; }
done
cargo build --release --locked --quiet --bin task-semaphore

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" --collect-atstart=no \
  --toggle-collect=evalShaCommand --dump-after=evalShaCommand \
  redis-server --port "$port" --save '' --appendonly no \
  --slowlog-log-slower-than 0 --slowlog-max-len 1000000 >"$dir/valgrind.log" 2>&1 &
vpid=$!
# SCRIPT_COST_KEEP=1 keeps the callgrind dumps (for callgrind_annotate) and prints where.
trap 'kill $vpid 2>/dev/null || true; if [ -n "${SCRIPT_COST_KEEP:-}" ]; then echo "dumps kept in $dir" >&2; else rm -rf "$dir"; fi' EXIT
for _ in $(seq 1 150); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
REDIS_URL="redis://127.0.0.1:$port" ./target/release/task-semaphore workload "${args[@]}"

# EVALSHA calls in order: "id sha numkeys".
redis-cli -p "$port" eval "
local out = {}
for _, e in ipairs(redis.call('SLOWLOG', 'GET', -1)) do
  local a = e[4]
  if string.lower(tostring(a[1])) == 'evalsha' then
    out[#out + 1] = e[1] .. ' ' .. tostring(a[2]) .. ' ' .. tostring(a[3])
  end
end
return out" 0 | sort -n >"$dir/calls"
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait $vpid || true

# Script names by SHA1 of common.lua, a newline, the script (as src/scripts.rs builds them).
for f in lua/*.lua; do
  name=$(basename "$f" .lua)
  [ "$name" = common ] && continue
  sha=$( (cat lua/common.lua; printf '\n'; cat "$f") | sha1sum | cut -c1-40)
  echo "$sha $name"
done >"$dir/names"

python3 - "$dir" <<'EOF'
import os, re, subprocess, sys
d = sys.argv[1]
names = dict(l.split() for l in open(f"{d}/names"))
# Fixed KEYS of each script; the rest are per slot: claim and free a slot hash, a task
# bucket and a deadline group, register a slot hash and a group; sweep a slot hash per
# due slot plus one key per due group (counted as slots here: a few percent more).
fixed = {"claim": 5, "sweep": 3, "free": 1, "register": 2, "tick": 4, "keepalive": 3, "release": 5, "epoch": 2, "timeout_done": 1}
per_slot_keys = {"claim": 3, "free": 3, "register": 2}
calls = [l.split() for l in open(f"{d}/calls") if l.strip()]
dumps = sorted((int(m.group(1)), f) for f in os.listdir(d) if (m := re.fullmatch(r"cg\.out\.(\d+)", f)))
if len(dumps) != len(calls):
    print(f"script-cost: {len(dumps)} callgrind dumps but {len(calls)} EVALSHA in the SLOWLOG", file=sys.stderr)
    sys.exit(1)
rows = {}
for (_, f), (_, sha, numkeys) in zip(dumps, calls):
    text = open(f"{d}/{f}").read()
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    # The SLOWLOG's own bookkeeping (every command, inside scripts too, is logged here
    # to name the dumps; a real server logs none of them) is taken out.
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", f"{d}/{f}"], capture_output=True, text=True).stdout
    s = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\S*slowlogPushEntryIfNeeded", ann, re.M)
    slowlog = int(s.group(1).replace(",", "")) if s else 0
    name = names.get(sha, sha[:8])
    r = rows.setdefault(name, [0, 0, 0])
    r[0] += 1
    r[1] += (int(m.group(1)) if m else 0) - slowlog
    r[2] += max(int(numkeys) - fixed.get(name, 0), 0) // per_slot_keys.get(name, 1)
print(f"{'script':<10} {'calls':>6} {'instructions':>14} {'per call':>10} {'slots':>7} {'per slot':>9}")
for name, (n, ir, slots) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
    per_slot = f"{ir // slots:,}" if slots else "-"
    print(f"{name:<10} {n:>6} {ir:>14,} {ir // n:>10,} {slots:>7} {per_slot:>9}")
if os.environ.get("SCRIPT_COST_KEEP"):
    with open(f"{d}/scripts", "w") as out:
        for (_, f), (_, sha, _) in zip(dumps, calls):
            out.write(f"{f} {names.get(sha, sha[:8])}\n")
EOF
