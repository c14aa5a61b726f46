# Shared by the tests/hosts/*-check.sh scripts (sourced). They set HEARTH, PORT, PY and `dir` (the
# check's temporary directory, holding hearth.toml and hearth.log) before calling these.
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
api() { curl -sS "$@"; }
# Starts hearth on $dir/hearth.toml in the background (pid in HPID); returns once /health answers.
start() {
  "$HEARTH" run --config "$dir/hearth.toml" >>"$dir/hearth.log" 2>&1 &
  HPID=$!
  for _ in $(seq 200); do
    api -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && return 0
    sleep 0.05
  done
  cat "$dir/hearth.log"; fail "hearth did not answer /health"
}
status() { api "http://127.0.0.1:$PORT/hearth/v1/status"; }
# Evaluates a Python expression over the JSON on stdin, as `d`.
q() { $PY -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
