#!/usr/bin/env python3
"""Check that a real llama-server loads a GGUF and answers it; report load time and memory.

    python models/check_gguf.py --llama-server .hearth-dev/bin/llama-server M1.gguf [M2.gguf ...]

For each model: start `llama-server -m M --host 127.0.0.1 --port P -c 2048 -t 2`, poll /health until 200,
POST /v1/chat/completions non-streaming and streaming (both must answer 200 with content), read the
server's RSS (VmRSS and VmHWM from /proc), stop it with SIGTERM. Exits 1 if any model fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def check(server: str, model: str, timeout: float) -> dict:
    port = free_port()
    log = tempfile.TemporaryFile()
    argv = [server, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-t", "2"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"model": os.path.basename(model), "size_mb": os.path.getsize(model) / 1e6}
    try:
        with httpx.Client(timeout=60) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode} while loading")
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"not healthy within {timeout}s")
                try:
                    if c.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            result["ready_s"] = round(time.monotonic() - t0, 2)
            body = {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                "max_tokens": 24,
                "temperature": 0,
            }
            r = c.post(f"{base}/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"non-stream chat: HTTP {r.status_code}: {r.text[:300]}")
            result["answer"] = r.json()["choices"][0]["message"]["content"]
            chunks, text = 0, ""
            with c.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as s:
                if s.status_code != 200:
                    raise RuntimeError(f"stream chat: HTTP {s.status_code}: {s.read()[:300]!r}")
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"][0].get("delta", {})
                        text += delta.get("content") or ""
                        chunks += 1
            if chunks == 0:
                raise RuntimeError("stream chat: no chunks")
            result["stream_chunks"] = chunks
            result["rss_mb"], result["hwm_mb"] = (round(v, 1) for v in rss_mb(proc.pid))
            result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - report and go on to the next model
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-15:]
        result.update(ok=False, error=str(exc), log_tail=tail)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    failed = 0
    for m in args.models:
        r = check(args.llama_server, m, args.timeout)
        if r["ok"]:
            print(
                f"ok   {r['model']}: {r['size_mb']:.1f} MB, ready in {r['ready_s']} s, RSS {r['rss_mb']} MB "
                f"(peak {r['hwm_mb']} MB), stream {r['stream_chunks']} chunks, answer {r['answer']!r}"
            )
        else:
            failed += 1
            print(f"FAIL {r['model']}: {r['error']}")
            for line in r["log_tail"]:
                print(f"     | {line}")
    print(f"{len(args.models) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
