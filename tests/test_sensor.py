"""The eBPF gateway sensor (issue 4): real kernel programs attached to a real gateway's cgroup, real
TCP traffic with known byte counts, sessions and their states through the admin API, the CLI and the
metrics; and the sensor off (never a crash) without configuration or without CAP_BPF.

The gateway here is a real HTTP/1.1 server (tests/servers/gateway_standin.py) in a cgroup v2
directory the test creates; clients connect from outside that cgroup, so each flow is seen once (on
the server's socket). Needs root (CI runs as root)."""
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cgroup2_mount, free_port, remove_cgroup, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="SKIPPED LOUDLY: the eBPF sensor tests need root (CI runs as root)")

GATEWAY = Path(__file__).parent / "servers" / "gateway_standin.py"
# Bound on what the counters may add to the payload: IP + TCP headers per packet (IPv4 20 + TCP
# 20 + options up to 40 bytes) and HTTP/1.1 request or response headers per message.
PER_PACKET = 80
PER_MESSAGE = 400


@pytest.fixture
def gateway():
    port = free_port()
    cg = cgroup2_mount() / f"hearth-test-gw-{os.getpid()}-{port}"
    cg.mkdir()
    proc = subprocess.Popen([sys.executable, str(GATEWAY), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        (cg / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdout.readline().startswith("listening"), "gateway stand-in did not start"
        yield {"port": port, "cgroup": str(cg), "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()
        remove_cgroup(cg)


def sensor_config(gw: dict, **over) -> dict:
    s = {"gateway_cgroup": gw["cgroup"], "gateway_ports": [gw["port"]], "idle_after": "2s",
         "poll_interval": "200ms"}
    s.update(over)
    return {"sensor": s}


def sessions(h) -> dict:
    r = h.http.get("/hearth/v1/sessions")
    assert r.status_code == 200, r.text
    return r.json()


class Client:
    """One keep-alive HTTP connection: one session, keyed by its local port."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.connect()
        self.port = self.conn.sock.getsockname()[1]
        self.sent = 0       # body bytes to the gateway
        self.received = 0   # body bytes from the gateway
        self.messages = 0

    def post(self, n: int, reply: int):
        self.conn.request("POST", f"/echo?reply={reply}", body=b"x" * n)
        body = self.conn.getresponse().read()
        assert len(body) == reply
        self.sent += n
        self.received += reply
        self.messages += 1

    def close(self):
        self.conn.close()


def session_of(report: dict, client: Client) -> dict | None:
    found = [s for s in report["sessions"] if s["peer"].endswith(f":{client.port}")]
    assert len(found) <= 1, f"flow counted as several sessions: {found}"
    return found[0] if found else None


def test_two_clients_are_two_sessions_with_counted_bytes_idle_and_closed(hearth, gateway):
    h = hearth([hearth.fake("m", "drop-requests")], extra=sensor_config(gateway))
    st = sessions(h)["sensor"]
    assert st["state"] == "on", st
    assert st["gateway_cgroup"] == gateway["cgroup"], st

    a, b = Client(gateway["port"]), Client(gateway["port"])
    for _ in range(3):
        a.post(100_000, 50_000)
    b.post(20_000, 1_000)

    def counted():
        rep = sessions(h)
        sa, sb = session_of(rep, a), session_of(rep, b)
        return sa and sb and sa["bytes_in"] >= a.sent and sb["bytes_out"] >= b.received and (sa, sb)

    sa, sb = wait_until(counted, 10, what="both sessions counted")
    rep = sessions(h)
    assert len([s for s in rep["sessions"] if s["gateway"].endswith(f":{gateway['port']}")]) == 2, rep
    for s, c in ((sa, a), (sb, b)):
        over_in = s["bytes_in"] - c.sent
        over_out = s["bytes_out"] - c.received
        bound_in = s["packets_in"] * PER_PACKET + c.messages * PER_MESSAGE
        bound_out = s["packets_out"] * PER_PACKET + c.messages * PER_MESSAGE
        print(f"session {s['id']}: in {s['bytes_in']} (payload {c.sent}, +{over_in}, "
              f"{s['packets_in']} packets), out {s['bytes_out']} (payload {c.received}, +{over_out}, "
              f"{s['packets_out']} packets)")
        assert 0 <= over_in <= bound_in, (s, c.sent, bound_in)
        assert 0 <= over_out <= bound_out, (s, c.received, bound_out)
        assert s["state"] == "active", s
        assert sum(i[0] for i in s["intervals"]) == s["bytes_in"], s

    # a closes: closed (the tracepoint's CLOSE); b stays silent: idle after idle_after (2 s)
    a.close()
    wait_until(lambda: session_of(sessions(h), a)["state"] == "closed", 10, what="a closed")
    wait_until(lambda: session_of(sessions(h), b)["state"] == "idle", 10, what="b idle")
    # b talks again: active
    b.post(10, 10)
    wait_until(lambda: session_of(sessions(h), b)["state"] == "active", 10, what="b active again")

    m = h.metrics()
    assert "hearth_sensor_up 1" in m
    assert 'hearth_gateway_sessions{state="closed"} 1' in m
    assert 'hearth_gateway_sessions{state="active"} 1' in m
    line = next(l for l in m.splitlines() if l.startswith('hearth_gateway_bytes_total{direction="in"}'))
    assert float(line.split()[-1]) >= a.sent + b.sent, line

    # the CLI shows the same
    out = subprocess.run([h.bin, "sessions", "--url", h.base_url, "--json"], capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert {s["id"] for s in json.loads(out.stdout)["sessions"]} >= {sa["id"], sb["id"]}
    out = subprocess.run([h.bin, "sessions", "--url", h.base_url], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0 and "sensor: on" in out.stdout and sb["id"] in out.stdout, out
    b.close()


def test_a_burst_of_connections_is_drained_before_the_ring_fills(hearth, gateway):
    """Thousands of short connections between two polls: more open/close events than the kernel's
    ring buffer holds (4095). The programs wake hearth's poller once a quarter of the ring waits, so
    it drains the ring mid-interval: every connection ends up a closed session and no event is
    lost. (Without that wake-up the ring filled and the rest of the burst's events were lost.)"""
    import socket
    h = hearth([hearth.fake("m", "drop-requests")],
               extra=sensor_config(gateway, poll_interval="10s", forget_after="10m"))
    assert sessions(h)["sensor"]["state"] == "on"
    n = 2600  # 5,200 events: past the ring's 4,095
    ports = set()
    start = time.monotonic()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", gateway["port"]), timeout=10) as c:
            ports.add(c.getsockname()[1])
            c.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            while c.recv(4096):
                pass
    took = time.monotonic() - start
    print(f"burst: {n} connections in {took:.2f} s ({n / took:.0f}/s), {len(ports)} client ports")

    state = {}

    def all_closed():
        rep = sessions(h)
        mine = [s for s in rep["sessions"] if s["peer"].startswith("127.0.0.1:")
                and int(s["peer"].rsplit(":", 1)[1]) in ports]
        state.update(closed=sum(1 for s in mine if s["state"] == "closed"), of=len(ports),
                     lost=rep["sensor"]["events_lost_total"])
        return state["closed"] == len(ports)

    # The events under the wake-up level are drained at the next poll (at most 10 s away).
    try:
        wait_until(all_closed, 25, interval=0.5, what="every connection a closed session")
    except AssertionError as e:
        raise AssertionError(f"{e}: {state}") from None
    print(f"closed sessions: {state}")
    assert state["lost"] == 0, state
    assert 'hearth_sensor_lost_events{source="local"} 0' in h.metrics()


def test_sensor_off_without_configuration(hearth):
    h = hearth([hearth.fake("m", "drop-requests")])
    st = sessions(h)["sensor"]
    assert st["state"] == "off" and "not configured" in st["reason"], st
    assert "hearth_sensor_up 0" in h.metrics()


def test_sensor_off_without_cap_bpf_and_hearth_still_serves(hearth, gateway):
    """hearth as root but without CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON: the programs cannot load;
    hearth starts anyway, serves, and says why the sensor is off."""
    h = hearth([hearth.fake("m", "escape")], extra=sensor_config(gateway),
               wrap=["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--inh-caps=-all"])
    st = sessions(h)["sensor"]
    assert st["state"] == "off", st
    assert "loading the eBPF programs" in st["reason"] and "CAP_BPF" in st["reason"], st
    assert "hearth_sensor_up 0" in h.metrics()
    assert "gateway sensor OFF" in h.log_text()
    assert h.status()["sensor"]["state"] == "off", h.status()["sensor"]
    out = subprocess.run([h.bin, "status", "--url", h.base_url], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0 and "sensor: off (loading the eBPF programs" in out.stdout, out
    r = h.http.post("/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_remote_sensor_reports_to_the_agent_and_survives_its_restart(hearth, gateway, tmp_path):
    """`hearth sensor` on the "gateway host" (here: the same machine) reports over loopback with a
    token; the agent shows its sessions under the sensor's name. The agent is killed, traffic goes
    on, the agent comes back on the same port: the sensor reconnects and the counters (cumulative)
    lose nothing."""
    token = "sensor-token-123"
    extra = {"sensor": {"accept_tokens": [token], "idle_after": "60s"}}
    h = hearth([hearth.fake("m", "drop-requests")], extra=extra)
    cfg = tmp_path / "sensor.toml"
    cfg.write_text("\n".join([
        "[sensor]",
        f'gateway_cgroup = "{gateway["cgroup"]}"',
        f"gateway_ports = [{gateway['port']}]",
        'poll_interval = "200ms"',
        f'report_to = "{h.base_url}"',
        f'report_token = "{token}"',
        'name = "gw-host"',
        "report_buffer = 50",
        "",
    ]))
    log = open(tmp_path / "sensor.log", "wb")
    sensor = subprocess.Popen([h.bin, "sensor", "--config", str(cfg)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"})
    try:
        wait_until(lambda: b"programs attached" in (tmp_path / "sensor.log").read_bytes(), 15,
                   what="hearth sensor to attach its programs")
        c = Client(gateway["port"])
        c.post(30_000, 3_000)

        def seen(min_in):
            rep = sessions(h)
            s = [x for x in rep["sessions"] if x["source"] == "gw-host" and
                 x["peer"].endswith(f":{c.port}")]
            return s and s[0]["bytes_in"] >= min_in and (rep, s[0])

        rep, s = wait_until(lambda: seen(c.sent), 15, what="the remote session at the agent")
        assert s["id"] == f"gw-host/127.0.0.1:{c.port}", s
        assert [r["name"] for r in rep["remote_sensors"]] == ["gw-host"], rep
        assert rep["sensor"]["state"] == "off"  # no local sensor on the agent

        # the agent goes away; traffic continues; the agent comes back on the same port
        h.proc.kill()
        h.proc.wait(10)
        c.post(40_000, 4_000)
        time.sleep(1.0)
        h2 = hearth.restart(h)
        rep, s = wait_until(lambda: seen(c.sent), 30, what="the session after the agent's restart")
        print(f"after restart: bytes_in {s['bytes_in']} for {c.sent} sent; "
              f"dropped {rep['remote_sensors'][0]['dropped_total']}")
        assert rep["remote_sensors"][0]["dropped_total"] == 0, rep
        c.close()

        # a wrong token is refused
        r = h2.http.post("/hearth/v1/activity", headers={"Authorization": "Bearer nope"},
                         json={"source": "x", "batches": [], "gateway_ports": [1], "dropped_total": 0})
        assert r.status_code == 401, r.text
    finally:
        sensor.terminate()
        rc = sensor.wait(10)
        log.close()
    assert rc == 0, (tmp_path / "sensor.log").read_text()[-3000:]
    text = (tmp_path / "sensor.log").read_text()
    assert "reporting to the agent failed" in text and "accepts reports again" in text, text[-3000:]


def test_gateway_by_pid(hearth, gateway):
    """`gateway_pid`: the sensor attaches to the process's cgroup v2 directory."""
    h = hearth([hearth.fake("m", "drop-requests")], extra={"sensor": {
        "gateway_pid": gateway["pid"], "gateway_ports": [gateway["port"]], "poll_interval": "200ms"}})
    st = sessions(h)["sensor"]
    assert st["state"] == "on" and st["gateway_cgroup"] == gateway["cgroup"], st
    c = Client(gateway["port"])
    c.post(5_000, 500)
    s = wait_until(lambda: (session_of(sessions(h), c) or {}).get("bytes_in", 0) >= 5_000
                   and session_of(sessions(h), c), 10, what="the counted session of the pid's gateway")
    assert s["bytes_out"] >= 500, s
    c.close()


def test_gateway_pid_in_the_v2_root_is_refused_with_the_reason(hearth):
    """A process in the cgroup v2 root cannot be watched alone (attaching there counts the host, and
    moving it would leave its existing sockets in the root): the sensor is off and says why."""
    if Path(f"/proc/{os.getpid()}/cgroup").read_text().find("0::/\n") < 0:
        pytest.skip("SKIPPED LOUDLY: this test process is not in the cgroup v2 root here")
    h = hearth([hearth.fake("m", "drop-requests")], extra={"sensor": {"gateway_pid": os.getpid()}})
    st = sessions(h)["sensor"]
    assert st["state"] == "off" and "cgroup v2 root" in st["reason"], st
    assert "gateway_unit" in st["reason"] and "gateway_cgroup" in st["reason"], st
