//! The `hearth` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use hearth::config::Config;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Keeps the right local LLMs warm behind one OpenAI-compatible endpoint"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run only the eBPF gateway sensor (on the gateway host), reporting to the agent at
    /// `[sensor] report_to`.
    Sensor {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration file and report every problem at once.
    CheckConfig { file: PathBuf },
    /// Show every model's state from the running daemon.
    Status(Remote),
    /// List the models the running daemon serves.
    Models(Remote),
    /// Show the gateway sessions the sensor sees.
    Sessions(Remote),
    /// Read a model's weights file into the page cache now (returns when it is resident), so that
    /// the next start reads it from RAM; --evict drops it from the page cache instead.
    Prewarm {
        /// The model (id or alias).
        model: String,
        /// Drop the file from the page cache (pages a running runtime maps stay).
        #[arg(long)]
        evict: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show how much of a model's weights file the page cache holds.
    PageCache {
        /// The model (id or alias).
        model: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Args)]
struct Remote {
    /// The daemon's configuration (gives its address and API key).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// The daemon's base URL (default: from --config, else http://127.0.0.1:8000).
    #[arg(long)]
    url: Option<String>,
    /// API key (default: the first of server.api_keys in --config).
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { file } => return check_config(&file),
        Cmd::Sensor { config } => sensor(&config),
        Cmd::Status(r) => remote(r, "/hearth/v1/status", print_status),
        Cmd::Models(r) => remote(r, "/v1/models", print_models),
        Cmd::Sessions(r) => remote(r, "/hearth/v1/sessions", print_sessions),
        Cmd::Prewarm {
            model,
            evict,
            remote: r,
        } => {
            let what = if evict { "page-cache/evict" } else { "prewarm" };
            let path = format!("/hearth/v1/models/{}/{what}", path_segment(&model));
            remote_call(r, http::Method::POST, &path, print_page_cache)
        }
        Cmd::PageCache { model, remote: r } => {
            let path = format!("/hearth/v1/models/{}/page-cache", path_segment(&model));
            remote(r, &path, print_page_cache)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One thread (the default): a request's handler, the supervisor and the upstream connection hand
/// off to each other without cross-thread wake-ups (see docs/architecture.md, Threads).
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    runtime(config.server.worker_threads)?.block_on(hearth::daemon::run(config))?;
    Ok(())
}

fn sensor(path: &Path) -> anyhow::Result<()> {
    let config = hearth::config::load_sensor(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    runtime(1)?.block_on(hearth::sensor::report::run(&config))?;
    Ok(())
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: ok: {} model(s), pool \"host\" {} MB, listening on {}",
                path.display(),
                c.models.len(),
                c.resources.host_memory_mb,
                c.server.listen
            );
            for m in &c.models {
                println!(
                    "  {} ({}): {} MB, context {}, concurrency {}{}",
                    m.id,
                    m.runtime.as_str(),
                    m.memory_mb,
                    m.context_length,
                    m.max_concurrency,
                    if m.aliases.is_empty() {
                        String::new()
                    } else {
                        format!(", aliases {}", m.aliases.join(", "))
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn remote(r: Remote, path: &str, print: fn(&Value)) -> anyhow::Result<()> {
    remote_call(r, http::Method::GET, path, print)
}

/// `name` as one URL path segment (percent-encoded but for unreserved characters).
fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn remote_call(
    r: Remote,
    method: http::Method,
    path: &str,
    print: fn(&Value),
) -> anyhow::Result<()> {
    let cfg = match &r.config {
        Some(p) => Some(Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let base = match (&r.url, &cfg) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(c)) => format!("http://{}", c.server.listen),
        (None, None) => "http://127.0.0.1:8000".to_string(),
    };
    let key = r.api_key.clone().or_else(|| {
        cfg.as_ref()
            .and_then(|c| c.server.api_keys.first().cloned())
    });
    let url = format!("{base}{path}");
    let body = runtime(1)?.block_on(async {
        let client: Client<_, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(k) = &key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Empty::new()).context("building the request")?;
        let resp = client
            .request(req)
            .await
            .with_context(|| format!("cannot reach hearth at {base} (is `hearth run` running?)"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        if !status.is_success() {
            bail!("{url}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        anyhow::Ok(bytes)
    })?;
    let v: Value = serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))?;
    if r.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print(&v);
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn mb(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{:.0}", b as f64 / 1048576.0))
        .unwrap_or_else(|| "-".into())
}

fn print_status(v: &Value) {
    let c = &v["confinement"];
    println!("confinement: {} ({})", s(&c["cgroups"]), s(&c["reason"]));
    let sensor = &v["sensor"];
    if sensor.is_object() {
        println!("sensor: {} ({})", s(&sensor["state"]), s(&sensor["reason"]));
    }
    println!("gpus: {}", s(&v["gpu"]["reason"]));
    for g in v["gpus"].as_array().into_iter().flatten() {
        let procs: Vec<String> = g["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "pid {} {} MB{}",
                    s(&p["pid"]),
                    mb(&p["used_bytes"]),
                    p["model"]
                        .as_str()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        println!(
            "gpu {} {}: {} MB total, budget {} MB, accounted {} MB, measured {} MB (others {} MB){}",
            s(&g["index"]),
            s(&g["name"]),
            mb(&g["memory_total_bytes"]),
            mb(&g["budget_bytes"]),
            mb(&g["used_bytes"]),
            mb(&g["measured_used_bytes"]),
            mb(&g["foreign_bytes"]),
            if procs.is_empty() {
                String::new()
            } else {
                format!("; {}", procs.join(", "))
            }
        );
    }
    if let Some(pools) = v["pools"].as_array() {
        for p in pools {
            println!(
                "pool {}: {} / {} MB used",
                s(&p["name"]),
                s(&p["used_mb"]),
                s(&p["capacity_mb"])
            );
        }
    }
    println!(
        "{:<20} {:<9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8}  LAST ERROR",
        "MODEL", "STATE", "PID", "MEM MB", "IN FLIGHT", "QUEUE", "STARTS", "LOAD S"
    );
    for m in v["models"].as_array().into_iter().flatten() {
        let err = m["last_error"]
            .as_str()
            .map(|e| e.lines().next().unwrap_or("").to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8}  {}",
            s(&m["id"]),
            s(&m["state"]),
            s(&m["pid"]),
            s(&m["memory_accounted_mb"]),
            s(&m["in_flight"]),
            s(&m["queue_depth"]),
            s(&m["starts_total"]),
            s(&m["last_load_seconds"]),
            err
        );
        let cg = &m["cgroup"];
        if cg.is_object() {
            let paths: Vec<String> = cg["path"].as_array().into_iter().flatten().map(s).collect();
            println!(
                "  {:<18} user {}; memory {} (resident {}) / peak {} / limit {} MB; cpu {} s; {} tasks; oom kills {}",
                "",
                s(&m["user"]),
                mb(&cg["memory_current_bytes"]),
                mb(&cg["resident_bytes"]),
                mb(&cg["memory_peak_bytes"]),
                mb(&cg["memory_limit_bytes"]),
                cg["cpu_seconds"]
                    .as_f64()
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "-".into()),
                s(&cg["pids"]),
                s(&cg["oom_kills"]),
            );
            println!("  {:<18} cgroup {}", "", paths.join(", "));
        }
        if let Some(w) = m["memory_warning"].as_str() {
            println!("  {:<18} warning: {w}", "");
        }
        if m["vram_mb"].as_u64().unwrap_or(0) > 0 {
            let gpus: Vec<String> = m["gpus"].as_array().into_iter().flatten().map(s).collect();
            println!(
                "  {:<18} tier {}; gpus [{}]; vram accounted {} MB (declared {}, observed {}), in use {} MB{}",
                "",
                s(&m["tier"]),
                gpus.join(","),
                mb(&m["vram_bytes"]),
                s(&m["vram_mb"]),
                s(&m["vram_observed_mb"]),
                mb(&m["vram_used_bytes"]),
                m["sleep_level"]
                    .as_u64()
                    .map(|l| format!(
                        "; sleep level {l} ({} MB host, {} MB vram asleep); sleeps {}, wakes {}",
                        s(&m["asleep_memory_mb"]),
                        s(&m["asleep_vram_mb"]),
                        s(&m["sleeps_total"]),
                        s(&m["wakes_total"])
                    ))
                    .unwrap_or_default()
            );
        }
        if let Some(w) = m["vram_warning"].as_str() {
            println!("  {:<18} warning: {w}", "");
        }
    }
}

fn ago(now_ms: u64, v: &Value) -> String {
    v.as_u64()
        .filter(|&t| t > 0)
        .map(|t| format!("{:.1}s ago", now_ms.saturating_sub(t) as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn print_sessions(v: &Value) {
    let now = hearth::sensor::unix_ms(std::time::SystemTime::now());
    let sensor = &v["sensor"];
    println!("sensor: {} ({})", s(&sensor["state"]), s(&sensor["reason"]));
    let lost = |src: &Value, name: &str| {
        if let Some(n) = src["events_lost_total"].as_u64().filter(|&n| n > 0) {
            println!("  {name}: {n} open/close events lost (the kernel's event ring was full)");
        }
    };
    lost(sensor, "local sensor");
    for r in v["remote_sensors"].as_array().into_iter().flatten() {
        lost(r, &format!("remote sensor {}", s(&r["name"])));
    }
    println!(
        "{:<36} {:<7} {:>12} {:>12} {:>12}  LAST INTERVAL (in/out)",
        "SESSION", "STATE", "BYTES IN", "BYTES OUT", "LAST ACTIVE"
    );
    for x in v["sessions"].as_array().into_iter().flatten() {
        let last = x["intervals"]
            .as_array()
            .and_then(|i| i.last())
            .map(|p| format!("{}/{}", s(&p[0]), s(&p[1])))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<36} {:<7} {:>12} {:>12} {:>12}  {}",
            s(&x["id"]),
            s(&x["state"]),
            s(&x["bytes_in"]),
            s(&x["bytes_out"]),
            ago(now, &x["last_activity_ms"]),
            last
        );
    }
    let channels = v["channels"].as_array().map(Vec::len).unwrap_or(0);
    if channels > 0 {
        println!("channels (the gateway's outbound connections):");
        for c in v["channels"].as_array().into_iter().flatten() {
            println!(
                "  {:<34} {:<7} {:>12} {:>12} {:>12}",
                s(&c["remote"]),
                s(&c["state"]),
                s(&c["bytes_in"]),
                s(&c["bytes_out"]),
                ago(now, &c["last_activity_ms"])
            );
        }
    }
}

fn print_page_cache(v: &Value) {
    let mib = |k: &str| {
        v[k].as_u64()
            .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into())
    };
    println!("{}: {}", s(&v["model"]), s(&v["path"]));
    let pct = v["resident_fraction"]
        .as_f64()
        .map(|f| format!("{:.1} %", f * 100.0))
        .unwrap_or_else(|| "-".into());
    print!(
        "  {} of {} in the page cache ({pct})",
        mib("resident_bytes"),
        mib("file_bytes")
    );
    match v["seconds"].as_f64() {
        Some(secs) => println!(", after {secs:.2} s"),
        None => println!(),
    }
}

fn print_models(v: &Value) {
    println!("{:<24} {:<10} {:>8}  ALIASES", "MODEL", "STATUS", "CONTEXT");
    for m in v["data"].as_array().into_iter().flatten() {
        let aliases: Vec<String> = m["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!(
            "{:<24} {:<10} {:>8}  {}",
            s(&m["id"]),
            s(&m["status"]),
            s(&m["context_length"]),
            aliases.join(", ")
        );
    }
}
