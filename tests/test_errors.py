"""Every error of the contract, with the shape {"error":{"message","type","code"}}; API keys; body limits."""
import json

import httpx
import openai
import pytest

from conftest import assert_error

KEY = "sk-test-key"
MAX_BODY = 200_000


@pytest.fixture
def h(hearth):
    return hearth([hearth.smol("smollm2", aliases=["fast"])], api_keys=[KEY, "sk-second"],
                  max_body_bytes=MAX_BODY)


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_keys(h):
    url = h.base_url
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                         ("/v1/completions", "POST"), ("/hearth/v1/status", "GET"),
                         ("/hearth/v1/models/smollm2/load", "POST")):
        for headers in ({}, _auth("sk-wrong"), {"Authorization": "sk-test-key"},
                        {"Authorization": "Basic c2stdGVzdC1rZXk6"}):
            r = httpx.request(method, url + path, headers=headers,
                              json=body if method == "POST" else None, timeout=30)
            assert_error(r, 401, "invalid_api_key")
    # nothing was started by unauthenticated requests
    assert h.model("smollm2")["starts_total"] == 0
    # /health stays open (it is not under /v1 or /hearth/v1)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    # the SDK with a wrong key gets AuthenticationError
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.models.list()
    assert ei.value.code == "invalid_api_key"
    # good keys work (both of them)
    assert h.chat("smollm2").choices[0].message.content is not None
    r = httpx.post(url + "/v1/chat/completions", headers=_auth("sk-second"), json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_unknown_model(h):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        r = h.http.post(path, json={"model": "no-such-model", "messages": [], "prompt": "x", "input": "x"})
        err = assert_error(r, 404, "model_not_found")
        assert "no-such-model" in err["message"], err
    with pytest.raises(openai.NotFoundError) as ei:
        h.chat("no-such-model")
    assert ei.value.code == "model_not_found"
    assert h.model("smollm2")["starts_total"] == 0


def test_bad_json_and_missing_model(h):
    r = h.http.post("/v1/chat/completions", content=b'{"model": "smollm2", "messages": [',
                    headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")
    r = h.http.post("/v1/chat/completions", content=b"\xff\xfe not json at all",
                    headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")
    for body in ({"messages": [{"role": "user", "content": "hi"}]}, {"model": 5, "messages": []},
                 {"model": None}, [1, 2, 3]):
        r = h.http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"})
        assert_error(r, 400, "missing_model")
    assert h.model("smollm2")["starts_total"] == 0


def test_body_too_large(h):
    big = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
           "metadata": {"pad": "x" * 300_000}}
    data = json.dumps(big).encode()
    r = h.http.post("/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")

    # the same without Content-Length (chunked upload)
    def gen():
        for i in range(0, len(data), 16384):
            yield data[i:i + 16384]
    # hearth stops reading at the limit and answers 413; closing a socket with unread input makes the
    # kernel send RST, which (about 1 run in 12 here) destroys the 413 before the client reads it.
    # Accept that race, but never a 2xx or another status.
    try:
        r = h.http.post("/v1/chat/completions", content=gen(),
                        headers={"Content-Type": "application/json"})
        assert_error(r, 413, "request_too_large")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        pass
    assert h.model("smollm2")["starts_total"] == 0
    assert h.http.get("/health").status_code == 200


def test_large_valid_body_accepted(h):
    """OpenClaw sends ~41 KB bodies and more; 150 KB under a 200 KB limit passes through to llama-server.
    The padding is in fields llama-server ignores, so the prompt (and CPU time) stays small."""
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i}.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}} for i in range(3)]
    body = {"model": "fast", "messages": [{"role": "system", "content": "You are terse."},
                                          {"role": "user", "content": "Say hello."}],
            "max_tokens": 8, "tools": tools, "metadata": {"pad": "p" * 150_000},
            "user": "u" * 100}
    data = json.dumps(body).encode()
    assert 150_000 < len(data) < MAX_BODY
    r = h.http.post("/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:1000]
    assert r.json()["choices"][0]["message"] is not None
