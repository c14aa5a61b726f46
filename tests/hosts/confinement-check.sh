#!/usr/bin/env bash
# Confinement check for a host the CI machines are not like (e.g. a pure cgroup v2 GPU host): runs a
# built `hearth` as root with FAULT-INJECTION runtimes (tests/fakes/fault_injection_server.py, the
# system python3; no llama-server needed) and checks what tests/test_confinement.py checks on CI:
# limits read back, own cgroup, unprivileged user without capabilities, a setsid'd grandchild killed
# with the cgroup, OOM -> failed with the limit, kill -9 + restart -> leftovers gone before /health.
#
#   HEARTH=target/release/hearth bash tests/hosts/confinement-check.sh
#
# Prints what it sees; exits non-zero at the first check that fails.
set -euo pipefail
HEARTH=$(readlink -f "${HEARTH:-target/release/hearth}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=/usr/bin/python3
PORT=${PORT:-18555}
. "$ROOT/tests/hosts/lib.sh"
# alive PID: exists and is not a zombie (a killed orphan may wait a moment for init to reap it)
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
[ "$(id -u)" = 0 ] || fail "run as root"
id hearth-runtime >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin --user-group hearth-runtime
dir=$(mktemp -d /tmp/hearth-check.XXXXXX)
chmod 755 "$dir"
cp "$ROOT/tests/fakes/fault_injection_server.py" "$dir/fake.py"
chmod 644 "$dir/fake.py"
fake() { echo "[\"$PY\", \"$dir/fake.py\", \"--host\", \"{host}\", \"--port\", \"{port}\", $1, \"--tag\", \"$dir/\"]"; }
# Explicit limits only for the controllers delegated to this cgroup (hearth refuses to start a model
# whose explicit limit needs a missing controller; defaults are dropped with a warning).
own=/sys/fs/cgroup$(awk -F: '/^0::/{print $3}' /proc/self/cgroup)
ctrls=" $(cat "$own/cgroup.controllers" 2>/dev/null || echo memory cpu pids) "
echo "controllers available here:$ctrls"
extra=""
case "$ctrls" in *" cpu "*) extra+=$'cpu_weight = 50\ncpu_quota = 1.5\n' ;; esac
case "$ctrls" in *" pids "*) extra+=$'pids_max = 64\n' ;; esac
cat >"$dir/hearth.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
runtime_ports = "42300-42320"
[resources]
host_memory_mb = 2000
[[models]]
id = "escaper"
runtime = "command"
command = $(fake '"--mode", "escape"')
memory_mb = 50
memory_max_mb = 200
${extra}stop_timeout = "1s"
[[models]]
id = "hog"
runtime = "command"
command = $(fake '"--mode", "alloc", "--alloc-mb", "400"')
memory_mb = 50
memory_max_mb = 100
start_timeout = "30s"
EOF
chat() {
  api -o "$dir/resp.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
}
trap 'kill $HPID 2>/dev/null || true' EXIT

start
echo "--- confinement"; status | q 'd["confinement"]'
[ "$(chat escaper)" = 200 ] || fail "chat escaper: $(cat "$dir/resp.json")"
pid=$(status | q '[m for m in d["models"] if m["id"]=="escaper"][0]["pid"]')
cgdir=$(status | q '[m for m in d["models"] if m["id"]=="escaper"][0]["cgroup"]["path"][0]')
echo "--- runtime pid $pid, cgroup $cgdir"
cat "/proc/$pid/cgroup"
grep -q "runtimes/escaper" "/proc/$pid/cgroup" || fail "not in its own cgroup"
if [ -f "$cgdir/memory.max" ]; then
  for f in memory.max memory.swap.max cpu.weight cpu.max pids.max; do
    [ -f "$cgdir/$f" ] && echo "$f = $(cat "$cgdir/$f")"
  done
  [ "$(cat "$cgdir/memory.max")" = $((200 * 1024 * 1024)) ] || fail memory.max
  case "$ctrls" in *" pids "*) [ "$(cat "$cgdir/pids.max")" = 64 ] || fail pids.max ;; esac
  case "$ctrls" in *" cpu "*) [ "$(cut -d' ' -f1 "$cgdir/cpu.max")" = 150000 ] || fail cpu.max ;; esac
  ok "limits read back (cgroup v2)"
else
  echo "(cgroup v1: limits are read back by tests/test_confinement.py)"
fi
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' "/proc/$pid/status"
grep -qE '^Uid:\s+0' "/proc/$pid/status" && fail "runtime runs as root"
grep -qE '^CapBnd:\s+0+$' "/proc/$pid/status" || fail "bounding set not empty"
ok "unprivileged, no capabilities"
sleep 0.5
g=$(pgrep -f "fault-injection-escaped-grandchild $dir/" || true)
[ -n "$g" ] || fail "no escaped grandchild"
echo "escaped grandchild $g: pgid $(ps -o pgid= -p "$g") vs runtime pgid $(ps -o pgid= -p "$pid")"
sleep 1.2
status | q '[m for m in d["models"] if m["id"]=="escaper"][0]["cgroup"]'
api -o /dev/null -X POST "http://127.0.0.1:$PORT/hearth/v1/models/escaper/unload"
for _ in $(seq 100); do [ -d "$cgdir" ] || break; sleep 0.1; done
[ -d "$cgdir" ] && fail "cgroup not removed after unload"
alive "$g" && fail "escaped grandchild survived the stop"
ok "stop killed the whole cgroup (escaped grandchild included) and removed it"

code=$(chat hog)
echo "hog: HTTP $code $(cat "$dir/resp.json")"
[ "$code" = 503 ] && grep -q "oom: limit 100 MB" "$dir/resp.json" || fail "no OOM failure"
status | q '[(m["state"], m["oom_kills_total"], m["last_error"].splitlines()[0]) for m in d["models"] if m["id"]=="hog"][0]'
api "http://127.0.0.1:$PORT/metrics" | grep -E 'oom_kills_total|reason="oom"'
ok "OOM detected and reported with the limit"

[ "$(chat escaper)" = 200 ] || fail "chat escaper again"
sleep 0.5
g=$(pgrep -f "fault-injection-escaped-grandchild $dir/")
cgdir=$(status | q '[m for m in d["models"] if m["id"]=="escaper"][0]["cgroup"]["path"][0]')
kill -9 "$HPID"; wait "$HPID" 2>/dev/null || true
sleep 0.5
alive "$g" || fail "grandchild died with hearth (nothing to clean up)"
echo "after kill -9: grandchild $g alive, $cgdir exists: $([ -d "$cgdir" ] && echo yes || echo no)"
t0=$(date +%s.%N)
start
t1=$(date +%s.%N)
alive "$g" && fail "leftover survived the restart"
[ -d "$cgdir" ] && fail "leftover cgroup not removed"
echo "leftovers gone before /health answered: $($PY -c "print(round($t1 - $t0, 3))") s after the restart began"
status | q 'd["confinement"]["leftovers_killed"]'
ok "kill -9 + restart"
kill -TERM "$HPID"; wait "$HPID" || true
grep -E "confined|leftover|OOM|oom" "$dir/hearth.log" | cut -c1-300 | head -20
echo "ALL CHECKS PASSED"
