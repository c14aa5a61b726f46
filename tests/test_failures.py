"""Runtime failures: killed mid-stream, failing to start, never ready, ignoring SIGTERM, dropping requests;
and hearth's own SIGTERM with work in flight."""
import json
import os
import shutil
import signal
import time

import httpx
import pytest

from conftest import (StreamRecorder, assert_error, pid_alive, pids_matching, proc_cmdline,
                      wait_until)


def _kill_runtime_of(h, model_id):
    pid = h.model(model_id)["pid"]
    assert pid, h.model(model_id)
    assert "llama-server" in proc_cmdline(pid), proc_cmdline(pid)
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_noticed(h, model_id, pid):
    return h.wait_model(model_id, lambda m: m["pid"] != pid or m["state"] != "ready", timeout=10,
                        what=f"hearth to notice that runtime pid {pid} died")


def test_runtime_killed_mid_stream_sdk(hearth):
    h = hearth([hearth.smol("a")])
    s = StreamRecorder(h.client, "a", max_tokens=1500).start()
    assert s.first_chunk.wait(60) and s.error is None, s.error
    pid = _kill_runtime_of(h, "a")
    s.join(60)
    assert s.error is not None or s.finish_reason is None, \
        "the client saw a complete stream although the runtime was killed mid-stream"
    assert s.chunks < 1500
    _wait_noticed(h, "a", pid)
    m = h.model("a")
    assert m["failures_total"] >= 1, f"a crash of the runtime should count as a failure: {m}"

    r = h.chat("a", "What is the capital of France?", max_tokens=20)
    assert r.choices[0].message.content, r
    m = h.model("a")
    assert m["state"] == "ready" and m["starts_total"] == 2 and m["pid"] != pid, m


def test_runtime_killed_mid_stream_error_event(hearth):
    """Contract: an SSE event data: {"error":{...,"code":"upstream_error"}}, then the stream ends without [DONE]."""
    h = hearth([hearth.smol("a")])
    h.chat("a")  # load it
    lines, aborted = [], False
    body = {"model": "a", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500, "stream": True, "ignore_eos": True}
    pid = None
    with h.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        raw = b""
        try:
            for chunk in r.iter_raw():  # raw bytes: nothing buffered is lost when the body aborts
                raw += chunk
                if pid is None and raw.count(b"data:") >= 5:
                    pid = _kill_runtime_of(h, "a")
        except (httpx.RemoteProtocolError, httpx.ReadError):
            aborted = True
        lines = raw.decode(errors="replace").splitlines()
    assert pid is not None, f"too few lines before the stream ended: {lines}"
    errors = []
    for line in lines:
        if line.startswith("data:") and '"error"' in line:
            errors.append(json.loads(line[5:]))
    facts = (f"error events: {errors}; [DONE] sent: {'data: [DONE]' in lines}; body aborted: {aborted}; "
             f"last lines: {lines[-4:]}")
    assert errors and errors[-1]["error"]["code"] == "upstream_error", \
        "expected an SSE error event with code upstream_error after the runtime died; " + facts
    assert "data: [DONE]" not in lines, "a stream whose runtime died must not end with [DONE]; " + facts
    _wait_noticed(h, "a", pid)
    assert h.chat("a").choices[0].message.content is not None
    assert h.model("a")["starts_total"] == 2


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_start_failure_then_recovery(hearth, broken):
    path = hearth.tmp_path / "late" / "late-model.gguf"
    path.parent.mkdir()
    if broken == "corrupt":
        path.write_bytes(b"this is not a gguf file\n" * 100)
    h = hearth([hearth.smol("late", model_path=str(path), start_timeout="30s")])

    r = h.http.post("/v1/chat/completions", timeout=60, json={
        "model": "late", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    err = assert_error(r, 503, "model_start_failed")
    msg = err["message"]
    assert "late" in msg, f"the message should name the model: {msg!r}"
    hints = ["late-model.gguf", "failed to load", "No such file", "invalid magic", "failed to read"]
    assert any(x.lower() in msg.lower() for x in hints), \
        f"the message should carry llama-server's last log lines: {msg!r}"

    m = h.model("late")
    assert m["state"] == "failed", m
    assert m["last_error"], m
    assert m["failures_total"] >= 1 and m["pid"] is None, m
    assert m["log_tail"], m
    models = {x["id"]: x for x in h.http.get("/v1/models").json()["data"]}
    assert models["late"]["status"] == "failed", models

    # fix the file without restarting hearth: the next request succeeds (after a short backoff)
    path.unlink(missing_ok=True)
    shutil.copyfile(hearth.smol_path, path)
    r = _request_honouring_retry_after(h, "late", deadline_s=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    m = h.model("late")
    assert m["state"] == "ready" and m["starts_total"] >= 2, m


def _request_honouring_retry_after(h, model, deadline_s):
    """Like OpenClaw: retry a 503 after Retry-After seconds, until the deadline."""
    end = time.time() + deadline_s
    while True:
        r = h.http.post("/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
        if r.status_code != 503 or time.time() > end:
            return r
        ra = r.headers.get("retry-after", "1")
        time.sleep(min(max(float(ra) if ra.strip().isdigit() else 1.0, 0.2), 5.0))


def test_start_timeout_never_ready_runtime(hearth):
    h = hearth([hearth.fake("stuck", "never-ready", start_timeout="3s", stop_timeout="2s")])
    t0 = time.time()
    r = h.http.post("/v1/chat/completions", timeout=30, json={
        "model": "stuck", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    waited = time.time() - t0
    err = assert_error(r, 503, "model_start_failed")
    assert waited >= 2.5, f"start failed after {waited:.1f}s, before start_timeout (3s)"
    assert "stuck" in err["message"], err
    assert "FAULT-INJECTION-MARKER" in err["message"], \
        f"the message should include the runtime's last log lines: {err['message']!r}"
    m = h.model("stuck")
    assert m["state"] == "failed" and m["last_error"] and m["failures_total"] >= 1, m
    # the process that never became ready is stopped, not left behind
    wait_until(lambda: not [p for p in h.runtime_pids()
                            if "fault_injection" in proc_cmdline(p)], 15,
               what="the never-ready runtime to be killed")


def test_stop_kills_process_group_after_stop_timeout(hearth):
    h = hearth([hearth.fake("stubborn", "ignore-sigterm", stop_timeout="1s")])
    r = h.http.post("/v1/chat/completions", timeout=60, json={
        "model": "stubborn", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    pid = h.model("stubborn")["pid"]
    tagged = h.runtime_pids  # the fake and its grandchild
    wait_until(lambda: len(tagged()) >= 2, 10, what="the fake and its grandchild to run")
    assert pid in tagged()

    r = h.http.post("/hearth/v1/models/stubborn/unload")
    assert r.status_code == 202, r.text
    h.wait_model("stubborn", lambda m: m["state"] == "cold", timeout=20, what="cold after unload")
    wait_until(lambda: not tagged(), 10,
               what="the SIGTERM-ignoring runtime and its grandchild to be SIGKILLed")

    # and on hearth's own shutdown
    r = h.http.post("/v1/chat/completions", timeout=60, json={
        "model": "stubborn", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    wait_until(lambda: len(tagged()) >= 2, 10, what="the fake and its grandchild to run again")
    rc = h.terminate(timeout=30)
    assert rc == 0, f"hearth exited {rc}"
    wait_until(lambda: not tagged(), 10, what="no process of the stubborn runtime after hearth exits")


def test_upstream_drops_connection_gives_502(hearth):
    h = hearth([hearth.fake("dropper", "drop-requests")])
    r = h.http.post("/v1/chat/completions", timeout=60, json={
        "model": "dropper", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert_error(r, 502, "upstream_error")
    # hearth itself is fine
    assert h.http.get("/health").status_code == 200


def test_sigterm_with_request_in_flight(hearth):
    h = hearth([hearth.smol("a", stop_timeout="5s")])
    s = StreamRecorder(h.client, "a", max_tokens=1500).start()
    assert s.first_chunk.wait(60) and s.error is None, s.error
    pid = h.model("a")["pid"]
    rc = h.terminate(timeout=40)
    assert rc == 0, f"hearth exited {rc} on SIGTERM"
    s.join(30)  # hearth may cut the stream or let it finish first: both are fine
    wait_until(lambda: not pid_alive(pid), 10, what=f"llama-server {pid} to be gone after hearth exited")
    assert not [p for p in h.runtime_pids() if "llama-server" in proc_cmdline(p)]
