"""The page-cache warm tier: residency of a model's weights file (mincore), prewarm, evict, through the
admin API and the CLI, checked against an independent reading of the page cache (util-linux `fincore`
when installed, else mincore through ctypes)."""
import ctypes
import json
import mmap
import os
import shutil
import subprocess

import httpx
import pytest

from conftest import LOAD_TIMEOUT, assert_error

KEY = "sk-pagecache"
GEN_300M = "gen-300m.gguf"


# --------------------------------------------------------------------------------------------
# an independent reading of the page cache
# --------------------------------------------------------------------------------------------

def _mincore_ctypes(path: str) -> int:
    """Resident bytes of `path`: mmap + mincore through libc (what fincore does)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    resident = 0
    for i, v in enumerate(vec):
        if v & 1:
            resident += min(page, size - i * page)
    return resident


def resident_bytes(path: str) -> tuple[int, str]:
    """(resident bytes of `path`, how it was read)."""
    fincore = shutil.which("fincore")
    if fincore:
        out = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", path],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip()), "fincore"
    return _mincore_ctypes(path), "mincore via ctypes"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture
def gen300(env) -> str:
    p = os.path.join(env["models_dir"], GEN_300M)
    if not os.path.isfile(p):
        pytest.fail(f"{p} is missing: run `cargo xtask setup` (or via `cargo xtask test`)",
                    pytrace=False)
    return p


def _gen_model(hearth, gen300: str, model_id: str = "gen", **overrides) -> dict:
    return hearth.smol(model_id, model_path=hearth.model_link(model_id, gen300), memory_mb=700,
                       context_length=2048, max_concurrency=1, **overrides)


def _post(h, path: str) -> httpx.Response:
    return h.http.post(path, timeout=120.0)


def _shape(body: dict, model: str, path: str):
    for k in ("model", "path", "file_bytes", "resident_bytes", "resident_fraction"):
        assert k in body, f"{k} missing from {body}"
    assert body["model"] == model, body
    assert body["path"] == path, body
    assert body["file_bytes"] == os.path.getsize(path), body
    assert 0 <= body["resident_bytes"] <= body["file_bytes"], body
    assert abs(body["resident_fraction"] - body["resident_bytes"] / body["file_bytes"]) < 1e-9, body


def _agrees(body: dict, path: str):
    """hearth's reading and the independent one agree (within 1 % of the file: the cache may move a
    little between the two readings)."""
    mine, how = resident_bytes(path)
    tol = body["file_bytes"] // 100
    assert abs(mine - body["resident_bytes"]) <= tol, (
        f"hearth says {body['resident_bytes']} bytes of {path} are resident, {how} says {mine}")
    return mine, how


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def test_evict_prewarm_and_the_start_after_it(hearth, gen300, capsys):
    h = hearth([_gen_model(hearth, gen300, aliases=["g300"])], api_keys=[KEY])
    path = str(h.workdir / "models" / "gen.gguf")
    size = os.path.getsize(path)

    r = h.http.get("/hearth/v1/models/gen/page-cache")
    assert r.status_code == 200, r.text
    _shape(r.json(), "gen", path)
    assert "seconds" not in r.json(), r.json()

    # evict (through the alias): the file leaves the page cache
    r = _post(h, "/hearth/v1/models/g300/page-cache/evict")
    assert r.status_code == 200, r.text
    ev = r.json()
    _shape(ev, "gen", path)
    assert ev["seconds"] >= 0, ev
    assert ev["resident_fraction"] < 0.1, f"evict left {ev['resident_fraction']:.1%} resident: {ev}"
    _agrees(ev, path)
    r = h.http.get("/hearth/v1/models/gen/page-cache")
    assert r.status_code == 200 and r.json()["resident_fraction"] < 0.1, r.text
    _agrees(r.json(), path)

    # prewarm: returns when the whole file is resident
    r = _post(h, "/hearth/v1/models/gen/prewarm")
    assert r.status_code == 200, r.text
    pw = r.json()
    _shape(pw, "gen", path)
    assert pw["resident_fraction"] >= 0.99, f"prewarm left the file {pw['resident_fraction']:.1%} resident"
    assert pw["seconds"] > 0, pw
    mine, how = _agrees(pw, path)
    assert mine >= 0.99 * size, f"{how}: only {mine} of {size} bytes resident after prewarm"

    # the start after the prewarm: a real llama-server loads the weights from the page cache
    m = h.model("gen")
    assert m["state"] == "cold" and m["starts_total"] == 0, m
    reply = h.chat("gen", max_tokens=4)
    assert reply.choices[0].message.content is not None
    m = h.wait_model("gen", lambda m: m["state"] == "ready", LOAD_TIMEOUT)
    assert m["starts_total"] == 1, m
    cached_load = m["last_load_seconds"]
    assert isinstance(cached_load, (int, float)) and cached_load > 0, m

    # while the runtime maps the file, evict cannot drop its pages (documented)
    r = _post(h, "/hearth/v1/models/gen/page-cache/evict")
    assert r.status_code == 200, r.text
    assert r.json()["resident_fraction"] > 0.5, (
        f"evict dropped pages a running llama-server maps? {r.json()}")

    # for comparison: a start from disk (unloaded, evicted)
    r = _post(h, "/hearth/v1/models/gen/unload")
    assert r.status_code == 202, r.text
    h.wait_model("gen", lambda m: m["state"] == "cold", LOAD_TIMEOUT, what="gen to unload")
    r = _post(h, "/hearth/v1/models/gen/page-cache/evict")
    assert r.status_code == 200 and r.json()["resident_fraction"] < 0.1, r.text
    assert h.chat("gen", max_tokens=4).choices[0].message.content is not None
    m = h.wait_model("gen", lambda m: m["state"] == "ready", LOAD_TIMEOUT)
    assert m["starts_total"] == 2, m
    disk_load = m["last_load_seconds"]
    with capsys.disabled():
        print(f"\n[page cache] {GEN_300M} ({size / 1e6:.0f} MB): prewarm {pw['seconds']:.2f} s; "
              f"hearth's load time after prewarm {cached_load:.2f} s, from disk (after evict) "
              f"{disk_load:.2f} s; residency checked with {how}")


def test_cli_prewarm_evict_and_page_cache(hearth, gen300, env):
    h = hearth([_gen_model(hearth, gen300)], api_keys=[KEY])
    path = str(h.workdir / "models" / "gen.gguf")

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([env["hearth_bin"], *args, "--config", str(h.config_path)],
                              capture_output=True, text=True, timeout=120)

    out = cli("prewarm", "gen", "--evict", "--json")
    assert out.returncode == 0, out.stderr
    ev = json.loads(out.stdout)
    _shape(ev, "gen", path)
    assert ev["resident_fraction"] < 0.1 and "seconds" in ev, ev

    out = cli("prewarm", "gen")
    assert out.returncode == 0, out.stderr
    assert "gen: " + path in out.stdout and "(100.0 %)" in out.stdout, out.stdout

    out = cli("page-cache", "gen", "--json")
    assert out.returncode == 0, out.stderr
    pc = json.loads(out.stdout)
    _shape(pc, "gen", path)
    assert pc["resident_fraction"] >= 0.99, pc
    _agrees(pc, path)

    out = cli("page-cache", "nope")
    assert out.returncode == 1 and "404" in out.stderr and "model_not_found" in out.stderr, out


def test_errors(hearth, gen300, tmp_path):
    missing = str(tmp_path / "models" / "missing.gguf")
    h = hearth([_gen_model(hearth, gen300),
                hearth.smol("gone", model_path=missing),
                hearth.fake("fake", "never-ready")],
               api_keys=[KEY])
    for method, suffix in (("GET", "page-cache"), ("POST", "prewarm"), ("POST", "page-cache/evict")):
        url = f"/hearth/v1/models/%s/{suffix}"
        # unknown model: 404 like the rest of the API
        assert_error(h.http.request(method, url % "nope"), 404, "model_not_found")
        # the weights file is missing: 409, naming the file
        err = assert_error(h.http.request(method, url % "gone", timeout=60), 409, "no_model_file")
        assert missing in err["message"] and "gone" in err["message"], err
        # a command runtime without model_path: 409, saying so
        err = assert_error(h.http.request(method, url % "fake", timeout=60), 409, "no_model_file")
        assert "model_path" in err["message"], err
        # behind server.api_keys like the other admin routes
        r = httpx.request(method, h.base_url + url % "gen", timeout=10)
        assert_error(r, 401, "invalid_api_key")
    # nothing was started by any of this
    for m in h.status()["models"]:
        assert m["starts_total"] == 0, m
