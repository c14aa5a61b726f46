"""Confinement (issue 3): every runtime in its own cgroup with its limits, as an unprivileged user with
no capabilities and a clean environment; whole-cgroup kills; OOM; leftovers of a killed hearth.

These need root (hearth creates cgroups and switches users); CI runs as root. Without root they skip
loudly: hearth then runs runtimes unconfined, which test_unprivileged covers elsewhere."""
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import assert_error, pid_alive, pids_matching, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="SKIPPED LOUDLY: confinement tests need root (CI runs as root)")

MB = 1024 * 1024


def cg_read(model_status: dict, *names: str) -> tuple[str, str]:
    """The first of `names` found in the runtime's cgroup directories: (name, content)."""
    for d in model_status["cgroup"]["path"]:
        for n in names:
            p = Path(d) / n
            if p.exists():
                return n, p.read_text().strip()
    raise AssertionError(f"none of {names} in {model_status['cgroup']['path']}")


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def proc_environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if e)


def chat(h, model: str) -> httpx.Response:
    return h.http.post("/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]})


def test_runtime_runs_confined_with_its_limits(hearth):
    h = hearth([hearth.smol("conf", memory_mb=300, memory_max_mb=700, cpu_weight=50,
                            cpu_quota=1.5, pids_max=300, cpuset="0",
                            env={"HEARTH_TEST_MARK": "yes"})])
    st = h.status()
    assert st["confinement"]["cgroups"] in ("cgroup v1", "cgroup v2"), st["confinement"]
    r = chat(h, "conf")
    assert r.status_code == 200, r.text
    m = h.model("conf")
    pid = m["pid"]
    assert m["cgroup"], m

    # /proc/<pid>/cgroup names the runtime's own cgroup (every v1 controller, or the v2 path)
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    own = [l for l in lines if l.endswith("/runtimes/conf")]
    if st["confinement"]["cgroups"] == "cgroup v1":
        joined = {c for l in own for c in l.split(":")[1].split(",")}
        assert {"memory", "cpu", "pids", "cpuset", "freezer"} <= joined, lines
    else:
        assert any(l.startswith("0::") for l in own), lines

    # limits read back from cgroupfs
    name, v = cg_read(m, "memory.max", "memory.limit_in_bytes")
    assert int(v) == 700 * MB, (name, v)
    name, v = cg_read(m, "cpu.weight", "cpu.shares")
    assert int(v) == (50 if name == "cpu.weight" else 50 * 1024 // 100), (name, v)
    name, v = cg_read(m, "cpu.max", "cpu.cfs_quota_us")
    assert v.split()[0] == "150000", (name, v)
    name, v = cg_read(m, "pids.max")
    assert v == "300", v
    name, v = cg_read(m, "cpuset.cpus")
    assert v == "0", v

    # an unprivileged user, no capabilities, no new privileges, a clean environment
    ps = proc_status(pid)
    uids = [int(x) for x in ps["Uid"].split()]
    assert all(u != 0 for u in uids), ps["Uid"]
    assert ps["Groups"] == "", ps["Groups"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(ps[cap], 16) == 0, (cap, ps[cap])
    assert ps["NoNewPrivs"] == "1", ps["NoNewPrivs"]
    env = proc_environ(pid)
    assert set(env) == {"PATH", "HOME", "HEARTH_TEST_MARK"}, env
    assert m["user"].endswith(f"(uid {uids[0]})"), m["user"]

    # statistics in status and metrics
    # (read every second; the 98 MB of weights are mmap'd: resident once served from, though
    # charged to whichever cgroup cached them first)
    wait_until(lambda: ((h.model("conf")["cgroup"] or {}).get("resident_bytes") or 0) > 60 * MB, 5,
               what="a cgroup reading with the weights resident")
    cg = h.model("conf")["cgroup"]
    assert cg["memory_current_bytes"] > 0, cg
    assert cg["memory_limit_bytes"] == 700 * MB, cg
    assert cg["pids"] >= 1 and cg["cpu_seconds"] > 0, cg
    metrics = h.metrics()
    assert 'hearth_runtime_memory_limit_bytes{model="conf"} 734003200' in metrics
    assert 'hearth_runtime_pids_limit{model="conf"} 300' in metrics
    line = next(l for l in metrics.splitlines() if l.startswith('hearth_runtime_memory_bytes{model="conf"}'))
    assert float(line.split()[-1]) > 0, line
    line = next(l for l in metrics.splitlines() if l.startswith('hearth_runtime_cpu_seconds_total{model="conf"}'))
    assert float(line.split()[-1]) > 0, line

    # unload: the process and the cgroup are gone
    dirs = m["cgroup"]["path"]
    r = h.http.post("/hearth/v1/models/conf/unload")
    assert r.status_code == 202, r.text
    h.wait_model("conf", lambda x: x["state"] == "cold", timeout=20, what="cold after unload")
    assert not pid_alive(pid)
    for d in dirs:
        assert not Path(d).exists(), f"cgroup {d} left behind"


def start_escaper(h) -> tuple[dict, int]:
    """Starts the `escape` fault-injection runtime of `h`: its status and its escaped grandchild."""
    r = chat(h, "escaper")
    assert r.status_code == 200, r.text
    tag = str(h.workdir) + os.sep
    escaped = lambda: [p for p in pids_matching("fault-injection-escaped-grandchild") if tag in
                       Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    wait_until(escaped, 10, what="the escaped grandchild to run")
    (g,) = escaped()
    return h.model("escaper"), g


def test_process_that_left_the_group_is_killed_with_the_cgroup(hearth):
    """A runtime whose grandchild left its process group and session (setsid) and ignores SIGTERM:
    a process-group kill misses it, the cgroup kill does not."""
    h = hearth([hearth.fake("escaper", "escape", stop_timeout="1s")])
    m, g = start_escaper(h)
    assert os.getpgid(g) != os.getpgid(m["pid"]), "the grandchild should have its own process group"
    assert str(g) in cg_read(m, "cgroup.procs")[1].split(), "the grandchild is still in the cgroup"

    r = h.http.post("/hearth/v1/models/escaper/unload")
    assert r.status_code == 202, r.text
    h.wait_model("escaper", lambda x: x["state"] == "cold", timeout=20, what="cold after unload")
    assert not pid_alive(g), "the escaped grandchild survived the stop"
    assert not pid_alive(m["pid"])


def test_oom_fails_the_model_with_its_limit_and_others_keep_serving(hearth):
    """gen-300m's 310 MB of weights read into anonymous memory (--load-mode none: no mmap) under a 120 MB limit."""
    big = os.path.join(hearth.env["models_dir"], "gen-300m.gguf")
    h = hearth([
        hearth.smol("big", model_path=hearth.model_link("big", big), memory_mb=400,
                    memory_max_mb=120, args=["-t", "1", "--load-mode", "none"], context_length=512),
        hearth.smol("small"),
    ])
    r = chat(h, "big")
    body = assert_error(r, 503, "model_start_failed")
    msg = body["message"]
    assert "model big" in msg and "oom: limit 120 MB" in msg, msg

    m = h.model("big")
    assert m["state"] == "failed", m
    assert "oom: limit 120 MB" in m["last_error"], m["last_error"]
    assert m["oom_kills_total"] >= 1, m
    metrics = h.metrics()
    assert 'hearth_runtime_failures_total{model="big",reason="oom"} 1' in metrics
    line = next(l for l in metrics.splitlines() if l.startswith('hearth_runtime_oom_kills_total{model="big"}'))
    assert int(line.split()[-1]) >= 1, line

    r = chat(h, "small")
    assert r.status_code == 200, r.text
    assert h.model("big")["state"] == "failed"


def test_kill_9_then_restart_kills_the_leftovers(hearth):
    """hearth dies with kill -9: PDEATHSIG takes the runtime's leader, but a grandchild that left the
    process group survives in the runtime's cgroup. The next hearth kills it before it serves."""
    cfg = [hearth.fake("escaper", "escape")]
    h = hearth(cfg)
    m, g = start_escaper(h)
    dirs = m["cgroup"]["path"]

    h._poll_stop.set()
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(10)
    h.stopped = True
    wait_until(lambda: not pid_alive(m["pid"]), 5, what="PDEATHSIG to kill the runtime's leader")
    time.sleep(0.3)
    assert pid_alive(g), "the escaped grandchild should outlive hearth's kill -9 (nothing else kills it)"
    assert all(Path(d).exists() for d in dirs)

    t0 = time.monotonic()
    h2 = hearth(cfg)  # waits for /health: leftovers are dealt with before hearth serves
    elapsed = time.monotonic() - t0
    assert not pid_alive(g), "the leftover grandchild survived the restart"
    for d in dirs:
        assert not Path(d).exists(), f"leftover cgroup {d} not removed"
    st = h2.status()["confinement"]
    assert "escaper" in st["leftovers_killed"], st
    print(f"leftovers gone {elapsed:.2f}s after the restart began")


def test_observed_memory_above_declared_is_accounted_and_warned(hearth):
    h = hearth([hearth.smol("under", memory_mb=20)], host_memory_mb=4000)
    r = chat(h, "under")
    assert r.status_code == 200, r.text
    m = h.wait_model("under", lambda x: x["memory_warning"], timeout=10,
                     what="a warning that the model uses more than it declared")
    assert m["memory_accounted_mb"] > 20 and m["memory_observed_mb"] == m["memory_accounted_mb"], m
    assert "more than its declared memory_mb = 20" in m["memory_warning"]
    pool = h.status()["pools"][0]
    assert pool["used_mb"] == m["memory_accounted_mb"], pool
    assert "uses more memory than declared" in h.log_text()


def test_cgroups_off_still_drops_privileges(hearth):
    h = hearth([hearth.smol("plain")], extra={"confinement": {"cgroups": "off"}})
    st = h.status()["confinement"]
    assert st["cgroups"] == "off", st
    r = chat(h, "plain")
    assert r.status_code == 200, r.text
    m = h.model("plain")
    assert m["cgroup"] is None
    assert all(int(u) != 0 for u in proc_status(m["pid"])["Uid"].split())


AS_RUNTIME_USER = ["setpriv", "--reuid=hearth-runtime", "--regid=hearth-runtime", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all"]


def test_unprivileged_hearth_runs_unconfined_and_says_so(hearth):
    """hearth started as an ordinary user: cgroups cannot be created, so (auto) it serves without
    them, and status, metrics and the log say so."""
    h = hearth([hearth.smol("plain")], wrap=AS_RUNTIME_USER)
    st = h.status()["confinement"]
    assert st["cgroups"] == "off" and st["privileged"] is False, st
    assert "unavailable" in st["reason"] and "WITHOUT cgroup limits" in st["reason"], st
    r = chat(h, "plain")
    assert r.status_code == 200, r.text
    m = h.model("plain")
    assert m["cgroup"] is None and m["user"] is None, m
    assert 'hearth_confinement_info{cgroups="off",run_as_switch="no"} 1' in h.metrics()
    log = h.log_text()
    assert "runtime cgroups are OFF" in log and "hearth is not root" in log


def test_required_cgroups_refuse_to_start_without_them(hearth):
    h = hearth([hearth.smol("plain")], wrap=AS_RUNTIME_USER, wait=False,
               extra={"confinement": {"cgroups": "required"}})
    rc = h.proc.wait(20)
    h.stopped = True
    assert rc != 0
    log = h.log_text()
    assert 'confinement.cgroups = "required" but runtime cgroups cannot be used here' in log, log


def test_oom_while_serving_names_the_limit_to_the_request_in_flight(hearth):
    """A runtime OOM-killed while it serves: the request in flight gets a 502 that names the model and
    the limit, the model is failed with the reason, and the next request starts it again."""
    h = hearth([hearth.fake("hogger", "alloc-on-request", memory_max_mb=100,
                            command_extra=["--alloc-mb", "300"])])
    r = h.http.post("/v1/chat/completions", timeout=60, json={
        "model": "hogger", "messages": [{"role": "user", "content": "hi"}]})
    err = assert_error(r, 502, "upstream_error")
    assert "model hogger" in err["message"] and "oom: limit 100 MB" in err["message"], err
    m = h.wait_model("hogger", lambda x: x["state"] in ("failed", "cold", "starting", "ready")
                     and x["oom_kills_total"] >= 1, timeout=10, what="the OOM to be recorded")
    assert "oom: limit 100 MB" in (m["last_error"] or ""), m
    assert 'hearth_runtime_failures_total{model="hogger",reason="oom"} 1' in h.metrics()
