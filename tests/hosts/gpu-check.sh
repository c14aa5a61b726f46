#!/usr/bin/env bash
# GPU check for a host with an NVIDIA GPU and its driver (NVML): runs a built `hearth` as root with two
# REAL llama-server runtimes offloaded to GPU 0 (the Vulkan build of the pinned wheel) and shows what
# CI cannot: NVML totals and per-process memory mapped to models, the observed VRAM replacing the
# declared one, a GPU budget that makes the second model wait while the first finishes its stream and
# is evicted, hearth waiting for NVML to show the memory freed before the next start, and VRAM
# freed after a stop.
#
#   HEARTH=target/release/hearth LLAMA_SERVER=/path/llama-server \
#   MODEL_A=a.gguf MODEL_B=b.gguf [MODEL_BIG=big.gguf] bash tests/hosts/gpu-check.sh
#
# With MODEL_BIG (1-2 GB) it also times GPU starts of that model from disk (page cache dropped) against
# starts after `POST .../prewarm` (ROUNDS, default 3).
# Vulkan needs its loader and glvnd (see ../shared/notes/gpu-host.md); the variables VK_DRIVER_FILES
# and __EGL_VENDOR_LIBRARY_FILENAMES, when set, are passed to the runtimes. Prints what it sees; exits
# non-zero at the first check that fails.
set -euo pipefail
HEARTH=$(readlink -f "${HEARTH:-target/release/hearth}")
LLAMA=$(readlink -f "${LLAMA_SERVER:?path of llama-server}")
A=$(readlink -f "${MODEL_A:?first GGUF}")
B=$(readlink -f "${MODEL_B:?second GGUF}")
PY=${PY:-python3}
PORT=${PORT:-18556}
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
[ "$(id -u)" = 0 ] || fail "run as root"
id hearth-runtime >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin --user-group hearth-runtime
dir=$(mktemp -d /tmp/hearth-gpu.XXXXXX)
chmod 755 "$dir"
envs="VK_DRIVER_FILES = \"${VK_DRIVER_FILES:-}\", __EGL_VENDOR_LIBRARY_FILENAMES = \"${__EGL_VENDOR_LIBRARY_FILENAMES:-}\""
config() { # $1: GPU 0 memory cap (MB), $2: vram_mb of a, $3: vram_mb of b
  cat >"$dir/hearth.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
runtime_ports = "42400-42420"
[resources]
host_memory_mb = 16000
gpu_reserve_mb = 0
gpu_poll_interval = "200ms"
gpu_release_timeout = "20s"
nvml = "required"
[[resources.gpus]]
index = 0
memory_mb = $1
[runtimes]
llama_server = "$LLAMA"
[[models]]
id = "a"
runtime = "llama-cpp"
model_path = "$A"
args = ["-t", "4"]
memory_mb = 1000
vram_mb = $2
gpus = [0]
context_length = 2048
max_concurrency = 1
min_residency = "0s"
start_timeout = "120s"
env = { $envs }
[[models]]
id = "b"
runtime = "llama-cpp"
model_path = "$B"
args = ["-t", "4"]
memory_mb = 1000
vram_mb = $3
gpus = "any"
context_length = 2048
max_concurrency = 1
min_residency = "0s"
start_timeout = "120s"
env = { $envs }
EOF
}
stop() { kill "$HPID"; wait "$HPID" || true; }
model() { status | q "[m for m in d['models'] if m['id']=='$1'][0]$2"; }
chat() {
  api -o "$dir/resp.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d "{\"model\":\"$1\",\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
}
smi() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null || true; }
trap 'kill $HPID 2>/dev/null || true' EXIT

echo "=== phase 1: NVML, per-process VRAM mapped to the model, observed VRAM replaces declared"
config 80000 4000 4000
start
"$HEARTH" status --config "$dir/hearth.toml" 2>/dev/null | head -3 || true
status | q 'd["gpu"]'
status | q '[(g["index"], g["name"], g["memory_total_bytes"]//2**20, g["measured_used_bytes"]) for g in d["gpus"]]'
[ "$(status | q 'd["gpu"]["measured"]')" = True ] || fail "NVML is not measuring"
base=$(status | q 'd["gpus"][0]["measured_used_bytes"]//2**20')
echo "GPU 0 in use before any runtime: $base MB"
t0=$(date +%s%N)
[ "$(chat a)" = 200 ] || fail "chat a: $(cat "$dir/resp.json")"
echo "a answered $(( ($(date +%s%N) - t0) / 1000000 )) ms after a cold request: $(q 'd["choices"][0]["message"]["content"][:40]' <"$dir/resp.json")"
grep -m3 -i "vulkan\|offloaded\|using device" "$dir/hearth.log" || true
sleep 1
pid=$(model a "['pid']")
echo "nvidia-smi compute apps:"; smi
status | q '[p for p in d["gpus"][0]["processes"]]'
[ "$(status | q "[p['model'] for p in d['gpus'][0]['processes'] if p['pid']==$pid]")" = "['a']" ] \
  || fail "NVML's process $pid is not mapped to model a"
ok "NVML lists llama-server pid $pid on GPU 0 and hearth maps it to model a"
obs=$(model a "['vram_observed_mb']")
acc=$(model a "['vram_bytes']//2**20")
echo "a: declared vram_mb 4000, observed $obs MB, accounted $acc MB"
[ "$acc" = "$obs" ] || fail "the observed VRAM ($obs) should replace the declared (4000)"
ok "observed peak VRAM ($obs MB) replaces the declared 4000 MB"
stop
grep -E "NVML|runtime (starting|ready)" "$dir/hearth.log" | cut -c1-300

echo "=== phase 2: a budget for one model at a time (1.5 x $obs MB)"
cap=$(( obs * 3 / 2 ))
config "$cap" "$obs" "$obs"
: >"$dir/hearth.log"
start
[ "$(chat a)" = 200 ] || fail "chat a: $(cat "$dir/resp.json")"
sleep 0.5
used_a=$(status | q 'd["gpus"][0]["measured_used_bytes"]//2**20')
echo "GPU 0 in use with a loaded: $used_a MB (before: $base MB)"
# A long stream to a; b asked for while it runs must wait for it, then a is stopped.
$PY - "$PORT" "$dir" <<'EOF'
import json, sys, threading, time, urllib.request
port, d = sys.argv[1], sys.argv[2]
def post(model, stream, n):
    body = json.dumps({"model": model, "stream": stream, "max_tokens": n, "temperature": 0,
                       "messages": [{"role": "user", "content": "count to one hundred"}]}).encode()
    return urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body, {"content-type": "application/json"}),
        timeout=300)
t0 = time.monotonic()
ev = {}
def stream_a():
    chunks = 0
    with post("a", True, 300) as r:
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunks += 1
                if chunks == 1:
                    ev["a_first"] = time.monotonic() - t0
    ev["a_done"] = time.monotonic() - t0
    ev["a_chunks"] = chunks
ta = threading.Thread(target=stream_a)
ta.start()
while "a_first" not in ev:
    time.sleep(0.01)
ev["b_sent"] = time.monotonic() - t0
with post("b", False, 8) as r:
    out = json.load(r)
ev["b_done"] = time.monotonic() - t0
ta.join()
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in ev.items()}))
assert ev["a_chunks"] > 20, ev
assert ev["b_done"] > ev["a_done"], f"b must wait for a's stream: {ev}"
print("ok: b was held", round(ev["b_done"] - ev["b_sent"], 2), "s; a's stream of", ev["a_chunks"],
      "chunks finished first, at", round(ev["a_done"], 2), "s")
EOF
grep -E "draining|stopping runtime|runtime stopped|GPU memory of the stopped|NVML still|runtime starting|runtime ready" "$dir/hearth.log" | cut -c1-260
grep -q "GPU memory of the stopped runtime is freed" "$dir/hearth.log" || fail "no NVML release wait logged"
[ "$(model a "['tier']")" = cold ] || fail "a should be cold"
[ "$(model b "['tier']")" = hot ] || fail "b should be hot"
echo "nvidia-smi compute apps:"; smi
api "http://127.0.0.1:$PORT/metrics" | grep -E "^hearth_gpu_|^hearth_model_vram_bytes|^hearth_runtime_vram|^hearth_evictions_total" || true
ok "over the budget, b waited, a finished its stream, was stopped, its VRAM seen freed, then b started"

echo "=== phase 3: VRAM freed after a stop"
api -sS -X POST "http://127.0.0.1:$PORT/hearth/v1/models/b/unload" >/dev/null
for _ in $(seq 100); do
  [ "$(model b "['state']")" = cold ] && [ "$(status | q 'd["gpus"][0]["processes"]')" = "[]" ] && break
  sleep 0.2
done
sleep 0.5
after=$(status | q 'd["gpus"][0]["measured_used_bytes"]//2**20')
echo "GPU 0 in use: before $base MB, with a model $used_a MB, after the stop $after MB"
[ "$(status | q 'd["gpus"][0]["processes"]')" = "[]" ] || fail "processes still on the GPU"
[ $(( after - base )) -lt 64 ] || fail "VRAM not back to the baseline"
ok "after the stop NVML shows no runtime process and memory back to the baseline"
"$HEARTH" status --config "$dir/hearth.toml" 2>/dev/null || true
stop

if [ -n "${MODEL_BIG:-}" ]; then
  echo "=== phase 4: page-cache tier on the GPU: start from disk vs after prewarm ($(du -h "$MODEL_BIG" | cut -f1) model)"
  BIG=$(readlink -f "$MODEL_BIG")
  A=$BIG; B=$BIG
  config 80000 4000 4000
  : >"$dir/hearth.log"
  start
  printf "%-8s %-6s %8s %8s %8s\n" round from resident prewarm_s load_s
  for r in $(seq "${ROUNDS:-3}"); do
    for tier in disk cache; do
      api -X POST "http://127.0.0.1:$PORT/hearth/v1/models/a/unload" >/dev/null
      for _ in $(seq 100); do [ "$(model a "['state']")" = cold ] && break; sleep 0.1; done
      pw=-
      if [ $tier = disk ]; then
        api -X POST "http://127.0.0.1:$PORT/hearth/v1/models/a/page-cache/evict" >/dev/null
        sync; echo 1 >/proc/sys/vm/drop_caches
      else
        pw=$(api -X POST "http://127.0.0.1:$PORT/hearth/v1/models/a/prewarm" | q 'round(d["seconds"],2)')
      fi
      res=$(api "http://127.0.0.1:$PORT/hearth/v1/models/a/page-cache" | q 'round(d["resident_fraction"],3)')
      [ "$(chat a)" = 200 ] || fail "chat a: $(cat "$dir/resp.json")"
      printf "%-8s %-6s %8s %8s %8s\n" "$r" "$tier" "$res" "$pw" "$(model a "['last_load_seconds']")"
    done
  done
  stop
fi
echo "ALL CHECKS PASSED"
