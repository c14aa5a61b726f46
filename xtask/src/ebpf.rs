//! `cargo xtask build-ebpf`: the kernel programs of `agent-ebpf/` (package `hearth-ebpf`) as one BPF
//! object, `target/ebpf/hearth-ebpf.o`, which `agent/build.rs` embeds into hearth.
//!
//! Building Rust for `bpfel-unknown-none` needs a toolchain with the standard library's source (for
//! `-Z build-std=core`) and `bpf-linker` built against that toolchain's LLVM. Two ways to get them:
//!
//! - the usual aya setup of a developer's machine: a rustup nightly with the `rust-src` component and a
//!   `bpf-linker` on PATH (or in `~/.cargo/bin`); used when present;
//! - otherwise Debian's `rustc-web` (a newer rustc than Debian's own, built on Debian's LLVM) with its
//!   matching `rust-web-src`, linked into rustup as the toolchain `debian-web`, and `bpf-linker`
//!   installed with cargo against the `llvm-<major>-dev` package of that LLVM. rustup's own toolchains
//!   cannot be used on our machines: rustup cannot download `rust-src` there. The Debian packages are
//!   installed only as root; otherwise the error names the commands to run.
//!
//! Every step checks the thing itself first (dpkg's database, rustup's toolchain list, cargo's record of
//! installed crates), so a second run costs a few process starts plus cargo's incremental build. The
//! object is replaced atomically and only when its bytes change, so hearth is not rebuilt needlessly.
//!
//! `HEARTH_SKIP_EBPF=1` skips all of it (hearth then embeds an empty object and runs without its
//! sensor); `HEARTH_EBPF_TOOLCHAIN=NAME` uses that rustup toolchain (it must have rust-src; bpf-linker
//! must be on PATH) instead of choosing one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{self, done, step};

/// The bpf-linker release we build against Debian's LLVM (0.13 supports LLVM 22 via `--features llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name under which Debian's rustc-web (installed in /usr) is linked.
const DEBIAN_TOOLCHAIN: &str = "debian-web";
/// rust-web-clippy: `cargo xtask lint` runs clippy on the BPF build too when it is there.
const DEBIAN_RUST_PACKAGES: &[&str] =
    &["rustc-web", "rust-web-src", "cargo-web", "rust-web-clippy"];
const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "hearth-ebpf";

/// The embedded object, relative to the workspace root (agent/build.rs reads the same path).
pub const OBJECT: &str = "target/ebpf/hearth-ebpf.o";
/// The benchmark's control object (feature `control` of agent-ebpf: the cgroup_skb programs only
/// return 1), relative to the workspace root. Never embedded.
pub const CONTROL_OBJECT: &str = "target/ebpf-control/hearth-ebpf-control.o";
/// cargo's target directory for the BPF build (kept apart from `target/ebpf/`, which agent/build.rs
/// watches, and from the host builds, which use another toolchain).
const BUILD_DIR: &str = "target/ebpf-build";

/// A toolchain that can build for `bpfel-unknown-none`.
struct Toolchain {
    /// rustup toolchain name.
    name: String,
    /// Directory of the `bpf-linker` to use (put first on PATH), when not already on PATH.
    linker_dir: Option<PathBuf>,
}

/// `cargo xtask build-ebpf`, and the first step of `setup`: the toolchain, then the object. Returns the
/// object's path, or `None` when skipped by `HEARTH_SKIP_EBPF=1`.
pub fn build(root: &Path) -> Result<Option<PathBuf>> {
    if std::env::var_os("HEARTH_SKIP_EBPF").is_some_and(|v| v == "1") {
        eprintln!(
            "xtask: ebpf: HEARTH_SKIP_EBPF=1: NOT building the eBPF object; hearth will embed {} \
             as it is (or an empty object) and run without its sensor",
            OBJECT
        );
        return Ok(None);
    }
    let toolchain = ensure_toolchain(root)?;
    compile(root, &toolchain, None, OBJECT).map(Some)
}

/// `cargo xtask build-ebpf --control`: the benchmark's control object ([`CONTROL_OBJECT`], outside
/// `target/ebpf/`, which agent/build.rs watches): the same programs with the packet path left out,
/// so that `bench sensor` can measure what the kernel's cgroup hook costs by itself.
pub fn build_control(root: &Path) -> Result<PathBuf> {
    let toolchain = ensure_toolchain(root)?;
    compile(root, &toolchain, Some("control"), CONTROL_OBJECT)
}

fn ensure_toolchain(root: &Path) -> Result<Toolchain> {
    if let Some(name) = std::env::var_os("HEARTH_EBPF_TOOLCHAIN").filter(|n| !n.is_empty()) {
        let name = name.to_string_lossy().into_owned();
        if !has_rust_src(&name) {
            bail!("ebpf: HEARTH_EBPF_TOOLCHAIN={name}: that rustup toolchain has no rust-src");
        }
        return Ok(Toolchain {
            name,
            linker_dir: find_bpf_linker().and_then(|p| p.parent().map(Path::to_path_buf)),
        });
    }
    // A developer's usual aya setup: nightly with rust-src, and a bpf-linker.
    if let Some(linker) = find_bpf_linker() {
        if has_rust_src("nightly") {
            return Ok(Toolchain {
                name: "nightly".into(),
                linker_dir: linker.parent().map(Path::to_path_buf),
            });
        }
    }
    debian_toolchain(root)
}

/// Debian's rustc-web with its source, linked into rustup, and bpf-linker for its LLVM.
fn debian_toolchain(root: &Path) -> Result<Toolchain> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "ebpf: rustup is not on PATH; the eBPF build needs rustup (a nightly with rust-src and \
             bpf-linker, or Debian's rustc-web linked as the toolchain {DEBIAN_TOOLCHAIN})"
        );
    }
    let mut apt = Apt::default();
    let missing = missing_packages(DEBIAN_RUST_PACKAGES);
    if !missing.is_empty() {
        // rustc-web and cargo-web replace Debian's own rustc and cargo packages: apt would remove them.
        let own: Vec<&str> = ["rustc", "cargo"]
            .into_iter()
            .filter(|p| missing_packages(&[*p]).is_empty())
            .collect();
        if !own.is_empty() {
            bail!(
                "ebpf: Debian's {} package(s) are installed, and {} would replace them; not doing \
                 that behind your back. Either install them yourself (apt-get install {}) or use a \
                 nightly with rust-src and bpf-linker; HEARTH_SKIP_EBPF=1 builds hearth without its \
                 sensor",
                own.join(" and "),
                missing.join(" "),
                missing.join(" ")
            );
        }
        // The LLVM dev package too when apt can tell which LLVM rustc-web uses (checked against
        // `rustc -vV` below), so that it is one apt transaction and a non-root error names it.
        let mut packages = missing;
        if let Some(major) = predicted_llvm_major() {
            let dev = format!("llvm-{major}-dev");
            if !missing_packages(&[dev.as_str()]).is_empty() {
                packages.push(dev);
            }
        }
        apt.install(
            &packages,
            "Debian's rustc-web, the matching standard library source and LLVM's development files \
             (for bpf-linker)",
        )?;
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/core").is_dir() {
        bail!(
            "ebpf: rust-web-src is installed but /usr/lib/rustlib/src/rust/library/core is missing"
        );
    }

    let toolchains = util::output(
        "ebpf: rustup toolchain list",
        Command::new("rustup").args(["toolchain", "list"]),
    )?;
    if !toolchains
        .lines()
        .any(|l| l.split_whitespace().next() == Some(DEBIAN_TOOLCHAIN))
    {
        let t = step(&format!(
            "ebpf: rustup toolchain link {DEBIAN_TOOLCHAIN} /usr"
        ));
        util::run(
            "ebpf: rustup toolchain link",
            Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]),
        )?;
        done("ebpf: toolchain link", t, "linked");
    }

    let version = util::output(
        "ebpf: rustc version",
        Command::new("rustup").args(["run", DEBIAN_TOOLCHAIN, "rustc", "-vV"]),
    )?;
    let major = llvm_major(&version).with_context(|| {
        format!(
            "ebpf: no \"LLVM version: N.x\" line in `rustc +{DEBIAN_TOOLCHAIN} -vV`:\n{version}"
        )
    })?;
    let llvm_dev = format!("llvm-{major}-dev");
    if !missing_packages(&[llvm_dev.as_str()]).is_empty() {
        if !apt.available(&llvm_dev)? {
            bail!(
                "ebpf: rustc-web uses LLVM {major}, but no Debian package {llvm_dev} is available \
                 (`apt-cache policy {llvm_dev}`); bpf-linker must be built against the same LLVM \
                 major as rustc. Install LLVM {major}'s development files and set LLVM_PREFIX, or use a \
                 nightly with rust-src and bpf-linker"
            );
        }
        apt.install(
            std::slice::from_ref(&llvm_dev),
            &format!("LLVM {major}'s development files, to build bpf-linker"),
        )?;
    }

    let feature = format!("llvm-{major}");
    let linker = cargo_bin_dir().join("bpf-linker");
    if !(linker.is_file() && installed_with(&feature)) {
        let llvm_prefix = format!("/usr/lib/llvm-{major}");
        let t = step(&format!(
            "ebpf: cargo install bpf-linker {BPF_LINKER_VERSION} --features {feature} \
             (LLVM_PREFIX={llvm_prefix}; a few minutes, once)"
        ));
        util::run(
            "ebpf: cargo install bpf-linker",
            util::cargo()
                .current_dir(root)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--force",
                    "--no-default-features",
                    "--features",
                    &feature,
                ])
                .env("LLVM_PREFIX", &llvm_prefix),
        )?;
        if !linker.is_file() {
            bail!(
                "ebpf: cargo install bpf-linker succeeded but {} is missing (CARGO_INSTALL_ROOT?)",
                linker.display()
            );
        }
        done("ebpf: bpf-linker", t, "installed");
    }
    Ok(Toolchain {
        name: DEBIAN_TOOLCHAIN.into(),
        linker_dir: Some(cargo_bin_dir()),
    })
}

/// apt-get, run as root only, `apt-get update` at most once.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            let t = step("ebpf: apt-get update");
            util::run(
                "ebpf: apt-get update",
                Command::new("apt-get").args(["update", "-qq"]),
            )?;
            done("ebpf: apt-get update", t, "ok");
            self.updated = true;
        }
        Ok(())
    }

    fn install(&mut self, packages: &[String], what: &str) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "ebpf: building the eBPF programs needs {what}. As root, run\n    \
                 apt-get update && apt-get install -y {}\nthen `cargo xtask build-ebpf` again (it \
                 links the toolchain into rustup as {DEBIAN_TOOLCHAIN} and builds bpf-linker in \
                 ~/.cargo/bin). Or install a nightly with rust-src and bpf-linker; or set \
                 HEARTH_SKIP_EBPF=1 to build hearth without its sensor",
                packages.join(" ")
            );
        }
        self.update()?;
        let t = step(&format!("ebpf: apt-get install {}", packages.join(" ")));
        util::run(
            "ebpf: apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        done("ebpf: apt-get install", t, "installed");
        Ok(())
    }

    /// Whether apt knows a candidate version of `package` (after an update, when root).
    fn available(&mut self, package: &str) -> Result<bool> {
        if nix::unistd::geteuid().is_root() {
            self.update()?;
        }
        let policy = util::output(
            "ebpf: apt-cache policy",
            Command::new("apt-cache").args(["policy", package]),
        )?;
        Ok(policy
            .lines()
            .any(|l| l.trim_start().starts_with("Candidate:") && !l.contains("(none)")))
    }
}

/// The LLVM major rustc-web is built on, from apt's metadata (rustc-web -> libstd-rust-web-dev ->
/// libstd-rust-web-1.NN -> libllvmMM); `None` when that chain is not there.
fn predicted_llvm_major() -> Option<u32> {
    let depends = |package: &str| -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", package])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let find = |text: &str, prefix: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends: ")?;
            dep.starts_with(prefix).then(|| dep.to_string())
        })
    };
    let std = find(&depends("libstd-rust-web-dev")?, "libstd-rust-web-1")?;
    find(&depends(&std)?, "libllvm")?
        .strip_prefix("libllvm")?
        .parse()
        .ok()
}

/// Those of `packages` that dpkg does not list as installed.
fn missing_packages(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| {
                    o.status.success()
                        && String::from_utf8_lossy(&o.stdout).ends_with("install ok installed")
                })
        })
        .map(|p| p.to_string())
        .collect()
}

/// The LLVM major of a `rustc -vV` output ("LLVM version: 22.1.8").
fn llvm_major(version: &str) -> Option<u32> {
    version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
}

/// Whether `rustup run TOOLCHAIN` works and the toolchain has the standard library's source.
fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    out.status.success()
        && Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

/// `$CARGO_HOME/bin` (where `cargo install` puts binaries).
fn cargo_bin_dir() -> PathBuf {
    cargo_home().join("bin")
}

fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        }
    }
}

/// A `bpf-linker` on PATH or in `$CARGO_HOME/bin`.
fn find_bpf_linker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([cargo_bin_dir()])
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// Whether cargo's record of installed crates (`$CARGO_HOME/.crates2.json`) says bpf-linker
/// BPF_LINKER_VERSION was installed with exactly `--no-default-features --features FEATURE`.
fn installed_with(feature: &str) -> bool {
    let Ok(text) = fs::read_to_string(cargo_home().join(".crates2.json")) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let prefix = format!("bpf-linker {BPF_LINKER_VERSION} ");
    json.get("installs")
        .and_then(|i| i.as_object())
        .is_some_and(|installs| {
            installs.iter().any(|(id, info)| {
                id.starts_with(&prefix)
                    && info.get("no_default_features") == Some(&serde_json::Value::Bool(true))
                    && info.get("features") == Some(&serde_json::Value::Array(vec![feature.into()]))
            })
        })
}

/// `rustup run TOOLCHAIN cargo SUBCOMMAND --release --locked -p hearth-ebpf --target bpfel-unknown-none
/// -Z build-std=core`, in the workspace, with a clean environment for that toolchain.
fn bpf_cargo(root: &Path, toolchain: &Toolchain, subcommand: &str) -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args(["run", &toolchain.name, "cargo", subcommand])
        .args(["--release", "--locked", "-p", PACKAGE, "--target", TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join(BUILD_DIR))
        // Debian's rustc is a stable release: -Z build-std and the atomic intrinsics
        // (agent-ebpf/src/main.rs) need this; a nightly ignores it.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF in the object (bpf-linker emits it from the debug info).
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C link-arg=--btf",
        )
        // What the outer cargo/rustup put there belongs to the host toolchain, not to this build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    if let Some(dir) = &toolchain.linker_dir {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(dir.clone()).chain(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).context("ebpf: PATH with bpf-linker's directory")?,
        );
    }
    Ok(cmd)
}

/// Part of `cargo xtask lint`: clippy on the BPF build of agent-ebpf (the host build only sees a stub),
/// when a toolchain for it with clippy is already there (nothing is installed here). Returns whether
/// it ran.
pub fn clippy(root: &Path) -> Result<bool> {
    let candidates = [
        std::env::var("HEARTH_EBPF_TOOLCHAIN").unwrap_or_default(),
        "nightly".into(),
        DEBIAN_TOOLCHAIN.into(),
    ];
    let Some(name) = candidates.into_iter().find(|n| {
        !n.is_empty()
            && has_rust_src(n)
            && Command::new("rustup")
                .args(["run", n, "cargo", "clippy", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
    }) else {
        return Ok(false);
    };
    let toolchain = Toolchain {
        name,
        linker_dir: None,
    };
    // The programs as hearth embeds them, and the benchmark's control build.
    for features in [None, Some("control")] {
        let mut cmd = bpf_cargo(root, &toolchain, "clippy")?;
        if let Some(f) = features {
            cmd.args(["--features", f]);
        }
        cmd.args(["--", "-D", "warnings"]);
        util::run("clippy (bpf)", &mut cmd)?;
    }
    Ok(true)
}

/// `cargo build --release` of hearth-ebpf for bpfel-unknown-none (with `feature`, if any), then the
/// object into place at `dest` (relative to the workspace root).
fn compile(
    root: &Path,
    toolchain: &Toolchain,
    feature: Option<&str>,
    dest: &str,
) -> Result<PathBuf> {
    let features = feature
        .map(|f| format!(" --features {f}"))
        .unwrap_or_default();
    let t = step(&format!(
        "ebpf: cargo +{} build --release -p {PACKAGE} --target {TARGET} -Z build-std=core{features}",
        toolchain.name
    ));
    let mut cmd = bpf_cargo(root, toolchain, "build")?;
    if let Some(f) = feature {
        cmd.args(["--features", f]);
    }
    util::run("ebpf: cargo build", &mut cmd)?;
    let built = root
        .join(BUILD_DIR)
        .join(TARGET)
        .join("release")
        .join(PACKAGE);
    let object = root.join(dest);
    let new = util::read(&built)?;
    if !is_bpf_object(&new) {
        bail!(
            "ebpf: {} is not a little-endian BPF ELF object",
            built.display()
        );
    }
    if fs::read(&object).ok().as_deref() != Some(new.as_slice()) {
        if let Some(dir) = object.parent() {
            util::mkdir(dir)?;
        }
        util::write_atomic(&object, &new)?;
        done("ebpf", t, &format!("{dest} ({} bytes) updated", new.len()));
    } else {
        done("ebpf", t, &format!("{dest} unchanged"));
    }
    Ok(object)
}

/// ELF, 64-bit, little-endian, e_machine EM_BPF (247).
fn is_bpf_object(bytes: &[u8]) -> bool {
    bytes.len() > 20
        && bytes.starts_with(b"\x7fELF")
        && bytes[4] == 2
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 247
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_version() {
        let v = "rustc 1.96.0 (...)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                 release: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(llvm_major(v), Some(22));
        assert_eq!(llvm_major("rustc 1.96.0\n"), None);
    }

    #[test]
    fn bpf_object_check() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18..20].copy_from_slice(&247u16.to_le_bytes());
        assert!(is_bpf_object(&elf));
        elf[18] = 62; // x86-64
        assert!(!is_bpf_object(&elf));
        assert!(!is_bpf_object(b""));
    }
}
