"""Two models that do not fit together: requests wait for memory, swaps happen only when idle."""
import json
import socket
import time

import httpx

from conftest import ProcSampler, StreamRecorder, assert_error, wait_until


def _two_models(hearth, **b_overrides):
    # each model counts 300 MB; the pool holds 400 MB: only one fits at a time
    return hearth([hearth.smol("a", aliases=["alpha"]), hearth.smol("b", **b_overrides)],
                  host_memory_mb=400)


def test_swap_waits_for_in_flight_stream(hearth):
    h = _two_models(hearth)
    with ProcSampler(str(h.workdir) + "/") as procs:
        a = StreamRecorder(h.client, "a", max_tokens=300).start()
        assert a.first_chunk.wait(60), f"no chunk from a: {a.error!r}"
        assert a.error is None, a.error
        assert h.model("a")["in_flight"] == 1

        b = StreamRecorder(h.client, "b", content="What is the capital of France?", max_tokens=20,
                           ignore_eos=False).start()
        # b waits for memory while a streams: queued, not started, no headers sent
        seen = wait_until(lambda: h.model("b")["queue_depth"] == 1 or b.done.is_set(), 20,
                          what="b to be queued")
        assert not b.done.is_set() or b.t_headers is None, "b was answered while a was streaming"
        assert seen is True
        mb = h.model("b")
        assert mb["state"] == "cold" and mb["starts_total"] == 0, mb
        assert not a.done.is_set(), "a finished too early for the test to be meaningful"
        assert b.t_headers is None, "hearth sent b's headers while b was waiting for memory"

        a.join()
        b.join()
    assert a.error is None, f"a's stream failed: {a.error!r}"
    assert a.finish_reason == "length", a.finish_reason
    assert a.usage is not None and a.usage.completion_tokens == 300, a.usage
    assert b.error is None, f"b failed: {b.error!r}"
    assert b.text.strip() and b.finish_reason, (b.text, b.finish_reason)
    # b's response began only after a's stream had completed
    assert b.t_headers >= a.t_end, f"b headers at {b.t_headers}, a ended at {a.t_end}"
    assert b.t_first >= a.t_end

    ma, mb = h.model("a"), h.model("b")
    assert ma["state"] == "cold" and ma["pid"] is None, ma
    assert mb["state"] == "ready" and mb["starts_total"] == 1, mb
    assert procs.max_alive <= 1, f"two runtimes were alive at once (pool holds one): {procs.max_alive}"
    st = h.status()
    assert st["pools"][0]["used_mb"] <= st["pools"][0]["capacity_mb"], st["pools"]
    ev = [l for l in h.metrics().splitlines() if l.startswith("hearth_evictions_total") and 'model="a"' in l]
    assert ev and any(float(l.rsplit(" ", 1)[1]) >= 1 for l in ev), f"no eviction of a in metrics: {ev}"

    # and back: a is loaded again, b evicted (b is idle)
    r = h.chat("alpha")
    assert r.choices[0].message.content is not None
    assert h.model("a")["starts_total"] == 2 and h.model("b")["state"] == "cold"


def _raw_request(h, model, body_extra=None):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(body_extra or {})
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{h.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
    if h.api_key:
        head += f"Authorization: Bearer {h.api_key}\r\n"
    s.sendall(head.encode() + b"\r\n" + data)
    return s


def test_client_disconnect_while_waiting_for_memory(hearth):
    h = _two_models(hearth)
    a = StreamRecorder(h.client, "a", max_tokens=1500).start()
    assert a.first_chunk.wait(60) and a.error is None, a.error

    sock = _raw_request(h, "b")
    wait_until(lambda: h.model("b")["queue_depth"] == 1, 20, what="b queued behind a")
    sock.close()  # the client goes away while its request waits
    t0 = time.time()
    wait_until(lambda: h.model("b")["queue_depth"] == 0, 3, interval=0.05,
               what="b's queue depth to drop after the client disconnected")
    assert time.time() - t0 < 3

    # a finishes (we stop reading it); b must never be started for a request nobody waits for
    a.close()
    a.join()
    wait_until(lambda: h.model("a")["in_flight"] == 0, 20, what="a's in_flight to drop after its client left")
    time.sleep(3)
    mb = h.model("b")
    assert mb["starts_total"] == 0 and mb["state"] == "cold", f"b was started for a cancelled request: {mb}"
    assert h.model("a")["state"] == "ready"


def test_queue_timeout_while_waiting_for_memory(hearth):
    h = _two_models(hearth, queue={"max": 4, "timeout": "2s"})
    a = StreamRecorder(h.client, "a", max_tokens=1500).start()
    assert a.first_chunk.wait(60) and a.error is None, a.error
    t0 = time.time()
    r = h.http.post("/v1/chat/completions", timeout=30,
                    json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    waited = time.time() - t0
    assert not a.done.is_set(), "a ended before b's deadline; test not meaningful"
    assert_error(r, 503, "queue_timeout")
    assert waited >= 1.5, f"queue_timeout after {waited:.2f}s, before the 2s deadline"
    mb = h.model("b")
    assert mb["queue_depth"] == 0 and mb["starts_total"] == 0, mb
    a.close()
    a.join()


def test_min_residency_delays_a_swap(hearth):
    """A freshly loaded model is not swapped out for another before min_residency has passed."""
    h = hearth([hearth.smol("a", min_residency="4s"), hearth.smol("b")], host_memory_mb=400)
    h.chat("a")
    ready_at = time.time()  # a became ready no later than this
    a_ready_by_status = h.model("a")
    assert a_ready_by_status["state"] == "ready", a_ready_by_status
    r = h.chat("b", "What is the capital of France?", max_tokens=10)
    assert r.choices[0].message.content is not None
    assert h.model("a")["state"] == "cold" and h.model("b")["state"] == "ready"
    # a's process was ready at most ~0.x s before ready_at; b could only start once a had been
    # resident 4 s, so b's answer cannot come before ready_at + 4 s - (a's request duration)
    assert time.time() - ready_at >= 3.0, "b was served before a's min_residency (4s) had passed"
