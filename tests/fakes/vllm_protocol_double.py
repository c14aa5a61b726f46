#!/usr/bin/python3
"""PROTOCOL DOUBLE of vLLM's OpenAI-compatible server, for hearth's tests. It is NOT vLLM: there is no
model, no GPU and no CUDA here (vLLM cannot run on the CI machines), only the HTTP protocol and the
process behaviour that hearth depends on, mirrored from vLLM's documentation and source as cited
below. Its answers are deterministic echoes, not generated text.

Run it as the `vllm` program (`[runtimes] vllm = "<path to this file>"`): it takes the argv of
`vllm serve` and answers like `vllm serve` would. Standard library only (Python 3.11), because it
runs as the unprivileged runtime user with a clean environment (PATH, HOME and the model's `env`).

Mirrored (sources: docs.vllm.ai "Sleep Mode" (docs/features/sleep_mode.md), vLLM source
vllm/entrypoints/serve/sleep/api_router.py, vllm/v1/engine/core.py (EngineCore.sleep/wake_up/
is_sleeping), vllm/v1/executor/abstract.py (Executor.sleep/wake_up), vllm/entrypoints/serve/
instrumentator/health.py, vllm/entrypoints/openai/protocol.py (ModelCard, ErrorResponse),
vllm/entrypoints/openai/serving_engine.py (_check_model), vllm/config/cache.py
(gpu_memory_utilization), vllm/entrypoints/openai/api_server.py (setup_server / run_server)):

  argv      `serve MODEL --host H --port P --served-model-name NAME [NAME...] --max-model-len L
            --max-num-seqs S --gpu-memory-utilization F [--enable-sleep-mode]
            [--tensor-parallel-size N | -tp N]`. An unknown flag: argparse error, exit 2 (vLLM's CLI is
            argparse). --gpu-memory-utilization outside (0, 1]: exit 1 with a pydantic-like
            ValidationError (vLLM validates CacheConfig `Field(gt=0, le=1)` after parsing).
            --tensor-parallel-size above the number of devices in CUDA_VISIBLE_DEVICES: exit 1 with
            vLLM's "please set tensor_parallel_size (N) to less than max local gpu count (M)".
  startup   vLLM binds its socket first (setup_server, to reserve the port) and starts listening only
            once the engine is initialised (uvicorn starts after the engine): connections are
            refused while it "loads". Load time: HEARTH_VLLM_DOUBLE_LOAD_SECONDS (default 0.5).
            Logs like vLLM on stderr, ending with "Starting vLLM API server 0 on http://H:P".
  GET /health               200, empty body (engine alive). Also while asleep.
  GET /v1/models            {"object":"list","data":[{"id":NAME,"object":"model","created":T,
                            "owned_by":"vllm","root":MODEL,"parent":null,"max_model_len":L,
                            "permission":[{...}]}]} (ModelCard). Works while asleep.
  GET /version              {"version": "..."}
  POST /v1/chat/completions, POST /v1/completions
            stream (SSE `data: {chunk}` events, then `data: [DONE]`) and non-stream; `model` must be a
            served name, else 404 {"error":{"message":"The model `X` does not exist.",
            "type":"NotFoundError","param":"model","code":404}} (ErrorResponse/ErrorInfo of current
            vLLM). The answer echoes the last user message, one word per "token", capped by
            max_tokens (finish_reason "length") or ending with "stop".
            While asleep: 503 {"error":{"message":"Model is currently in sleep mode...",
            "type":"ModelSleepingError","code":503}} as docs/source/features/sleep_mode.md documents
            (NOTE: current upstream code instead pauses the scheduler and queues the request until
            wake_up; either way hearth must never send one, and every such request is recorded).
  Dev endpoints, only when VLLM_SERVER_DEV_MODE=1 (attach_router returns early otherwise, so
  they are FastAPI 404 {"detail":"Not Found"}):
    POST /sleep?level=0|1|2[&mode=abort|wait|keep]   200, empty body, once asleep. Level 1 offloads
            weights to CPU and drops the KV cache; level 2 drops both; level 0 only pauses the
            scheduler. mode=abort (default) aborts requests in flight (finish_reason "abort").
            Already asleep: logs "Executor is already sleeping." and answers 200.
            Without --enable-sleep-mode: 500 with "Sleep mode is not enabled in the model config"
            (the engine's assertion; NOTE: recent V1 engines no longer assert and would "sleep"
            without freeing memory: hearth must never call /sleep on such a server).
            Takes HEARTH_VLLM_DOUBLE_SLEEP_SECONDS (default 0.2). Logs "It took %.6f seconds to
            fall asleep."
    POST /wake_up[?tags=weights&tags=kv_cache]   200, empty body, once awake (all tags). Partial
            tags keep the rest asleep (is_sleeping stays true until every tag is up). Not asleep:
            logs "Executor is not sleeping." and answers 200. Takes HEARTH_VLLM_DOUBLE_WAKE_SECONDS
            (default 0.2).
    GET /is_sleeping   {"is_sleeping": bool}; true from the moment /sleep starts (the scheduler is
            paused first) until /wake_up has restored every tag.
  SIGTERM   graceful exit 0.

Fault injection (environment):
  HEARTH_VLLM_DOUBLE_WAKE_FAIL = error   /wake_up answers 500 (InternalServerError), stays asleep
                               = crash   /wake_up prints a CUDA out-of-memory traceback line to stderr
                                         and the process exits 1 without answering
                               = stuck   /wake_up answers 200 but the engine stays asleep
  HEARTH_VLLM_DOUBLE_WAKE_FAIL_TIMES = N   only the first N wake-ups fail, counted in the state file
                                         `<HEARTH_VLLM_DOUBLE_LOG>.wake-failures` (so the count survives
                                         restarts; in memory without a log, or when the file can be
                                         neither written nor created: tests pre-create it 0666).
                                         Unset: every wake-up fails.
  HEARTH_VLLM_DOUBLE_TOKEN_SECONDS = S   delay per streamed token (default 0), for long streams.
  HEARTH_VLLM_DOUBLE_GPU_COUNT = N       devices visible when CUDA_VISIBLE_DEVICES is unset (default 8).

Record: with HEARTH_VLLM_DOUBLE_LOG set, one JSON object per line is appended (and flushed) to that
file, each with "event", "t" (Unix time) and "pid":
  {"event":"start","argv":[...],"env":{"CUDA_VISIBLE_DEVICES":..,"VLLM_SERVER_DEV_MODE":..},
   "env_keys":[...]}                                   the process started (before loading)
  {"event":"listening","host":..,"port":..}            loaded, accepting connections
  {"event":"sleep","level":N,"mode":..,"in_flight":N,"already_sleeping":bool,"outcome":"ok"|"refused",
   "t_begin":T}                                        written once asleep ("t"), or when refused;
                                                       in_flight: requests running when /sleep came
  {"event":"wake","tags":[..]|null,"outcome":"ok"|"partial"|"error"|"crash"|"stuck"|"not_sleeping",
   "in_flight":N,"t_begin":T}                          written once awake, or when the injected
                                                       failure starts
  {"event":"is_sleeping","value":bool}
  {"event":"request","path":..,"model":..,"stream":bool,"asleep":bool,"status":N,"in_flight":N}
                                                       in_flight counts this request when accepted
  {"event":"dev_endpoint_refused","path":..}           a dev endpoint hit without VLLM_SERVER_DEV_MODE
  {"event":"stop","signal":"SIGTERM"}
The runtime user writes this file: tests create it 0666 in a directory it can traverse (and, for
WAKE_FAIL_TIMES, write: the state file lives next to it).
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid

VERSION = "0.0.0-protocol-double"
LOG_PATH = os.environ.get("HEARTH_VLLM_DOUBLE_LOG") or None
_log_lock = threading.Lock()


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return float(v)


def record(event: str, **fields):
    """Appends one JSON line to HEARTH_VLLM_DOUBLE_LOG (if set), written and flushed at once."""
    if not LOG_PATH:
        return
    obj = {"event": event, "t": time.time(), "pid": os.getpid(), **fields}
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    with _log_lock:
        fd = os.open(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def vlog(level: str, where: str, msg: str):
    """A log line in vLLM's format: `LEVEL MM-DD HH:MM:SS [file.py:line] message`."""
    ts = time.strftime("%m-%d %H:%M:%S")
    print(f"(APIServer pid={os.getpid()}) {level} {ts} [{where}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# command line (vllm serve)
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm", description="vLLM CLI (PROTOCOL DOUBLE)")
    sub = p.add_subparsers(dest="subcommand", required=True)
    s = sub.add_parser("serve", help="Start the vLLM OpenAI Compatible API server.")
    s.add_argument("model_tag", help="The model tag to serve")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=None)
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--enable-sleep-mode", action="store_true", default=False)
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    return p.parse_args(argv)  # unknown flags: argparse prints usage and exits 2, like vLLM


def validate(args: argparse.Namespace):
    u = args.gpu_memory_utilization
    if not (0 < u <= 1):
        kind, bound = (("greater_than", "greater than 0") if u <= 0
                       else ("less_than_equal", "less than or equal to 1"))
        print("Traceback (most recent call last):\n  ...\n"
              "pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig\n"
              f"gpu_memory_utilization\n  Input should be {bound} "
              f"[type={kind}, input_value={u}, input_type=float]", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.max_model_len is not None and args.max_model_len <= 0:
        print(f"ValueError: max_model_len must be positive, got {args.max_model_len}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if args.max_num_seqs is not None and args.max_num_seqs <= 0:
        print(f"ValueError: max_num_seqs must be positive, got {args.max_num_seqs}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if args.tensor_parallel_size < 1:
        print("ValueError: tensor_parallel_size must be >= 1", file=sys.stderr, flush=True)
        sys.exit(1)


def visible_gpu_count() -> int:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return int(os.environ.get("HEARTH_VLLM_DOUBLE_GPU_COUNT", "8"))
    return len([d for d in cvd.split(",") if d.strip() != ""])


# ------------------------------------------------------------------------------------------------
# engine state
# ------------------------------------------------------------------------------------------------

class Engine:
    """The sleep state of the engine core. Utility calls (sleep, wake_up) run one at a time, as in
    vLLM's engine-core busy loop."""

    ALL_TAGS = ("weights", "kv_cache")

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()          # guards the fields below
        self.utility = threading.Lock()       # one sleep / wake_up at a time
        self.paused = False                   # scheduler paused (is_sleeping at any level)
        self.sleeping_tags: set[str] = set()  # executor memory asleep
        self.level = None
        self.in_flight = 0
        self.abort_epoch = 0                  # bumped by sleep(mode=abort): running requests end

    def is_sleeping(self) -> bool:
        with self.lock:
            return self.paused or bool(self.sleeping_tags)


def wake_failures_so_far(path: str | None, memory: list[int]) -> int:
    if path is None:
        return memory[0]
    try:
        with open(path) as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0


def count_wake_failure(path: str | None, memory: list[int]):
    n = wake_failures_so_far(path, memory) + 1
    memory[0] = n
    if path is not None:
        try:
            with open(path, "w") as f:
                f.write(str(n))
        except OSError as e:
            vlog("WARNING", "double.py:0", f"cannot write the wake-failure state file {path}: {e}")


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------

def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    # vllm/entrypoints/openai/protocol.py: ErrorResponse(error=ErrorInfo(message, type, param, code))
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def make_handler(args, engine: Engine, dev_mode: bool):
    served = args.served_model_name or [args.model_tag]
    max_model_len = args.max_model_len or 4096
    created = int(time.time())
    token_seconds = _env_float("HEARTH_VLLM_DOUBLE_TOKEN_SECONDS", 0.0)
    sleep_seconds = _env_float("HEARTH_VLLM_DOUBLE_SLEEP_SECONDS", 0.2)
    wake_seconds = _env_float("HEARTH_VLLM_DOUBLE_WAKE_SECONDS", 0.2)
    wake_fail = os.environ.get("HEARTH_VLLM_DOUBLE_WAKE_FAIL", "").strip() or None
    if wake_fail not in (None, "error", "crash", "stuck"):
        vlog("WARNING", "double.py:0", f"unknown HEARTH_VLLM_DOUBLE_WAKE_FAIL={wake_fail!r}, ignored")
        wake_fail = None
    fail_times_env = os.environ.get("HEARTH_VLLM_DOUBLE_WAKE_FAIL_TIMES", "").strip()
    fail_times = int(fail_times_env) if fail_times_env else None
    state_path = (LOG_PATH + ".wake-failures") if LOG_PATH else None
    fail_memory = [0]

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def version_string(self):
            return "uvicorn"

        def log_message(self, fmt, *a):
            # uvicorn's access log format
            print(f"INFO:     {self.client_address[0]}:{self.client_address[1]} - \"{fmt % a}\"",
                  file=sys.stderr, flush=True)

        def log_request(self, code="-", size="-"):
            self.log_message('%s %s', self.requestline, str(code))

        # -- responses ---------------------------------------------------------------------------
        def _send(self, code: int, body: bytes = b"", ctype: str = "application/json"):
            self.send_response(code)
            if body or ctype:
                self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _json(self, code: int, obj):
            self._send(code, json.dumps(obj).encode())

        def _empty(self, code: int = 200):
            # FastAPI Response(status_code=200): no body, no content-type
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def _not_found(self):
            self._json(404, {"detail": "Not Found"})

        def _read_body(self) -> bytes:
            n = int(self.headers.get("content-length") or 0)
            return self.rfile.read(n) if n else b""

        # -- routing -----------------------------------------------------------------------------
        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            if u.path == "/health":
                self._empty(200)
            elif u.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{
                    "id": name, "object": "model", "created": created, "owned_by": "vllm",
                    "root": args.model_tag, "parent": None, "max_model_len": max_model_len,
                    "permission": [{
                        "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                        "created": created, "allow_create_engine": False, "allow_sampling": True,
                        "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}]} for name in served]})
            elif u.path == "/version":
                self._json(200, {"version": VERSION})
            elif u.path == "/is_sleeping":
                if not dev_mode:
                    record("dev_endpoint_refused", path=u.path)
                    return self._not_found()
                value = engine.is_sleeping()
                vlog("INFO", "api_router.py:60", "check whether the engine is sleeping")
                record("is_sleeping", value=value)
                self._json(200, {"is_sleeping": value})
            elif u.path in ("/v1/chat/completions", "/v1/completions", "/sleep", "/wake_up"):
                self._json(405, {"detail": "Method Not Allowed"})
            else:
                self._not_found()

        def do_POST(self):
            u = urllib.parse.urlsplit(self.path)
            q = urllib.parse.parse_qs(u.query)
            raw = self._read_body()
            if u.path in ("/v1/chat/completions", "/v1/completions"):
                return self._inference(u.path, raw)
            if u.path in ("/sleep", "/wake_up"):
                if not dev_mode:
                    record("dev_endpoint_refused", path=u.path)
                    return self._not_found()
                return self._sleep(q) if u.path == "/sleep" else self._wake(q)
            if u.path in ("/health", "/v1/models", "/is_sleeping", "/version"):
                return self._json(405, {"detail": "Method Not Allowed"})
            self._not_found()

        # -- sleep mode --------------------------------------------------------------------------
        def _sleep(self, q):
            level_s = (q.get("level") or ["1"])[0]
            mode = (q.get("mode") or ["abort"])[0]
            try:
                level = int(level_s)
            except ValueError:
                record("sleep", level=level_s, mode=mode, in_flight=engine.in_flight,
                       already_sleeping=engine.is_sleeping(), outcome="refused")
                return self._json(500, error_body(
                    f"invalid literal for int() with base 10: {level_s!r}", "InternalServerError", 500))
            if mode not in ("abort", "wait", "keep") or level not in (0, 1, 2):
                record("sleep", level=level, mode=mode, in_flight=engine.in_flight,
                       already_sleeping=engine.is_sleeping(), outcome="refused")
                msg = (f"Invalid pause mode: {mode}" if mode not in ("abort", "wait", "keep")
                       else f"invalid sleep level {level}")
                return self._json(500, error_body(msg, "InternalServerError", 500))
            if not args.enable_sleep_mode:
                record("sleep", level=level, mode=mode, in_flight=engine.in_flight,
                       already_sleeping=False, outcome="refused")
                vlog("ERROR", "core.py:0", "AssertionError: Sleep mode is not enabled in the model config")
                return self._json(500, error_body("Sleep mode is not enabled in the model config",
                                                  "InternalServerError", 500))
            with engine.utility:
                t_begin = time.time()
                with engine.lock:
                    already = bool(engine.sleeping_tags) or (engine.paused and level == 0)
                    in_flight = engine.in_flight
                    engine.paused = True
                    if mode == "abort":
                        engine.abort_epoch += 1
                if already:
                    vlog("WARNING", "abstract.py:0", "Executor is already sleeping.")
                elif level >= 1:
                    t0 = time.perf_counter()
                    if mode == "wait":
                        while True:
                            with engine.lock:
                                if engine.in_flight == 0:
                                    break
                            time.sleep(0.01)
                    time.sleep(sleep_seconds)
                    with engine.lock:
                        engine.sleeping_tags = set(Engine.ALL_TAGS)
                        engine.level = level
                    vlog("INFO", "gpu_worker.py:0",
                         "Sleep mode freed 38.50 GiB memory, 1.20 GiB memory is still in use.")
                    vlog("INFO", "abstract.py:0",
                         f"It took {time.perf_counter() - t0:.6f} seconds to fall asleep.")
                record("sleep", level=level, mode=mode, in_flight=in_flight, already_sleeping=already,
                       outcome="ok", t_begin=t_begin)
            self._empty(200)

        def _wake(self, q):
            tags = q.get("tags") or None
            with engine.utility:
                t_begin = time.time()
                with engine.lock:
                    asleep = engine.paused or bool(engine.sleeping_tags)
                    in_flight = engine.in_flight
                if not asleep:
                    record("wake", tags=tags, outcome="not_sleeping", in_flight=in_flight, t_begin=t_begin)
                    vlog("WARNING", "abstract.py:0", "Executor is not sleeping.")
                    return self._empty(200)
                vlog("INFO", "api_router.py:40", f"wake up the engine with tags: {tags}")
                failing = wake_fail is not None and (
                    fail_times is None or wake_failures_so_far(state_path, fail_memory) < fail_times)
                if failing:
                    count_wake_failure(state_path, fail_memory)
                    record("wake", tags=tags, outcome=wake_fail, in_flight=in_flight, t_begin=t_begin)
                    time.sleep(wake_seconds)
                    if wake_fail == "crash":
                        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. "
                              "GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free. "
                              "Including non-PyTorch memory, this process has 0 bytes memory in use. "
                              "(PROTOCOL DOUBLE: injected crash in wake_up)", file=sys.stderr, flush=True)
                        vlog("ERROR", "core.py:0", "EngineCore encountered a fatal error.")
                        os._exit(1)
                    if wake_fail == "error":
                        vlog("ERROR", "api_server.py:0", "RuntimeError: CUDA error: out of memory "
                             "(PROTOCOL DOUBLE: injected wake_up error)")
                        return self._json(500, error_body(
                            "CUDA error: out of memory (PROTOCOL DOUBLE: injected wake_up error)",
                            "InternalServerError", 500))
                    # stuck: answers like a successful wake_up but nothing woke
                    return self._empty(200)
                t0 = time.perf_counter()
                time.sleep(wake_seconds)
                with engine.lock:
                    want = set(tags) if tags else None
                    if want is not None:
                        want.discard("scheduling")
                    if want is None:
                        engine.sleeping_tags = set()
                    else:
                        unknown = [t for t in want if t not in engine.sleeping_tags]
                        if unknown:
                            vlog("WARNING", "abstract.py:0",
                                 f"Tag {unknown[0]} is not in sleeping tags {engine.sleeping_tags}")
                        else:
                            engine.sleeping_tags -= want
                    if not engine.sleeping_tags:
                        engine.paused = False
                        engine.level = None
                    still = engine.paused or bool(engine.sleeping_tags)
                record("wake", tags=tags, outcome="ok" if not still else "partial", in_flight=in_flight,
                       t_begin=t_begin)
                vlog("INFO", "abstract.py:0", f"It took {time.perf_counter() - t0:.6f} seconds to wake "
                     f"up tags {tags if tags is not None else list(Engine.ALL_TAGS)}.")
            self._empty(200)

        # -- inference ---------------------------------------------------------------------------
        def _inference(self, path: str, raw: bytes):
            chat = path == "/v1/chat/completions"
            try:
                req = json.loads(raw or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("body is not an object")
            except ValueError as e:
                record("request", path=path, model=None, stream=False, asleep=engine.is_sleeping(),
                       status=400, in_flight=engine.in_flight)
                return self._json(400, error_body(f"JSON decode error: {e}", "BadRequestError", 400))
            model = req.get("model")
            stream = bool(req.get("stream"))
            asleep = engine.is_sleeping()

            def rec(status):
                record("request", path=path, model=model, stream=stream, asleep=asleep,
                       status=status, in_flight=engine.in_flight)

            if model not in served:
                rec(404)
                return self._json(404, error_body(f"The model `{model}` does not exist.",
                                                  "NotFoundError", 404, "model"))
            if asleep:
                rec(503)
                vlog("WARNING", "api_server.py:0", f"request for {path} while the engine is sleeping")
                return self._json(503, {"error": {
                    "message": "Model is currently in sleep mode. Please wake it up first with a POST "
                               "request to /wake_up", "type": "ModelSleepingError", "code": 503}})
            if chat:
                msgs = req.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    rec(400)
                    return self._json(400, error_body("messages must be a non-empty list",
                                                      "BadRequestError", 400, "messages"))
                prompt = ""
                for m in msgs:
                    c = m.get("content") if isinstance(m, dict) else None
                    if isinstance(c, list):
                        c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                    if isinstance(m, dict) and m.get("role") == "user" and isinstance(c, str):
                        prompt = c
                all_text = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
            else:
                p = req.get("prompt")
                prompt = p if isinstance(p, str) else " ".join(map(str, p or []))
                all_text = prompt
            max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or 16
            if not isinstance(max_tokens, int) or max_tokens < 1:
                rec(400)
                return self._json(400, error_body("max_tokens must be at least 1", "BadRequestError",
                                                  400, "max_tokens"))
            prompt_tokens = max(1, len(all_text.split()))
            if prompt_tokens + max_tokens > max_model_len:
                rec(400)
                return self._json(400, error_body(
                    f"This model's maximum context length is {max_model_len} tokens. However, you "
                    f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                    f"{max_tokens} in the completion). Please reduce the length of the messages or "
                    f"completion.", "BadRequestError", 400))
            words = ["echo:"] + (prompt.split() or ["(empty)"])
            if req.get("ignore_eos"):
                words = (words * (max_tokens // len(words) + 1))
            out = words[:max_tokens]
            finish = "length" if len(words) > max_tokens else "stop"
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            now = int(time.time())
            with engine.lock:
                engine.in_flight += 1
                epoch = engine.abort_epoch
            rec(200)
            try:
                if stream:
                    self._stream(chat, rid, now, model, out, finish, prompt_tokens, req, epoch)
                else:
                    if token_seconds:
                        time.sleep(token_seconds * len(out))
                    with engine.lock:
                        aborted = engine.abort_epoch != epoch
                    text = " ".join(out)
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(out),
                             "total_tokens": prompt_tokens + len(out), "prompt_tokens_details": None}
                    if chat:
                        choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                                          "reasoning_content": None, "tool_calls": []},
                                  "logprobs": None, "finish_reason": "abort" if aborted else finish,
                                  "stop_reason": None}
                        body = {"id": rid, "object": "chat.completion", "created": now, "model": model,
                                "choices": [choice], "usage": usage, "prompt_logprobs": None}
                    else:
                        choice = {"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": "abort" if aborted else finish, "stop_reason": None,
                                  "prompt_logprobs": None}
                        body = {"id": rid, "object": "text_completion", "created": now, "model": model,
                                "choices": [choice], "usage": usage}
                    self._json(200, body)
            finally:
                with engine.lock:
                    engine.in_flight -= 1

        def _chunk(self, data: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _stream(self, chat, rid, now, model, out, finish, prompt_tokens, req, epoch):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            obj = "chat.completion.chunk" if chat else "text_completion"
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

            def event(choices, usage=None):
                d = {"id": rid, "object": obj, "created": now, "model": model, "choices": choices}
                if usage is not None:  # vLLM serialises chunks with exclude_unset
                    d["usage"] = usage
                self._chunk(b"data: " + json.dumps(d).encode() + b"\n\n")

            try:
                if chat:
                    event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])
                sent = 0
                reason = finish
                for i, w in enumerate(out):
                    with engine.lock:
                        if engine.abort_epoch != epoch:
                            reason = "abort"
                            break
                    if token_seconds:
                        time.sleep(token_seconds)
                    piece = w if i == 0 else " " + w
                    if chat:
                        event([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                "finish_reason": None}])
                    else:
                        event([{"index": 0, "text": piece, "logprobs": None, "finish_reason": None,
                                "stop_reason": None}])
                    sent += 1
                if chat:
                    event([{"index": 0, "delta": {"content": ""}, "logprobs": None,
                            "finish_reason": reason, "stop_reason": None}])
                else:
                    event([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason,
                            "stop_reason": None}])
                if include_usage:
                    event([], {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                               "total_tokens": prompt_tokens + sent})
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return H


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    record("start", argv=argv, env={
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "VLLM_SERVER_DEV_MODE": os.environ.get("VLLM_SERVER_DEV_MODE"),
    }, env_keys=sorted(os.environ))
    validate(args)
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip().lower() in ("1", "true")
    host = args.host or ""
    vlog("INFO", "api_server.py:1800", f"vLLM API server version {VERSION} (PROTOCOL DOUBLE, not vLLM)")
    vlog("INFO", "utils.py:300", f"non-default args: {vars(args)}")
    if dev_mode:
        vlog("WARNING", "api_server.py:1100", "SECURITY WARNING: Development endpoints are enabled! "
             "This should NOT be used in production!")

    def on_sigterm(signum, frame):
        record("stop", signal=signal.Signals(signum).name)
        vlog("INFO", "launcher.py:100", "Shutting down FastAPI HTTP server.")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)

    engine = Engine(args)
    # vLLM binds the port before the engine is built (setup_server) and listens only once uvicorn
    # starts, after engine initialisation: until then connections are refused.
    srv = Server((host, args.port), make_handler(args, engine, dev_mode), bind_and_activate=False)
    try:
        srv.server_bind()
    except OSError as e:
        print(f"OSError: [Errno {e.errno}] error while attempting to bind on address "
              f"({host!r}, {args.port}): {e.strerror}", file=sys.stderr, flush=True)
        return 1

    vlog("INFO", "model.py:500", f"Resolved architecture: DoubleForCausalLM (model {args.model_tag})")
    if args.tensor_parallel_size > visible_gpu_count():
        print(f"RuntimeError: please set tensor_parallel_size ({args.tensor_parallel_size}) to less "
              f"than max local gpu count ({visible_gpu_count()})", file=sys.stderr, flush=True)
        return 1
    vlog("INFO", "gpu_worker.py:250", "Available KV cache memory: 30.00 GiB (the current vLLM instance "
         f"can use total_gpu_memory (79.19GiB) x gpu_memory_utilization "
         f"({args.gpu_memory_utilization:.2f}) = {79.19 * args.gpu_memory_utilization:.2f}GiB)")
    time.sleep(_env_float("HEARTH_VLLM_DOUBLE_LOAD_SECONDS", 0.5))
    vlog("INFO", "core.py:200", "init engine (profile, create kv cache, warmup model) took 0.50 seconds")
    if args.enable_sleep_mode:
        vlog("INFO", "core.py:210", "Sleep mode enabled (cumem allocator)")
    vlog("INFO", "api_server.py:1900",
         f"Starting vLLM API server 0 on http://{host or '0.0.0.0'}:{args.port}")
    srv.server_activate()
    record("listening", host=host, port=args.port)
    print(f"INFO:     Started server process [{os.getpid()}]\nINFO:     Waiting for application startup.\n"
          f"INFO:     Application startup complete.", file=sys.stderr, flush=True)
    srv.serve_forever(poll_interval=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
