"""A request shaped like OpenClaw's (see shared/notes/openclaw.md): always streamed, usage requested,
max_completion_tokens, session-affinity headers, Bearer key, tools, a system prompt."""
import json
import time

import httpx

KEY = "sk-openclaw"

TOOLS = [{"type": "function", "function": {
    "name": name, "description": desc,
    "parameters": {"type": "object", "properties": {"arg": {"type": "string", "description": "argument"}},
                   "required": ["arg"]}}}
    for name, desc in (("read", "Read a file."), ("write", "Write a file."), ("exec", "Run a command."))]


def _body(model):
    return {
        "model": model,
        "messages": [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                     {"role": "user", "content": "Say hello."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 16,
        "tools": TOOLS,
        "temperature": 0.2,
    }


def _headers(session="sess-1234"):
    return {"Authorization": f"Bearer {KEY}", "session_id": session, "x-session-affinity": session,
            "x-client-request-id": f"{session}:0", "Accept": "text/event-stream"}


def test_openclaw_shaped_stream_sdk_and_raw(hearth):
    h = hearth([hearth.smol("qwen-local", context_length=4096)], api_keys=[KEY])
    body = _body("qwen-local")

    # with the real SDK (OpenClaw uses the openai JS SDK; same wire format)
    stream = h.client.chat.completions.create(
        **{k: v for k, v in body.items() if k not in ("model", "stream")}, model="qwen-local", stream=True,
        extra_headers={k: v for k, v in _headers().items() if k.lower() != "authorization"})
    chunks = list(stream)
    assert chunks, "no chunks"
    assert chunks[-1].usage is not None, f"usage should be in the last chunk: {chunks[-1]}"
    assert chunks[-1].usage.completion_tokens <= 16
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    # raw: status 200, SSE content type, data lines, usage in the last data chunk, then [DONE]
    with httpx.stream("POST", h.base_url + "/v1/chat/completions", json=body, headers=_headers(),
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        events = [l[len("data:"):].strip() for l in r.iter_lines() if l.startswith("data:")]
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last.get("usage") and last["usage"]["completion_tokens"] <= 16, last
    # several turns of one session: no restart
    for _ in range(2):
        with httpx.stream("POST", h.base_url + "/v1/chat/completions", json=body, headers=_headers(),
                          timeout=120) as r:
            assert r.status_code == 200
            r.read()
    m = h.model("qwen-local")
    assert m["starts_total"] == 1 and m["in_flight"] == 0, m
    # discovery the way OpenClaw does it without a provider block
    models = h.http.get("/v1/models").json()["data"]
    assert models[0]["max_model_len"] == 4096 and models[0]["context_length"] == 4096
    props = httpx.get(h.base_url + "/props", params={"model": "qwen-local", "autoload": "false"},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert props.status_code == 200 and props.json()["n_ctx"] == 4096, props.text
