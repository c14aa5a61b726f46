"""vLLM runtime: the REAL hearth daemon with the vLLM PROTOCOL DOUBLE (tests/fakes/vllm_protocol_double.py)
as its `vllm` program. vLLM itself cannot run here (no GPU, no CUDA wheel); the double mirrors
`vllm serve`'s argv, its late listen, /health, /v1/models, the OpenAI endpoints and the sleep-mode dev
endpoints (/sleep, /wake_up, /is_sleeping), and records what hearth did to it as JSON lines. GPUs are
declared in the configuration (`[[resources.gpus]]`), as on a machine without NVML.

What is checked: the argv and environment hearth gives vLLM (utilization, sleep flag, dev mode,
CUDA_VISIBLE_DEVICES, tensor parallelism); requests held while the engine loads; sleep on idleness and
wake on demand in the same process; sleeping a model to make room on the GPU; a sleeper that does not
fit in host RAM is stopped instead; a failed wake-up (error, crash, or a wake that does not wake) is
turned into a stop and a cold start; level 2; keep_asleep; the admin sleep endpoint; GPU accounting in
status and metrics; configuration errors. In every test hearth must never send an inference request to
a sleeping engine, nor put an engine with requests in flight to sleep (the double records both).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (FAKES_DIR, REQUEST_TIMEOUT, Hearth, free_port, free_port_range, pid_alive,
                      render_config, wait_until)

DOUBLE = FAKES_DIR / "vllm_protocol_double.py"
MiB = 1024 * 1024
GPU_MB = 80000


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def double_program(factory) -> str:
    """A copy of the double in this test's directory (named `vllm`), so that the runtime's command line
    names the test's directory (conftest finds leaked runtimes by it) and the runtime user can run it."""
    d = factory.tmp_path / "bin"
    d.mkdir(mode=0o755, exist_ok=True)
    p = d / "vllm"
    if not p.exists():
        shutil.copyfile(DOUBLE, p)
        os.chmod(p, 0o755)
    return str(p)


class DoubleLog:
    """The JSON lines one model's double appended (over all its runs)."""

    def __init__(self, path: Path):
        self.path = path

    def events(self, kind: str | None = None, **match) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            if not line.strip():
                continue
            e = json.loads(line)
            if kind is not None and e["event"] != kind:
                continue
            if all(e.get(k) == v for k, v in match.items()):
                out.append(e)
        return out

    def assert_clean(self):
        """hearth never sent an inference request to a sleeping engine, never put an engine with requests
        in flight to sleep, and never sent a sleep request the server refused or could not have served."""
        asleep = self.events("request", asleep=True)
        assert not asleep, f"hearth sent inference requests to a sleeping vLLM: {asleep}"
        busy = [e for e in self.events("sleep") if e.get("in_flight")]
        assert not busy, f"hearth put a vLLM with requests in flight to sleep: {busy}"
        refused = self.events("sleep", outcome="refused") + self.events("dev_endpoint_refused")
        assert not refused, f"hearth sent sleep requests the server refused: {refused}"

    def __repr__(self):
        try:
            return f"<{self.path}:\n{self.path.read_text()}>"
        except OSError:
            return f"<{self.path}: missing>"


def double_log(factory, name: str) -> DoubleLog:
    """A log file (and the wake-failure state file next to it) the unprivileged runtime user can write."""
    d = factory.tmp_path / "vllm-double"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    p = d / f"{name}.jsonl"
    for f in (p, Path(str(p) + ".wake-failures")):
        f.touch()
        os.chmod(f, 0o666)
    return DoubleLog(p)


def vllm_model(model_id: str, log: DoubleLog, env_extra: dict | None = None, **overrides) -> dict:
    env = {"HEARTH_VLLM_DOUBLE_LOG": str(log.path), "HEARTH_VLLM_DOUBLE_LOAD_SECONDS": "0.3"}
    env.update(env_extra or {})
    m = {
        "id": model_id,
        "runtime": "vllm",
        "model_path": f"org/{model_id}-model",  # a hub name: not a file for vllm
        "memory_mb": 500,
        "vram_mb": 40000,
        "gpus": [0],
        "context_length": 4096,
        "max_concurrency": 4,
        "keep_warm": "5m",
        "min_residency": "0s",
        "start_timeout": "60s",
        "stop_timeout": "5s",
        "env": env,
    }
    m.update(overrides)
    return {k: v for k, v in m.items() if v is not None}


def start_hearth(factory, models: list[dict], *, host_memory_mb: int = 4096,
                 gpus: list[dict] | None = None, gpu_reserve_mb: int = 0) -> Hearth:
    """Like the `hearth` factory, with `[[resources.gpus]]`, `gpu_reserve_mb` and `[runtimes] vllm`."""
    port = free_port()
    lo, hi = free_port_range(20)
    server = {"listen": f"127.0.0.1:{port}", "runtime_ports": f"{lo}-{hi}"}
    resources = {"host_memory_mb": host_memory_mb, "gpu_reserve_mb": gpu_reserve_mb,
                 "gpus": gpus if gpus is not None else [{"index": 0, "memory_mb": GPU_MB}]}
    runtimes = {"llama_server": factory.env["llama_server"], "vllm": double_program(factory)}
    n = len(factory.instances)
    path = factory.tmp_path / f"hearth{n}.toml"
    path.write_text(render_config(server, resources, runtimes, models))
    h = Hearth(bin_path=factory.env["hearth_bin"], config_path=path,
               log_path=factory.tmp_path / f"hearth{n}.log", port=port, api_key=None,
               workdir=factory.tmp_path, model_ids=[m["id"] for m in models])
    factory.instances.append(h)
    return h.start()


_SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels) -> float | None:
    """The value of the sample `name{labels}` (a label given as a tuple matches any of its values);
    None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        ok = True
        for k, v in labels.items():
            want = v if isinstance(v, tuple) else (v,)
            if have.get(k) not in want:
                ok = False
        if ok:
            return float(m.group(3))
    return None


def gpu_entry(st: dict, index: int) -> dict:
    for g in st.get("gpus") or []:
        if g.get("index") == index:
            return g
    raise AssertionError(f"GPU {index} not in status gpus: {st.get('gpus')!r}")


def host_pool(st: dict) -> dict:
    for p in st["pools"]:
        if p["name"] == "host":
            return p
    raise AssertionError(f"no host pool in {st['pools']}")


def answer_of(r) -> str:
    return r.choices[0].message.content or ""


def wait_tier(h: Hearth, model_id: str, tier: str, timeout: float = 30.0) -> dict:
    return h.wait_model(model_id, lambda m: m.get("tier") == tier, timeout=timeout,
                        what=f"{model_id} to be {tier}")


def split_utilization(argv: list[str]) -> tuple[list[str], str]:
    i = argv.index("--gpu-memory-utilization")
    return argv[:i + 1] + ["<U>"] + argv[i + 2:], argv[i + 1]


LEVEL1 = ("1", "level1")
LEVEL2 = ("2", "level2")


# --------------------------------------------------------------------------------------------
# argv, environment, readiness
# --------------------------------------------------------------------------------------------

def test_argv_env_and_requests_held_while_loading(hearth):
    log = double_log(hearth, "big")
    h = start_hearth(hearth, [vllm_model("big", log, sleep="level1", sleep_memory_mb=1500,
                                         env_extra={"HEARTH_VLLM_DOUBLE_LOAD_SECONDS": "2"})])
    results, errors = {}, []

    def non_stream():
        try:
            results["plain"] = answer_of(h.chat("big", "held plain question", max_tokens=16))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def stream():
        try:
            s = h.client.chat.completions.create(
                model="big", messages=[{"role": "user", "content": "held streamed question"}],
                max_tokens=16, stream=True)
            results["stream"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t_sent = time.time()
    threads = [threading.Thread(target=f) for f in (non_stream, stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT)
    assert not errors, f"a request sent while vLLM loaded failed: {errors!r}"
    assert "held plain question" in results.get("plain", ""), results
    assert "held streamed question" in results.get("stream", ""), results

    starts = log.events("start")
    assert len(starts) == 1, f"one start for two concurrent cold requests: {log!r}"
    listening = log.events("listening")
    assert listening and listening[0]["t"] - t_sent >= 1.5, \
        f"the double listened {listening[0]['t'] - t_sent:.2f}s after the requests: not held while loading?"
    reqs = log.events("request")
    assert len(reqs) == 2 and all(r["t"] >= listening[0]["t"] and r["status"] == 200 for r in reqs), reqs

    m = h.model("big")
    assert m["state"] == "ready" and m["starts_total"] == 1, m
    assert m["pid"] == starts[0]["pid"], (m["pid"], starts)
    expected = ["serve", "org/big-model", "--host", "127.0.0.1", "--port", str(m["port"]),
                "--served-model-name", "big", "--max-model-len", "4096", "--max-num-seqs", "4",
                "--gpu-memory-utilization", "<U>", "--enable-sleep-mode"]
    argv, util = split_utilization(starts[0]["argv"])
    assert argv == expected, f"vllm argv:\n  got      {starts[0]['argv']}\n  expected {expected}"
    assert re.fullmatch(r"0\.50?", util), f"--gpu-memory-utilization 40000/80000 should be 0.5, got {util!r}"
    env = starts[0]["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0", env
    assert env["VLLM_SERVER_DEV_MODE"] == "1", env
    log.assert_clean()


def test_tensor_parallel_any_placement_and_gpu_accounting(hearth):
    """Two declared GPUs with a reserve: a model on [0, 1] gets --tensor-parallel-size 2 and both
    devices; a model with gpus = "any" lands on one GPU with room; status and metrics account VRAM per
    GPU against the budget (memory - gpu_reserve_mb)."""
    lw, la = double_log(hearth, "wide"), double_log(hearth, "anyg")
    gpus = [{"index": 0, "memory_mb": GPU_MB}, {"index": 1, "memory_mb": GPU_MB}]
    h = start_hearth(hearth, [vllm_model("wide", lw, vram_mb=30000, gpus=[0, 1]),
                              vllm_model("anyg", la, vram_mb=40000, gpus="any")],
                     gpus=gpus, gpu_reserve_mb=1000, host_memory_mb=4096)
    st = h.status()
    for i in (0, 1):
        g = gpu_entry(st, i)
        assert g["memory_total_bytes"] == GPU_MB * MiB, g
        assert g["budget_bytes"] == (GPU_MB - 1000) * MiB, g
        assert g["used_bytes"] == 0, g
        assert g["source"] == "config", g

    assert "wide" in answer_of(h.chat("wide", "wide question"))
    start = lw.events("start")[0]
    argv = start["argv"]
    i = argv.index("--tensor-parallel-size") if "--tensor-parallel-size" in argv else -1
    assert i >= 0 and argv[i + 1] == "2", f"2 GPUs should give --tensor-parallel-size 2: {argv}"
    rest, util = split_utilization(argv[:i] + argv[i + 2:])
    m = h.model("wide")
    assert rest == ["serve", "org/wide-model", "--host", "127.0.0.1", "--port", str(m["port"]),
                    "--served-model-name", "wide", "--max-model-len", "4096", "--max-num-seqs", "4",
                    "--gpu-memory-utilization", "<U>"], argv
    assert util == "0.37", f"30000/80000 = 0.375 rounded down to 2 decimals is 0.37, got {util!r}"
    assert "--enable-sleep-mode" not in argv, argv
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == "0,1", start["env"]
    assert start["env"]["VLLM_SERVER_DEV_MODE"] is None, "sleep is off: no dev endpoints"
    assert sorted(m["gpus"]) == [0, 1] and m["vram_bytes"] == 30000 * MiB, m

    assert "anyg" in answer_of(h.chat("anyg", "anyg question"))
    sa = la.events("start")[0]
    ma = h.model("anyg")
    assert len(ma["gpus"]) == 1 and ma["gpus"][0] in (0, 1), ma
    placed = ma["gpus"][0]
    assert sa["env"]["CUDA_VISIBLE_DEVICES"] == str(placed), (sa["env"], ma)
    assert "--tensor-parallel-size" not in sa["argv"], sa["argv"]
    assert ma["vram_bytes"] == 40000 * MiB, ma

    st = h.status()
    for i in (0, 1):
        want = (30000 + (40000 if i == placed else 0)) * MiB
        assert gpu_entry(st, i)["used_bytes"] == want, (i, st["gpus"])
    text = h.metrics()
    for i in (0, 1):
        want = (30000 + (40000 if i == placed else 0)) * MiB
        assert metric(text, "hearth_gpu_memory_budget_bytes", gpu=str(i)) == (GPU_MB - 1000) * MiB, text
        assert metric(text, "hearth_gpu_memory_used_bytes", gpu=str(i)) == want, text

    r = h.http.post("/hearth/v1/models/wide/unload")
    assert r.status_code == 202, r.text
    m = h.wait_model("wide", lambda m: m["state"] == "cold", timeout=30, what="wide cold after unload")
    assert m["gpus"] == [] and m["vram_bytes"] == 0 and m["tier"] == "cold", m
    st = h.status()
    other = 1 - placed
    assert gpu_entry(st, other)["used_bytes"] == 0, st["gpus"]
    assert gpu_entry(st, placed)["used_bytes"] == 40000 * MiB, st["gpus"]
    lw.assert_clean()
    la.assert_clean()


# --------------------------------------------------------------------------------------------
# sleep and wake
# --------------------------------------------------------------------------------------------

def test_idle_sleep_then_wake_in_the_same_process(hearth):
    log = double_log(hearth, "big")
    # level 1 without sleep_memory_mb: the weights move to host RAM (memory_mb + vram_mb = 40500)
    h = start_hearth(hearth, [vllm_model("big", log, sleep="level1", keep_warm="2s")],
                     host_memory_mb=65536)
    assert "first question" in answer_of(h.chat("big", "first question"))
    m = h.model("big")
    pid = m["pid"]
    assert m["tier"] == "hot" and m["gpus"] == [0] and m["vram_bytes"] == 40000 * MiB, m

    m = wait_tier(h, "big", "sleeping")
    assert m["state"] == "sleeping", m
    assert m["pid"] == pid and pid_alive(pid), f"sleep must keep the process: {m}"
    assert m["memory_accounted_mb"] == 40500, f"level 1 default sleep_memory_mb = 500 + 40000: {m}"
    assert m["vram_bytes"] == 512 * MiB, f"default sleep_vram_mb = 512: {m}"
    st = h.status()
    assert host_pool(st)["used_mb"] == 40500, st["pools"]
    assert gpu_entry(st, 0)["used_bytes"] == 512 * MiB, st["gpus"]
    sleeps = log.events("sleep")
    assert [(s["level"], s["outcome"], s["in_flight"]) for s in sleeps] == [(1, "ok", 0)], log
    assert not log.events("wake"), log

    assert "second question" in answer_of(h.chat("big", "second question"))
    events = log.events()
    wake_i = [i for i, e in enumerate(events) if e["event"] == "wake" and e["outcome"] == "ok"]
    req_i = [i for i, e in enumerate(events) if e["event"] == "request"]
    assert len(wake_i) == 1 and req_i and wake_i[0] < req_i[-1], \
        f"expected a wake_up before the second request: {log!r}"
    m = h.model("big")  # keep_warm is 2 s: read before it sleeps again
    text = h.metrics()
    assert m["tier"] == "hot" and m["state"] == "ready", m
    assert m["pid"] == pid and m["starts_total"] == 1, f"a wake is not a cold start: {m}"
    assert len(log.events("start")) == 1, log
    assert metric(text, "hearth_model_sleeps_total", model="big", level=LEVEL1) == 1, text
    assert metric(text, "hearth_model_wakes_total", model="big", outcome="ok") == 1, text
    assert not metric(text, "hearth_model_wakes_total", model="big", outcome="failed"), text
    log.assert_clean()


def test_level2_sleep_accounts_memory_mb(hearth):
    log = double_log(hearth, "big")
    h = start_hearth(hearth, [vllm_model("big", log, sleep="level2", keep_warm="2s")])
    h.chat("big", "before sleeping")
    pid = h.model("big")["pid"]
    m = wait_tier(h, "big", "sleeping")
    assert m["pid"] == pid and pid_alive(pid), m
    assert m["memory_accounted_mb"] == 500, f"level 2 default sleep_memory_mb = memory_mb: {m}"
    assert m["vram_bytes"] == 512 * MiB, m
    assert host_pool(h.status())["used_mb"] == 500
    assert [s["level"] for s in log.events("sleep")] == [2], log

    assert "after waking" in answer_of(h.chat("big", "after waking"))
    m = h.model("big")
    assert m["pid"] == pid and m["starts_total"] == 1, m
    assert [w["outcome"] for w in log.events("wake")] == ["ok"], log
    assert metric(h.metrics(), "hearth_model_sleeps_total", model="big", level=LEVEL2) == 1
    log.assert_clean()


def test_sleep_to_make_room_on_the_gpu(hearth):
    """A and B (50000 MB of VRAM each) cannot both be hot on one 80000 MB GPU: a request to B puts idle A
    to sleep (its weights in host RAM, the process kept) and starts B; a request to A then puts B to sleep
    and wakes A."""
    la, lb = double_log(hearth, "a"), double_log(hearth, "b")
    common = dict(sleep="level1", vram_mb=50000, sleep_memory_mb=1500, sleep_vram_mb=0)
    h = start_hearth(hearth, [vllm_model("a", la, **common), vllm_model("b", lb, **common)],
                     host_memory_mb=8000)
    assert "to a" in answer_of(h.chat("a", "to a"))
    pa = h.model("a")["pid"]

    assert "to b" in answer_of(h.chat("b", "to b"))
    ma, mb = h.model("a"), h.model("b")
    assert ma["state"] == "sleeping" and ma["tier"] == "sleeping", f"A should sleep, not stop: {ma}"
    assert ma["pid"] == pa and pid_alive(pa), ma
    assert ma["vram_bytes"] == 0 and ma["memory_accounted_mb"] == 1500, ma
    assert mb["state"] == "ready" and mb["tier"] == "hot", mb
    assert mb["gpus"] == [0] and mb["vram_bytes"] == 50000 * MiB, mb
    pb = mb["pid"]
    st = h.status()
    assert gpu_entry(st, 0)["used_bytes"] == 50000 * MiB, st["gpus"]
    assert host_pool(st)["used_mb"] == 1500 + 500, st["pools"]
    a_sleeps = la.events("sleep", outcome="ok")
    assert [s["level"] for s in a_sleeps] == [1], la
    assert a_sleeps[0]["t"] <= lb.events("start")[0]["t"], \
        "B was started before A was asleep: both would hold the GPU"
    assert not la.events("stop"), f"A was stopped: {la!r}"

    assert "back to a" in answer_of(h.chat("a", "back to a"))
    ma, mb = h.model("a"), h.model("b")
    assert ma["state"] == "ready" and ma["pid"] == pa and ma["starts_total"] == 1, ma
    assert mb["state"] == "sleeping" and mb["pid"] == pb and pid_alive(pb), mb
    b_sleeps = lb.events("sleep", outcome="ok")
    a_wakes = la.events("wake", outcome="ok")
    assert len(b_sleeps) == 1 and len(a_wakes) == 1, (la, lb)
    assert b_sleeps[0]["t"] <= a_wakes[0]["t_begin"], "A was woken before B was asleep"
    assert len(la.events("start")) == 1 and len(lb.events("start")) == 1
    la.assert_clean()
    lb.assert_clean()


def test_host_memory_pressure_stops_the_sleeper(hearth):
    """A asleep would hold 1500 MB of host RAM; with B hot (500 MB) that exceeds the 1800 MB pool, so A is
    stopped rather than put to sleep."""
    la, lb = double_log(hearth, "a"), double_log(hearth, "b")
    common = dict(sleep="level1", vram_mb=50000, sleep_memory_mb=1500, sleep_vram_mb=0)
    h = start_hearth(hearth, [vllm_model("a", la, **common), vllm_model("b", lb, **common)],
                     host_memory_mb=1800)
    h.chat("a", "to a")
    pa = h.model("a")["pid"]
    assert "to b" in answer_of(h.chat("b", "to b"))
    ma = h.wait_model("a", lambda m: m["state"] != "stopping", timeout=10, what="A stopped")
    assert ma["state"] == "cold" and ma["tier"] == "cold" and ma["pid"] is None, \
        f"A cannot stay asleep in host RAM next to B: {ma}"
    wait_until(lambda: not pid_alive(pa), 10, what=f"A's runtime {pa} to exit")
    stops = la.events("stop")
    assert stops, f"A should have been stopped (SIGTERM): {la!r}"
    assert stops[0]["t"] <= lb.events("start")[0]["t"], "B was started before A was stopped"
    mb = h.model("b")
    assert mb["state"] == "ready" and mb["tier"] == "hot", mb
    assert host_pool(h.status())["used_mb"] == 500
    la.assert_clean()
    lb.assert_clean()


def test_keep_asleep_stops_a_long_sleeper(hearth):
    log = double_log(hearth, "big")
    h = start_hearth(hearth, [vllm_model("big", log, sleep="level1", sleep_memory_mb=1500,
                                         keep_warm="1s", keep_asleep="3s")])
    h.chat("big", "hi")
    pid = h.model("big")["pid"]
    wait_tier(h, "big", "sleeping")
    asleep_at = time.time()
    m = wait_tier(h, "big", "cold", timeout=30)
    assert time.time() - asleep_at >= 2.0, "stopped before keep_asleep (3s) had passed"
    assert m["state"] == "cold" and m["pid"] is None, m
    wait_until(lambda: not pid_alive(pid), 10, what=f"the sleeper {pid} to exit")
    kinds = [e["event"] for e in log.events() if e["event"] in ("sleep", "wake", "stop")]
    assert kinds == ["sleep", "stop"], f"expected sleep then stop, got {kinds}"
    assert host_pool(h.status())["used_mb"] == 0
    log.assert_clean()


@pytest.mark.parametrize("mode", ["error", "crash", "stuck"])
def test_failed_wake_becomes_a_cold_start(hearth, mode):
    """The first wake-up fails (500 / the process dies of CUDA OOM / 200 but still asleep): hearth stops
    that runtime and cold-starts a new one, and the request is answered. The failure is counted once
    (WAKE_FAIL_TIMES=1, in a state file that survives the restart), so the new process sleeps and wakes
    normally."""
    log = double_log(hearth, "big")
    h = start_hearth(hearth, [vllm_model(
        "big", log, sleep="level1", sleep_memory_mb=1500, keep_warm="2s",
        env_extra={"HEARTH_VLLM_DOUBLE_WAKE_FAIL": mode, "HEARTH_VLLM_DOUBLE_WAKE_FAIL_TIMES": "1"})])
    h.chat("big", "one")
    pid1 = h.model("big")["pid"]
    wait_tier(h, "big", "sleeping")

    assert "two" in answer_of(h.chat("big", "two")), "the request after a failed wake must be served"
    m = h.model("big")
    assert m["state"] == "ready" and m["pid"] != pid1 and m["starts_total"] == 2, m
    assert m["failures_total"] == 1, m
    wait_until(lambda: not pid_alive(pid1), 10, what=f"the runtime that failed to wake ({pid1}) to exit")
    starts = log.events("start")
    assert len(starts) == 2 and starts[1]["pid"] == m["pid"], log
    wakes = log.events("wake")
    assert wakes and wakes[0]["outcome"] == mode and wakes[0]["pid"] == pid1, log
    text = h.metrics()
    assert metric(text, "hearth_runtime_failures_total", model="big", reason="wake_failed") == 1, text
    assert metric(text, "hearth_model_wakes_total", model="big", outcome="failed") == 1, text

    pid2 = m["pid"]
    wait_tier(h, "big", "sleeping")
    assert "three" in answer_of(h.chat("big", "three"))
    m = h.model("big")
    assert m["pid"] == pid2 and m["starts_total"] == 2, f"the second wake should succeed: {m}"
    assert log.events("wake")[-1]["outcome"] == "ok", log
    assert metric(h.metrics(), "hearth_model_wakes_total", model="big", outcome="ok") == 1
    log.assert_clean()


def test_admin_sleep_endpoint(hearth):
    ls, ln, lc = double_log(hearth, "big"), double_log(hearth, "nosleep"), double_log(hearth, "cold")
    h = start_hearth(hearth, [vllm_model("big", ls, sleep="level1", sleep_memory_mb=1500),
                              vllm_model("nosleep", ln, vram_mb=20000),
                              vllm_model("cold", lc, vram_mb=10000, sleep="level1",
                                         sleep_memory_mb=1000)])
    h.chat("big", "hi")
    h.chat("nosleep", "hi")
    pid = h.model("big")["pid"]
    r = h.http.post("/hearth/v1/models/big/sleep")
    assert r.status_code in (200, 202), r.text
    m = wait_tier(h, "big", "sleeping", timeout=20)
    assert m["pid"] == pid and m["state"] == "sleeping", m
    assert [s["level"] for s in ls.events("sleep", outcome="ok")] == [1], ls

    for model_id, why in (("nosleep", "sleep is off"), ("cold", "not running")):
        r = h.http.post(f"/hearth/v1/models/{model_id}/sleep")
        assert r.status_code == 409, f"{model_id} ({why}): {r.status_code} {r.text}"
        err = r.json().get("error")
        assert isinstance(err, dict) and err.get("message") and err.get("code"), r.text
    r = h.http.post("/hearth/v1/models/nope/sleep")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert h.model("nosleep")["state"] == "ready" and h.model("cold")["state"] == "cold"
    start = ln.events("start")[0]
    assert "--enable-sleep-mode" not in start["argv"] and start["env"]["VLLM_SERVER_DEV_MODE"] is None
    assert not ln.events("sleep"), ln
    for log in (ls, ln, lc):
        log.assert_clean()


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

GOOD = '''
[server]
listen = "127.0.0.1:18998"

[resources]
host_memory_mb = 65536
gpu_reserve_mb = 1000

[[resources.gpus]]
index = 0
memory_mb = 80000

[[resources.gpus]]
index = 1
memory_mb = 80000

[runtimes]
llama_server = "{llama}"
vllm = "{vllm}"

[[models]]
id = "big"
runtime = "vllm"
model_path = "org/big-model"
memory_mb = 500
vram_mb = 40000
gpus = [0]
sleep = "level1"
sleep_memory_mb = 1500
sleep_vram_mb = 0
keep_warm = "5m"
keep_asleep = "forever"
env = {{ HF_HOME = "/var/cache/hf" }}

[[models]]
id = "wide"
runtime = "vllm"
model_path = "org/wide-model"
memory_mb = 500
vram_mb = 30000
gpus = [0, 1]
sleep = "level2"
keep_asleep = "1h"

[[models]]
id = "anywhere"
runtime = "vllm"
model_path = "org/any-model"
memory_mb = 500
vram_mb = 8000
gpus = "any"

[[models]]
id = "small"
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 300
'''

BAD = '''
[server]
listen = "127.0.0.1:18998"

[resources]
host_memory_mb = 4096

[[resources.gpus]]
index = 0
memory_mb = 80000

[runtimes]
llama_server = "{llama}"
vllm = "{vllm}"

[[models]]
id = "small"
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 300
sleep = "level1"

[[models]]
id = "huge"
runtime = "vllm"
model_path = "org/huge-model"
memory_mb = 500
vram_mb = 90000
gpus = [0]

[[models]]
id = "ghost"
runtime = "vllm"
model_path = "org/ghost-model"
memory_mb = 500
vram_mb = 1000
gpus = [3]

[[models]]
id = "novram"
runtime = "vllm"
model_path = "org/novram-model"
memory_mb = 500
'''

# (what, key-path regex, reason regex): each on one line with the file name
PROBLEMS = [
    ("sleep on a llama-cpp model", r"models\[0\] \(small\)\.sleep\b", r"vllm|llama-cpp"),
    ("vram_mb over the GPU's budget", r"models\[1\] \(huge\)\.vram_mb", r"90000|does not fit|exceed"),
    ("an undeclared GPU", r"models\[2\] \(ghost\)\.gpus", r"\b3\b"),
    ("a vllm model without vram_mb", r"models\[3\] \(novram\)\.vram_mb", r"missing|required|must"),
]


def _check_config(env, text: str, path: Path) -> subprocess.CompletedProcess:
    path.write_text(text)
    return subprocess.run([env["hearth_bin"], "check-config", str(path)], capture_output=True,
                          text=True, timeout=30)


def test_check_config_accepts_gpus_and_sleep(env, smol_model, tmp_path):
    out = _check_config(env, GOOD.format(llama=env["llama_server"], vllm=str(DOUBLE),
                                         model_path=smol_model), tmp_path / "vllm-good.toml")
    assert out.returncode == 0, f"good vLLM config rejected:\n{out.stdout}\n{out.stderr}"


def test_check_config_reports_every_gpu_and_sleep_problem(env, smol_model, tmp_path):
    out = _check_config(env, BAD.format(llama=env["llama_server"], vllm=str(DOUBLE),
                                        model_path=smol_model), tmp_path / "vllm-bad.toml")
    text = out.stdout + out.stderr
    assert out.returncode == 1, f"exit {out.returncode}, expected 1:\n{text}"
    lines = text.splitlines()
    missing = [what for what, key_re, reason_re in PROBLEMS
               if not [l for l in lines if "vllm-bad.toml" in l and re.search(key_re, l)
                       and re.search(reason_re, l, re.I)]]
    assert not missing, f"check-config did not report: {missing}\noutput:\n{text}"
    fmt = [l for l in lines if re.match(r"^\S*vllm-bad\.toml: models\[\d\][^:]*: .+", l)]
    assert len(fmt) >= len(PROBLEMS), f"expected >= {len(PROBLEMS)} 'FILE: key: reason' lines:\n{text}"


def _nvml_present() -> bool:
    """Whether this machine has the NVIDIA driver's NVML library (CI machines do not)."""
    import ctypes
    for lib in ("libnvidia-ml.so.1", "libnvidia-ml.so"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            pass
    return False


def test_without_nvml_the_declared_pools_are_used_and_hearth_says_so(hearth):
    """No driver (as in CI): hearth runs on the declared GPU pools, says at start and in status that
    GPU memory is not measured and why; `nvml = "required"` refuses to start, naming NVML."""
    if _nvml_present():
        pytest.skip("NVML IS present on this machine: the no-driver path cannot be checked here "
                    "(tests/hosts/gpu-check.sh covers the NVML path)")
    log = double_log(hearth, "big")
    h = start_hearth(hearth, [vllm_model("big", log)])
    st = h.status()
    assert st["gpu"]["measured"] is False, st["gpu"]
    reason = st["gpu"]["reason"]
    assert "not measured" in reason and "NVML could not be loaded" in reason, reason
    assert [g["source"] for g in st["gpus"]] == ["config"], st["gpus"]
    assert st["gpus"][0]["measured_used_bytes"] is None, st["gpus"]
    assert "GPU memory is NOT measured" in h.log_text(), h.log_tail()
    assert "still works" in answer_of(h.chat("big", "still works"))

    # nvml = "required": refuse to start, with the reason.
    port = free_port()
    lo, hi = free_port_range(5)
    cfg = hearth.tmp_path / "required.toml"
    cfg.write_text(render_config(
        {"listen": f"127.0.0.1:{port}", "runtime_ports": f"{lo}-{hi}"},
        {"host_memory_mb": 4096, "nvml": "required", "gpus": [{"index": 0, "memory_mb": GPU_MB}]},
        {"vllm": double_program(hearth)},
        [vllm_model("big", log)]))
    p = subprocess.run([hearth.env["hearth_bin"], "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert 'resources.nvml = "required"' in p.stderr and "NVML could not be loaded" in p.stderr, p.stderr
