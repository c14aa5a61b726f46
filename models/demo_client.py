#!/usr/bin/env python3
"""hearth demo client: what a user sees when one endpoint fronts two models that do not fit together.

Run by `cargo xtask demo` against a running `hearth run --config models/demo.toml`; it uses the real
`openai` SDK for the OpenAI-compatible API and httpx for hearth's own /hearth/v1/status.

  (a) cold start: the first request to `smollm2` starts its llama-server; time to first token, answer.
  (b) held request + swap: while a streamed answer from `smollm2` is still flowing, a request for `gen300`
      arrives. It is held (no response headers) until the stream has finished; then hearth stops
      `smollm2` (the two do not fit in memory together) and starts `gen300`. The client's timestamps and
      the model states polled from /hearth/v1/status every 100 ms show that order.
  (c) `hearth status` at the end.

Exits 1 if the observed order is not the one above.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import httpx
from openai import OpenAI

T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(msg: str = "") -> None:
    print(msg, flush=True)


def event(msg: str) -> None:
    print(f"  [{now():6.2f}s] {msg}", flush=True)


class StatusPoller(threading.Thread):
    """Polls /hearth/v1/status and records every change of a model's state."""

    def __init__(self, http: httpx.Client, period: float = 0.1, echo: bool = True):
        super().__init__(daemon=True)
        self.http, self.period, self.echo = http, period, echo
        self.stop_flag = threading.Event()
        self.transitions: list[tuple[float, str, str, str]] = []  # (t, model, old, new)
        self.last: dict[str, str] = {}
        self.pids: set[int] = set()
        self.errors = 0

    def poll_once(self) -> dict | None:
        try:
            r = self.http.get("/hearth/v1/status", timeout=2)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError):
            self.errors += 1
            return None

    def run(self) -> None:
        while not self.stop_flag.is_set():
            st = self.poll_once()
            t = now()
            for m in (st or {}).get("models", []):
                if isinstance(m.get("pid"), int):
                    self.pids.add(m["pid"])
                old, new = self.last.get(m["id"]), m.get("state", "?")
                if old != new:
                    self.last[m["id"]] = new
                    self.transitions.append((t, m["id"], old or "-", new))
                    if self.echo and old is not None:
                        extra = f" (pid {m['pid']})" if m.get("pid") else ""
                        event(f"status: {m['id']:8} {old} -> {new}{extra}")
            self.stop_flag.wait(self.period)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(5)

    def first(self, model: str, states: set[str], after: float = 0.0) -> float | None:
        for t, m, _old, new in self.transitions:
            if m == model and new in states and t >= after:
                return t
        return None


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def rss_mb(pid) -> str:
    """Resident memory of a local process (hearth's runtimes run on this machine)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024:.0f} MB"
    except (OSError, ValueError):
        pass
    return "?"


def describe_runtime(http: httpx.Client, model: str) -> str:
    m = next(x for x in http.get("/hearth/v1/status").json()["models"] if x["id"] == model)
    load = m.get("last_load_seconds")
    load_s = f"{load:.2f} s" if isinstance(load, (int, float)) else "?"
    return (f"{model}: llama-server pid {m.get('pid')} on port {m.get('port')}, loaded in {load_s}, "
            f"RSS {rss_mb(m.get('pid'))} (declared memory_mb {m.get('memory_mb')})")


def stream_chat(client: OpenAI, model: str, prompt: str, max_tokens: int, marks: dict, on_first=None) -> str:
    """Streams one chat completion, recording send/headers/first-token/done times in `marks`."""
    marks["send"] = now()
    stream = client.chat.completions.create(
        model=model,
        messages=[SYSTEM, {"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    marks["headers"] = now()  # create() returns once the response headers are in
    text, chunks = "", 0
    for chunk in stream:
        if not chunk.choices:
            continue
        piece = chunk.choices[0].delta.content or ""
        if piece:
            chunks += 1
            if "first" not in marks:
                marks["first"] = now()
                if on_first:
                    on_first()
            text += piece
        if chunk.choices[0].finish_reason:
            marks["finish_reason"] = chunk.choices[0].finish_reason
    marks["done"] = now()
    marks["chunks"] = chunks
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="hearth's endpoint, e.g. http://127.0.0.1:18080")
    ap.add_argument("--hearth-bin", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--pids-out", help="write the runtime pids seen in /hearth/v1/status here (JSON)")
    args = ap.parse_args()

    http = httpx.Client(base_url=args.url, timeout=10)
    client = OpenAI(base_url=f"{args.url}/v1", api_key="not-needed", max_retries=0, timeout=180)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        say(f"  {'OK  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    deadline = time.monotonic() + 20
    while True:
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            say(f"hearth did not answer GET {args.url}/health within 20 s")
            return 1
        time.sleep(0.1)

    say(f"hearth is up at {args.url} (one OpenAI-compatible endpoint).")
    status = http.get("/hearth/v1/status").json()
    pool = status["pools"][0] if status.get("pools") else {}
    say(f"Memory pool '{pool.get('name', '?')}': {pool.get('capacity_mb', '?')} MB. Configured models:")
    for m in client.models.list().data:
        extra = m.model_extra or {}
        mem = next((x.get("memory_mb") for x in status["models"] if x["id"] == m.id), "?")
        say(f"  - {m.id:8} status={extra.get('status', '?'):8} memory_mb={mem}  aliases={extra.get('aliases', [])}")
    total = sum(x.get("memory_mb") or 0 for x in status["models"])
    say(f"  together {total} MB > {pool.get('capacity_mb', '?')} MB: only one of them can be loaded at a time.")

    poller = StatusPoller(http)
    poller.start()

    # (a) cold start -----------------------------------------------------------------------------------------
    say("")
    say("(a) COLD START: the first request for 'smollm2' makes hearth start its llama-server.")
    q = "What is the capital of France?"
    marks: dict = {}
    event(f"client: POST /v1/chat/completions model=smollm2 stream=true: {q!r}")
    answer = stream_chat(client, "smollm2", q, 48, marks)
    event("client: stream finished")
    say(f"  time to first token (cold): {marks['first'] - marks['send']:.2f} s, "
        f"whole answer {marks['done'] - marks['send']:.2f} s")
    say(f"  answer: {answer.strip()!r}")
    say(f"  {describe_runtime(http, 'smollm2')}")
    warm: dict = {}
    stream_chat(client, "fast", q, 48, warm)  # "fast" is an alias of smollm2
    say(f"  same question again via the alias 'fast' (warm): first token after {warm['first'] - warm['send']:.2f} s")
    check("paris" in answer.lower(), "smollm2 answers with real weights (mentions Paris)")

    # (b) held request + swap --------------------------------------------------------------------------------
    say("")
    say("(b) HELD REQUEST + SWAP: a request for 'gen300' arrives while 'smollm2' is still streaming.")
    a: dict = {}
    b: dict = {}
    b_text: list[str] = []
    b_err: list[BaseException] = []

    def send_b() -> None:
        try:
            b_text.append(stream_chat(client, "gen300", "Say something.", 16, b))
        except BaseException as exc:  # noqa: BLE001 - reported below
            b_err.append(exc)

    tb = threading.Thread(target=send_b, daemon=True)

    def on_a_first() -> None:
        event("client: smollm2 is streaming; now POST model=gen300 (it does not fit next to smollm2)")
        tb.start()

    event("client: POST model=smollm2 stream=true max_tokens=64")
    a_text = stream_chat(client, "smollm2", "Write a short story about a lighthouse keeper.", 64, a, on_a_first)
    event(f"client: smollm2 stream finished ({a['chunks']} chunks, finish_reason={a.get('finish_reason')})")
    tb.join(120)
    if b_err or "headers" not in b:
        say(f"  gen300 request failed: {b_err[0] if b_err else 'no answer within 120 s'}")
        failures.append("gen300 answered")
    else:
        event("client: gen300 stream finished")
        say(f"  {describe_runtime(http, 'gen300')}")
    time.sleep(0.3)
    poller.stop()

    if "headers" in b:
        say("")
        say("  timeline (client events, and state changes seen by the 100 ms poll of /hearth/v1/status,")
        say("  which sees a change up to ~0.1 s after it happened):")
        lines = [
            (a["send"], "client  smollm2 request sent"),
            (a["first"], "client  smollm2 first token"),
            (b["send"], "client  gen300 request sent (held: no response headers yet)"),
            (a["done"], "client  smollm2 stream done"),
            (b["headers"], "client  gen300 response headers received"),
            (b.get("first", b["done"]), "client  gen300 first token"),
            (b["done"], "client  gen300 stream done"),
        ]
        lines += [(t, f"status  {m:8} {old} -> {new}") for t, m, old, new in poller.transitions
                  if t >= a["send"] and old != "-"]
        for t, what in sorted(lines):
            say(f"    {t:6.2f}s  {what}")
        say(f"  gen300 answered (random weights, gibberish): {(b_text[0] if b_text else '').strip()!r}")
        say("")
        check(a.get("finish_reason") is not None and a["chunks"] > 0, "smollm2's stream ran to its end (not cut by the swap)")
        check(b["headers"] >= a["done"] - 0.05,
              f"gen300 was held until smollm2's stream finished (headers {b['headers'] - b['send']:.2f} s after sending; "
              f"smollm2 done {a['done'] - b['send']:.2f} s after)")
        gone = poller.first("smollm2", {"stopping", "cold"}, after=b["send"])
        ready = poller.first("gen300", {"ready"}, after=b["send"])
        check(gone is not None and gone >= a["done"] - 0.15,
              "smollm2 was stopped only after its stream finished"
              + (f" (stopping/cold at {gone:.2f}s)" if gone is not None else " (never seen stopping/cold)"))
        check(gone is not None and ready is not None and gone <= ready,
              "smollm2 left memory before gen300 became ready"
              + (f" ({gone:.2f}s <= {ready:.2f}s)" if gone is not None and ready is not None else ""))

    # (c) hearth status ----------------------------------------------------------------------------------
    say("")
    say(f"(c) `hearth status --config {args.config}`:")
    out = subprocess.run([args.hearth_bin, "status", "--config", args.config], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).rstrip().splitlines():
        say(f"  {line}")
    if out.returncode != 0:
        failures.append(f"hearth status exited {out.returncode}")

    if args.pids_out:
        with open(args.pids_out, "w") as f:
            json.dump(sorted(poller.pids), f)
    say("")
    if failures:
        say(f"demo: {len(failures)} check(s) failed: {'; '.join(failures)}")
        return 1
    say("demo: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
