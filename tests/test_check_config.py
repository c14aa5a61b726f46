"""`hearth check-config`: every problem at once as `FILE: <key path>: <reason>` (a key in a model entry
also names the model's id: `models[1] (b).memory_mb`), exit 1; a good file exits 0.
`hearth run` refuses a bad file."""
import re
import subprocess

import pytest


def _good(tmp_path, llama, model_path):
    return f'''
[server]
listen = "127.0.0.1:18999"
api_keys = ["sk-a"]

[resources]
host_memory_mb = 600

[runtimes]
llama_server = "{llama}"

[[models]]
id = "a"
aliases = ["alpha"]
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 300
keep_warm = "5m"
queue = {{ max = 4, timeout = "30s" }}

[[models]]
id = "b"
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 300
'''


def test_check_config_good_file(env, smol_model, tmp_path):
    cfg = tmp_path / "good.toml"
    cfg.write_text(_good(tmp_path, env["llama_server"], smol_model))
    out = subprocess.run([env["hearth_bin"], "check-config", str(cfg)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"good config rejected:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip() or out.stderr.strip(), "check-config should print a summary on success"


BAD = '''
[server]
listen = "127.0.0.1:18999"

[resources]
host_memory_mb = 600

[runtimes]
llama_server = "{llama}"

[[models]]
id = "a"
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 300
keep_warm = "5 parsecs"
bogus_key = 1

[[models]]
id = "b"
aliases = ["a"]
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 900

[[models]]
id = "a"
runtime = "llama-cpp"
model_path = "{model_path}"
memory_mb = 100
'''

# (what, key-path regex, reason regex): each must appear on one line together with the file name
PROBLEMS = [
    ("unknown key", r"models\[0\]( \(a\))?\.bogus_key", r"unknown key"),
    ("bad duration", r"models\[0\] \(a\)\.keep_warm", r"invalid duration.*parsecs"),
    ("alias colliding with an id", r"models\[1\] \(b\)\.aliases\[0\]", r'duplicate name "a"'),
    ("model larger than pool", r"models\[1\] \(b\)\.memory_mb", r"900 MB does not fit"),
    ("duplicate id", r"models\[2\] \(a\)\.id", r'duplicate name "a"'),
]


def test_check_config_reports_every_problem(env, smol_model, tmp_path):
    cfg = tmp_path / "broken-demo.toml"
    cfg.write_text(BAD.format(llama=env["llama_server"], model_path=smol_model))
    out = subprocess.run([env["hearth_bin"], "check-config", str(cfg)], capture_output=True, text=True,
                         timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 1, f"exit {out.returncode}, expected 1:\n{text}"
    lines = text.splitlines()
    missing = []
    for what, key_re, reason_re in PROBLEMS:
        ok = [l for l in lines if "broken-demo.toml" in l and re.search(key_re, l)
              and re.search(reason_re, l, re.I)]
        if not ok:
            missing.append(what)
    assert not missing, f"check-config did not report: {missing}\noutput:\n{text}"
    # one problem per line, format FILE: key path: reason
    fmt = [l for l in lines if re.match(r"^\S*broken-demo\.toml: models\[\d\][^:]*: .+", l)]
    assert len(fmt) >= len(PROBLEMS), f"expected >= {len(PROBLEMS)} 'FILE: key: reason' lines:\n{text}"


def test_run_refuses_bad_config(env, smol_model, tmp_path):
    cfg = tmp_path / "broken-demo.toml"
    cfg.write_text(BAD.format(llama=env["llama_server"], model_path=smol_model))
    try:
        out = subprocess.run([env["hearth_bin"], "run", "--config", str(cfg)], capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("`hearth run` with an invalid config kept running")
    assert out.returncode != 0
    assert "broken-demo.toml" in out.stdout + out.stderr
