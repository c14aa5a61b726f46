"""Cold start, warm requests, aliases, /v1/models, /v1/completions, /props, load/unload."""
import time

import httpx

from conftest import LOAD_TIMEOUT, wait_until

MODEL_FIELDS = ("id", "object", "created", "owned_by", "max_model_len", "context_length", "status")


def test_models_lists_every_configured_model_cold(hearth):
    h = hearth([hearth.smol("smollm2", aliases=["fast"], context_length=2048),
                hearth.smol("other", context_length=1024)])
    r = h.http.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"smollm2", "other"}, body
    for mid, ctx in (("smollm2", 2048), ("other", 1024)):
        m = by_id[mid]
        for f in MODEL_FIELDS:
            assert f in m, f"/v1/models entry lacks {f}: {m}"
        assert m["object"] == "model"
        assert m["owned_by"] == "hearth"
        assert isinstance(m["created"], int)
        assert m["status"] == "unloaded", m
        assert m["max_model_len"] == ctx and m["context_length"] == ctx, m
    assert by_id["smollm2"].get("aliases") == ["fast"], by_id["smollm2"]
    # the real SDK reads it too
    ids = {m.id for m in h.client.models.list()}
    assert ids == {"smollm2", "other"}
    # listing never loads anything
    for m in h.status()["models"]:
        assert m["state"] == "cold" and m["starts_total"] == 0, m


def test_props_never_loads(hearth):
    h = hearth([hearth.smol("smollm2", context_length=2048, max_concurrency=3)])
    r = h.http.get("/props", params={"model": "smollm2", "autoload": "false"})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["model"] == "smollm2"
    assert p["n_ctx"] == 2048 and p["default_generation_settings"]["n_ctx"] == 2048, p
    assert p["total_slots"] == 3, p
    assert p["status"] == "unloaded", p
    r = h.http.get("/props", params={"model": "nope", "autoload": "false"})
    assert r.status_code == 404, r.text
    time.sleep(1.0)
    m = h.model("smollm2")
    assert m["state"] == "cold" and m["starts_total"] == 0 and m["pid"] is None, m


def test_cold_start_then_warm_stream_and_alias(hearth):
    h = hearth([hearth.smol("smollm2", aliases=["fast"], max_concurrency=2)])
    assert h.model("smollm2")["state"] == "cold"

    # 1. cold: the request is held while the runtime loads, then answered
    r = h.client.chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": "You are a helpful assistant."},
                                   {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0)
    text = r.choices[0].message.content
    assert text and text.strip(), r
    assert "paris" in text.lower(), f"SmolLM2 should know the capital of France: {text!r}"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.completion_tokens > 0

    m = h.model("smollm2")
    assert m["state"] == "ready", m
    assert m["starts_total"] == 1, m
    assert m["pid"] and m["port"], m
    assert m["in_flight"] == 0 and m["queue_depth"] == 0, m
    pid = m["pid"]
    st = h.status()
    assert st["pools"] and st["pools"][0]["used_mb"] >= 300, st["pools"]
    listed = {x["id"]: x for x in h.http.get("/v1/models").json()["data"]}
    assert listed["smollm2"]["status"] == "loaded", listed
    props = h.http.get("/props", params={"model": "smollm2", "autoload": "false"}).json()
    assert props["status"] == "loaded", props

    # 2. warm, streamed, through the alias: deltas arrive chunk by chunk
    stream = h.client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        max_tokens=60, temperature=0.7, stream=True, extra_body={"ignore_eos": True})
    arrivals, content, finish = [], "", None
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            if d and d.content:
                arrivals.append(time.time())
                content += d.content
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    assert content.strip(), "streamed content is empty"
    assert len(arrivals) >= 20, f"expected one delta per token, got {len(arrivals)} deltas"
    assert arrivals[-1] - arrivals[0] > 0.05, "all deltas arrived at once: the stream was buffered"
    assert finish == "length", finish

    m = h.model("smollm2")
    assert m["starts_total"] == 1 and m["pid"] == pid, f"the warm request restarted the runtime: {m}"


def test_completions_endpoint(hearth):
    h = hearth([hearth.smol("smollm2", aliases=["fast"])])
    r = h.client.completions.create(model="fast", prompt="The capital of France is", max_tokens=8,
                                    temperature=0)
    assert r.choices[0].text.strip(), r
    # streamed legacy completions too
    chunks = list(h.client.completions.create(model="smollm2", prompt="Once upon a time",
                                              max_tokens=16, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip(), chunks
    m = h.model("smollm2")
    assert m["starts_total"] == 1, m


def test_admin_load_and_unload(hearth):
    h = hearth([hearth.smol("smollm2")])
    r = h.http.post("/hearth/v1/models/smollm2/load")
    assert r.status_code == 202, r.text
    m = h.wait_model("smollm2", lambda m: m["state"] == "ready", what="ready after load")
    pid = m["pid"]
    assert pid and m["starts_total"] == 1
    r = h.http.post("/hearth/v1/models/smollm2/unload")
    assert r.status_code == 202, r.text
    h.wait_model("smollm2", lambda m: m["state"] == "cold", what="cold after unload")
    wait_until(lambda: not _alive(pid), 10, what=f"runtime pid {pid} to exit after unload")
    assert h.status()["pools"][0]["used_mb"] == 0
    # and it comes back on demand
    assert h.chat("smollm2").choices[0].message.content is not None
    assert h.model("smollm2")["starts_total"] == 2
    r = h.http.post("/hearth/v1/models/nope/load")
    assert r.status_code == 404, r.text


def _alive(pid):
    from conftest import pid_alive
    return pid_alive(pid)


def test_concurrent_cold_requests_start_once(hearth):
    """20 concurrent requests to a cold model: all succeed, one start."""
    from concurrent.futures import ThreadPoolExecutor

    h = hearth([hearth.smol("smollm2", max_concurrency=4)])

    def one(i):
        r = h.client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Count to {i % 5 + 2}."}],
            max_tokens=8, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, range(20)))
    assert len(results) == 20 and all(r is not None for r in results)
    m = h.model("smollm2")
    assert m["starts_total"] == 1, f"20 concurrent cold requests started the runtime {m['starts_total']} times"
    assert m["state"] == "ready" and m["in_flight"] == 0 and m["queue_depth"] == 0, m


def test_cli_status_and_models(hearth):
    import json
    import subprocess

    h = hearth([hearth.smol("smollm2", aliases=["fast"])], api_keys=["sk-cli"])
    out = subprocess.run([h.bin, "status", "--config", str(h.config_path), "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert [m["id"] for m in st["models"]] == ["smollm2"], st
    out = subprocess.run([h.bin, "models", "--url", h.base_url, "--json"], capture_output=True,
                         text=True, timeout=30, env={**__import__("os").environ, "HEARTH_API_KEY": "sk-cli"})
    assert out.returncode == 0, out.stderr
    assert "smollm2" in out.stdout
    # human-readable output names the model and its state
    out = subprocess.run([h.bin, "status", "--config", str(h.config_path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "smollm2" in out.stdout, (out.stdout, out.stderr)
    assert httpx.get(h.base_url + "/health").json() == {"status": "ok"}


def test_context_length_is_per_request(hearth):
    """context_length is what clients are told (max_model_len): one request may use all of it, even when
    the runtime serves max_concurrency requests at once (llama-server splits -c across its slots)."""
    h = hearth([hearth.smol("m", context_length=512, max_concurrency=4)])
    assert h.http.get("/v1/models").json()["data"][0]["max_model_len"] == 512
    r = h.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=300,
        temperature=0.7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 300, (
        f"a request within context_length=512 was cut at {r.usage.completion_tokens} completion tokens "
        f"(prompt {r.usage.prompt_tokens}): the runtime's per-slot context is smaller than advertised")


def test_metrics_after_a_request(hearth):
    h = hearth([hearth.smol("smollm2")])
    h.chat("smollm2")
    text = h.metrics()
    for name in ("hearth_requests_total", "hearth_model_state", "hearth_pool_capacity_bytes",
                 "hearth_pool_used_bytes", "hearth_runtime_starts_total", "hearth_model_memory_bytes",
                 "hearth_model_load_duration_seconds_count", "hearth_queue_wait_seconds_count"):
        assert any(l.startswith(name) for l in text.splitlines()), f"{name} missing from /metrics:\n{text}"
    starts = [l for l in text.splitlines()
              if l.startswith("hearth_runtime_starts_total") and 'model="smollm2"' in l]
    assert starts and float(starts[0].rsplit(" ", 1)[1]) == 1, starts
    ok = [l for l in text.splitlines() if l.startswith("hearth_requests_total") and 'model="smollm2"' in l
          and 'status="200"' in l]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1, [l for l in text.splitlines() if "requests_total" in l]
    ready = [l for l in text.splitlines() if l.startswith("hearth_model_state") and 'model="smollm2"' in l
             and 'state="ready"' in l]
    assert ready and float(ready[0].rsplit(" ", 1)[1]) == 1, ready


def test_keep_warm_unloads_idle_model(hearth):
    h = hearth([hearth.smol("smollm2", keep_warm="2s")])
    h.chat("smollm2")
    pid = h.model("smollm2")["pid"]
    h.wait_model("smollm2", lambda m: m["state"] == "cold", timeout=20, what="idle unload after keep_warm")
    wait_until(lambda: not _alive(pid), 10, what="the idle runtime's process to exit")
    assert h.status()["pools"][0]["used_mb"] == 0


STATUS_MODEL_KEYS = ("id", "aliases", "runtime", "state", "pid", "port", "memory_mb", "in_flight",
                     "queue_depth", "starts_total", "failures_total", "last_load_seconds", "idle_seconds",
                     "last_error", "retry_in_seconds", "log_tail")


def test_status_schema(hearth):
    h = hearth([hearth.smol("smollm2", aliases=["fast"], memory_mb=250)], host_memory_mb=600)
    st = h.status()
    for k in ("version", "uptime_seconds", "pools", "models"):
        assert k in st, f"status lacks {k}: {st}"
    assert st["pools"] == [{"name": "host", "capacity_mb": 600, "used_mb": 0}], st["pools"]
    m = st["models"][0]
    for k in STATUS_MODEL_KEYS:
        assert k in m, f"status model lacks {k}: {m}"
    assert m["aliases"] == ["fast"] and m["runtime"] == "llama-cpp" and m["memory_mb"] == 250, m
    h.chat("fast")
    m = h.model("smollm2")
    assert m["state"] == "ready" and isinstance(m["pid"], int) and isinstance(m["port"], int), m
    assert m["last_load_seconds"] and m["last_load_seconds"] > 0, m
    assert isinstance(m["log_tail"], list) and m["log_tail"], m
    assert h.status()["pools"][0]["used_mb"] == 250
