//! Small helpers shared by the xtask subcommands: paths, running commands, hashing, stamps.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Paths of the development layout (docs/reference.md, "Development layout").
#[derive(Debug, Clone)]
pub struct Dev {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Dev {
    /// `.hearth-dev/` at the repository root, or `$HEARTH_DEV_DIR` (made absolute).
    pub fn locate() -> Result<Self> {
        let root = repo_root();
        let dir = match std::env::var_os("HEARTH_DEV_DIR") {
            Some(d) if !d.is_empty() => {
                let d = PathBuf::from(d);
                if d.is_absolute() {
                    d
                } else {
                    std::env::current_dir()
                        .context(
                            "HEARTH_DEV_DIR is relative and the current directory is unreadable",
                        )?
                        .join(d)
                }
            }
            _ => root.join(".hearth-dev"),
        };
        Ok(Self { root, dir })
    }
    /// True when the dev dir is the default one (`.hearth-dev/` at the repository root).
    pub fn is_default(&self) -> bool {
        self.dir == self.root.join(".hearth-dev")
    }
    pub fn venv(&self) -> PathBuf {
        self.dir.join("venv")
    }
    pub fn python(&self) -> PathBuf {
        self.dir.join("venv/bin/python")
    }
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn llama_server(&self) -> PathBuf {
        self.dir.join("bin/llama-server")
    }
    pub fn models(&self) -> PathBuf {
        self.dir.join("models")
    }
    /// Markers that let setup skip work already done.
    pub fn stamps(&self) -> PathBuf {
        self.dir.join(".stamps")
    }
}

/// The cargo that runs us (`$CARGO` under `cargo run`), else `cargo` from PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails, naming `step` and the command, unless it exits 0.
pub fn run(step: &str, cmd: &mut Command) -> Result<()> {
    let status = status(step, cmd)?;
    if !status.success() {
        bail!("{step}: `{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status (an error only if it cannot start).
pub fn status(step: &str, cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("{step}: cannot start `{}`", describe(cmd)))
}

/// Runs `cmd`, captures its output, fails (showing stderr) unless it exits 0; returns trimmed stdout.
pub fn output(step: &str, cmd: &mut Command) -> Result<String> {
    let out: Output = cmd
        .output()
        .with_context(|| format!("{step}: cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{step}: `{}` failed ({}):\n{}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Like `output`, but returns stdout and stderr together (some tools print their version on stderr).
pub fn output_all(step: &str, cmd: &mut Command) -> Result<String> {
    let out: Output = cmd
        .output()
        .with_context(|| format!("{step}: cannot start `{}`", describe(cmd)))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{step}: `{}` failed ({}):\n{text}",
            describe(cmd),
            out.status
        );
    }
    Ok(text.trim().to_string())
}

/// Hex sha256 of a file's content, computed by `python` (hashlib is far faster than an unoptimized
/// debug build of sha2, and xtask runs as a debug build).
pub fn sha256_file(python: &Path, path: &Path) -> Result<String> {
    output(
        &format!("sha256 of {}", path.display()),
        Command::new(python)
            .args([
                "-c",
                "import hashlib, sys\n\
                 h = hashlib.sha256()\n\
                 with open(sys.argv[1], 'rb') as f:\n\
                 \x20   for b in iter(lambda: f.read(1 << 20), b''): h.update(b)\n\
                 print(h.hexdigest())\n",
            ])
            .arg(path),
    )
}

/// Hex sha256 of some bytes.
pub fn sha256_bytes(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

pub fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create directory {}", path.display()))
}

/// Writes a file atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    fs::write(&tmp, content).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Copies a file (permissions included) atomically: to a temporary name beside `dst`, then rename.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    if let Some(dir) = dst.parent() {
        mkdir(dir)?;
    }
    let tmp = tmp_name(dst);
    fs::copy(src, &tmp)
        .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    fs::rename(&tmp, dst)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()))
}

/// A sibling temporary name for `path` (`.NAME.tmp-PID`).
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .unwrap_or(OsStr::new("file"))
        .to_string_lossy();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A marker file under `.stamps/`: its content says what produced the thing it vouches for.
pub struct Stamp {
    path: PathBuf,
}

impl Stamp {
    pub fn new(dev: &Dev, name: &str) -> Self {
        Self {
            path: dev.stamps().join(name),
        }
    }
    pub fn get(&self) -> Option<String> {
        fs::read_to_string(&self.path).ok()
    }
    pub fn set(&self, content: &str) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            mkdir(dir)?;
        }
        write_atomic(&self.path, content.as_bytes())
    }
}

/// Size and modification time of a file, as a short string (a cheap "unchanged since" check).
pub fn size_mtime(path: &Path) -> Option<String> {
    let m = fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{} {}.{:09}",
        m.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}

/// Prints a step heading and returns a timer for `done`.
pub fn step(name: &str) -> Instant {
    eprintln!("xtask: {name}");
    Instant::now()
}

pub fn done(name: &str, t: Instant, what: &str) {
    eprintln!("xtask: {name}: {what} ({:.1}s)", t.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(sha256_bytes(&[b"ab", b"c"]), sha256_bytes(&[b"a", b"bc"]));
        assert_eq!(sha256_bytes(&[b"x"]), sha256_bytes(&[b"x"]));
    }

    #[test]
    fn atomic_write_and_copy_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("xtask-util-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        mkdir(&dir).expect("mkdir");
        let a = dir.join("a");
        write_atomic(&a, b"hello").expect("write");
        copy_atomic(&a, &dir.join("sub/b")).expect("copy");
        assert_eq!(fs::read(dir.join("sub/b")).expect("read"), b"hello");
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}
