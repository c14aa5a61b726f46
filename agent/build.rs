//! Embeds hearth's eBPF object (built by `cargo xtask build-ebpf` into `target/ebpf/hearth-ebpf.o`,
//! or named by `HEARTH_EBPF_OBJECT`) as `OUT_DIR/hearth-ebpf.o`. Without it an empty file is
//! embedded and `HEARTH_EBPF_BUILT=0` tells the sensor that hearth was built without its eBPF
//! programs, so a plain `cargo build` works without the eBPF toolchain.
//!
//! Change tracking: cargo treats a `rerun-if-changed` path that does not exist as always changed,
//! which would rerun this script and recompile hearth on every build of a checkout without the
//! object. So the default object's directory, `target/ebpf/` (which holds nothing else), is created
//! when missing and watched instead: xtask's atomic replace of the object changes it. The
//! embedded copy is only rewritten when its bytes change.

use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    println!("cargo:rerun-if-env-changed=HEARTH_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bytes = match env::var_os("HEARTH_EBPF_OBJECT").filter(|v| !v.is_empty()) {
        Some(object) => {
            let object = PathBuf::from(object);
            println!("cargo:rerun-if-changed={}", object.display());
            fs::read(&object).unwrap_or_else(|e| {
                panic!(
                    "HEARTH_EBPF_OBJECT={}: cannot read it: {e}",
                    object.display()
                )
            })
        }
        None => {
            let dir = manifest.join("../target/ebpf");
            let object = dir.join("hearth-ebpf.o");
            // Best effort: if the directory cannot be created, watch the object itself (and rerun
            // on every build while it is missing).
            let watched: &Path = if fs::create_dir_all(&dir).is_ok() {
                &dir
            } else {
                &object
            };
            println!("cargo:rerun-if-changed={}", watched.display());
            fs::read(&object).unwrap_or_default()
        }
    };
    println!(
        "cargo:rustc-env=HEARTH_EBPF_BUILT={}",
        if bytes.is_empty() { 0 } else { 1 }
    );
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("hearth-ebpf.o");
    if fs::read(&out).ok().as_deref() != Some(bytes.as_slice()) {
        if let Err(e) = fs::write(&out, &bytes) {
            panic!("writing {}: {e}", out.display());
        }
    }
}
