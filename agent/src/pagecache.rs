//! The page-cache warm tier of a model's weights file: how much of it the kernel holds in RAM
//! ([`residency`], from `mincore` over a read-only shared mapping), loading it there before the
//! runtime needs it ([`prewarm`]: `posix_fadvise(WILLNEED)`, then blocking reads of whatever is
//! still missing) and dropping it again ([`evict`]: `posix_fadvise(DONTNEED)`).
//!
//! llama-server maps the GGUF file and touches every weight while it warms up, so a start after a
//! prewarm reads from RAM instead of the disk.
//!
//! Limits, from the kernel:
//! - `mincore` tells the page-cache state of a file only to a process that owns it, may write it,
//!   or has `CAP_FOWNER` (root); to others it claims every page is resident. [`residency`] refuses
//!   (error, `PermissionDenied`) instead of reporting that.
//! - `DONTNEED` drops only clean pages that no process maps: a file a running runtime maps stays
//!   resident (unload the model first), and dirty pages are written back, not dropped ([`evict`]
//!   asks for the write-back first, so a second evict can drop them).
//! - A file larger than the memory the kernel can give the cache cannot be held whole: [`prewarm`]
//!   then stops when a pass over the missing pages no longer makes progress and reports what stayed.
//!
//! Every function blocks (a prewarm reads the whole file): call them from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Bytes of a file the page cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Residency {
    pub file_bytes: u64,
    pub resident_bytes: u64,
}

impl Residency {
    /// `resident_bytes / file_bytes`; 1 for an empty file (nothing is missing).
    pub fn fraction(&self) -> f64 {
        if self.file_bytes == 0 {
            1.0
        } else {
            self.resident_bytes as f64 / self.file_bytes as f64
        }
    }
}

/// A page-cache operation on `path` failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct PageCacheError {
    pub path: PathBuf,
    /// What was being done ("opening", "reading", "mincore on", ...).
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl PageCacheError {
    fn new(path: &Path, op: &'static str, source: impl Into<io::Error>) -> PageCacheError {
        PageCacheError {
            path: path.to_path_buf(),
            op,
            source: source.into(),
        }
    }

    /// The file does not exist (or a directory on its path does not).
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }

    /// The path exists but is not a regular file (a directory, a device, ...).
    pub fn is_not_a_file(&self) -> bool {
        self.op == NOT_A_FILE
    }
}

const NOT_A_FILE: &str = "not a regular file:";

/// Pages per `mincore` call (and per mapping): 1 GiB of 4 KiB pages, a 256 KiB vector.
const WINDOW_PAGES: u64 = 1 << 18;
/// Size of each blocking read of [`prewarm`].
const READ_CHUNK: usize = 8 << 20;
/// Passes of [`prewarm`] over the pages still missing, at most.
const MAX_PASSES: u32 = 3;

/// How much of `path` is in the page cache now. Touches none of its pages.
pub fn residency(path: &Path) -> Result<Residency, PageCacheError> {
    let f = Opened::open(path)?;
    let scan = f.scan(false)?;
    Ok(f.residency(&scan))
}

/// Loads `path` into the page cache and returns when it is resident: asks the kernel to read it
/// ahead (`POSIX_FADV_WILLNEED`, whole file), then reads, in 8 MiB blocking reads, every range
/// `mincore` still reports missing, and checks again (up to 3 passes). When memory is short and a
/// pass gains nothing, it returns what is resident. Returns the residency after.
pub fn prewarm(path: &Path) -> Result<Residency, PageCacheError> {
    let f = Opened::open(path)?;
    if f.len == 0 {
        return Ok(f.residency(&Scan::default()));
    }
    // Offset 0, length 0: the whole file. The kernel starts the reads and returns.
    posix_fadvise(&f.file, 0, 0, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
        .map_err(|e| PageCacheError::new(path, "posix_fadvise(WILLNEED) on", e))?;
    let mut scan = f.scan(true)?;
    let mut buf = vec![0u8; READ_CHUNK];
    for _ in 0..MAX_PASSES {
        if scan.missing.is_empty() {
            break;
        }
        for &(start, end) in &scan.missing {
            f.read_range(start, end, &mut buf)?;
        }
        let after = f.scan(true)?;
        let progress = after.resident_bytes > scan.resident_bytes;
        scan = after;
        if !progress {
            break;
        }
    }
    Ok(f.residency(&scan))
}

/// Drops `path` from the page cache (`POSIX_FADV_DONTNEED`, after asking for the write-back of
/// its dirty pages). Pages a running process maps stay. Returns the residency after.
pub fn evict(path: &Path) -> Result<Residency, PageCacheError> {
    let f = Opened::open(path)?;
    if f.len == 0 {
        return Ok(f.residency(&Scan::default()));
    }
    // Best effort: DONTNEED skips dirty pages, so write them back first. A file that cannot be
    // synced (a read-only filesystem has no dirty pages anyway) is still advised.
    let _ = f.file.sync_data();
    posix_fadvise(&f.file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| PageCacheError::new(path, "posix_fadvise(DONTNEED) on", e))?;
    let scan = f.scan(false)?;
    Ok(f.residency(&scan))
}

#[derive(Default)]
struct Scan {
    resident_bytes: u64,
    /// Byte ranges `[start, end)` not resident, in order (only when asked for).
    missing: Vec<(u64, u64)>,
}

struct Opened<'a> {
    path: &'a Path,
    file: File,
    len: u64,
    page: u64,
}

impl<'a> Opened<'a> {
    fn open(path: &'a Path) -> Result<Opened<'a>, PageCacheError> {
        let file = File::open(path).map_err(|e| PageCacheError::new(path, "opening", e))?;
        let meta = file
            .metadata()
            .map_err(|e| PageCacheError::new(path, "stat of", e))?;
        if !meta.is_file() {
            return Err(PageCacheError::new(
                path,
                NOT_A_FILE,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only a file's pages can be cached",
                ),
            ));
        }
        // The kernel answers mincore truthfully only to the owner, a writer or CAP_FOWNER (see the
        // module documentation); to anyone else every page looks resident.
        let euid = nix::unistd::geteuid();
        if !euid.is_root()
            && euid.as_raw() != meta.uid()
            && nix::unistd::eaccess(path, nix::unistd::AccessFlags::W_OK).is_err()
        {
            return Err(PageCacheError::new(
                path,
                "mincore on",
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the kernel reports page-cache residency only to the file's owner (uid {}), \
                         a process that may write it, or root; this process is uid {euid}",
                        meta.uid()
                    ),
                ),
            ));
        }
        let page = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            Ok(Some(p)) if p > 0 => p as u64,
            Ok(_) => 4096,
            Err(e) => return Err(PageCacheError::new(path, "page size for", e)),
        };
        Ok(Opened {
            path,
            file,
            len: meta.len(),
            page,
        })
    }

    fn residency(&self, scan: &Scan) -> Residency {
        Residency {
            file_bytes: self.len,
            resident_bytes: scan.resident_bytes.min(self.len),
        }
    }

    /// `mincore` over the file, one window of [`WINDOW_PAGES`] at a time.
    fn scan(&self, want_missing: bool) -> Result<Scan, PageCacheError> {
        let mut scan = Scan::default();
        let window = WINDOW_PAGES * self.page;
        let mut vec = Vec::new();
        let mut off = 0u64;
        while off < self.len {
            let wlen = window.min(self.len - off);
            let pages = wlen.div_ceil(self.page);
            vec.clear();
            vec.resize(pages as usize, 0u8);
            self.mincore(off, wlen, &mut vec)?;
            for (i, &v) in vec.iter().enumerate() {
                let start = off + i as u64 * self.page;
                let end = (start + self.page).min(self.len);
                if v & 1 == 1 {
                    scan.resident_bytes += end - start;
                } else if want_missing {
                    match scan.missing.last_mut() {
                        Some(last) if last.1 == start => last.1 = end,
                        _ => scan.missing.push((start, end)),
                    }
                }
            }
            off += wlen;
        }
        Ok(scan)
    }

    /// Fills `vec` (one byte per page) with the residency of the `len` bytes at `off` (`off` a
    /// multiple of the page size, `len` > 0).
    fn mincore(&self, off: u64, len: u64, vec: &mut [u8]) -> Result<(), PageCacheError> {
        let err = |op, e: nix::errno::Errno| PageCacheError::new(self.path, op, e);
        let too_big = |_| {
            PageCacheError::new(
                self.path,
                "mapping",
                io::Error::new(io::ErrorKind::InvalidInput, "range too large"),
            )
        };
        let length =
            NonZeroUsize::new(usize::try_from(len).map_err(too_big)?).ok_or_else(|| {
                PageCacheError::new(
                    self.path,
                    "mapping",
                    io::Error::new(io::ErrorKind::InvalidInput, "empty range"),
                )
            })?;
        let offset = libc::off_t::try_from(off).map_err(too_big)?;
        // SAFETY: a fresh read-only shared mapping at an address the kernel picks, so it aliases
        // no Rust object. It is never dereferenced (only passed to mincore and munmap below), so
        // the file changing or shrinking under it cannot cause a fault in this process.
        let addr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                &self.file,
                offset,
            )
        }
        .map_err(|e| err("mapping", e))?;
        debug_assert!(vec.len() as u64 >= len.div_ceil(self.page));
        // SAFETY: `addr` is the page-aligned start of a live mapping of `len` bytes, and `vec` is
        // writable for at least ceil(len / page size) bytes, which is all mincore writes. mincore
        // only reads page tables and the page cache; it touches neither the mapping's memory nor
        // anything else of ours.
        let rc = unsafe { libc::mincore(addr.as_ptr(), length.get(), vec.as_mut_ptr()) };
        let mincore_err = (rc != 0).then(nix::errno::Errno::last);
        // SAFETY: `addr`/`length` are exactly the mapping created above, unmapped once; no
        // reference into it exists.
        let unmapped = unsafe { munmap(addr, length.get()) };
        if let Some(e) = mincore_err {
            return Err(err("mincore on", e));
        }
        unmapped.map_err(|e| err("unmapping", e))
    }

    /// Reads `[start, end)` into `buf`, chunk by chunk, discarding the data (the point is the page
    /// cache filling up). Stops early at end of file (the file shrank).
    fn read_range(&self, start: u64, end: u64, buf: &mut [u8]) -> Result<(), PageCacheError> {
        let mut pos = start;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            match self.file.read_at(&mut buf[..want], pos) {
                Ok(0) => break,
                Ok(n) => pos += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PageCacheError::new(self.path, "reading", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A scratch directory on a disk filesystem (the target directory): on tmpfs DONTNEED cannot
    /// drop anything, so the evict test would mean nothing there.
    fn scratch() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pagecache-tests");
        std::fs::create_dir_all(&base).expect("creating the scratch directory");
        tempfile::tempdir_in(&base).expect("tempdir")
    }

    fn write_file(dir: &Path, name: &str, len: usize) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).expect("create");
        let mut block = vec![0u8; 1 << 20];
        let mut x: u32 = 0x1234_5678;
        for b in block.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len());
            f.write_all(&block[..n]).expect("write");
            left -= n;
        }
        // Clean pages: DONTNEED cannot drop dirty ones.
        f.sync_all().expect("sync");
        p
    }

    #[test]
    fn evict_then_prewarm_makes_the_file_resident() {
        let dir = scratch();
        let len = 64 << 20;
        let p = write_file(dir.path(), "w.bin", len);
        let after_evict = evict(&p).expect("evict");
        assert_eq!(after_evict.file_bytes, len as u64);
        assert!(
            after_evict.resident_bytes < len as u64 / 4,
            "evict left {} of {len} bytes resident",
            after_evict.resident_bytes
        );
        assert_eq!(residency(&p).expect("residency"), after_evict);

        let warm = prewarm(&p).expect("prewarm");
        assert_eq!(
            warm,
            Residency {
                file_bytes: len as u64,
                resident_bytes: len as u64
            }
        );
        assert_eq!(residency(&p).expect("residency"), warm);
        assert_eq!(warm.fraction(), 1.0);

        let again = evict(&p).expect("evict");
        assert!(again.resident_bytes < len as u64 / 4, "{again:?}");
    }

    #[test]
    fn partial_last_page_counts_only_the_file_bytes() {
        let dir = scratch();
        let p = write_file(dir.path(), "odd.bin", 3 * 4096 + 123);
        evict(&p).expect("evict");
        let r = prewarm(&p).expect("prewarm");
        assert_eq!(r.file_bytes, 3 * 4096 + 123);
        assert_eq!(r.resident_bytes, r.file_bytes);
    }

    #[test]
    fn empty_file() {
        let dir = scratch();
        let p = dir.path().join("empty");
        File::create(&p).expect("create");
        let zero = Residency {
            file_bytes: 0,
            resident_bytes: 0,
        };
        assert_eq!(residency(&p).expect("residency"), zero);
        assert_eq!(prewarm(&p).expect("prewarm"), zero);
        assert_eq!(evict(&p).expect("evict"), zero);
        assert_eq!(zero.fraction(), 1.0);
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = scratch();
        let p = dir.path().join("nope.gguf");
        for e in [
            residency(&p).expect_err("missing"),
            prewarm(&p).expect_err("missing"),
            evict(&p).expect_err("missing"),
        ] {
            assert!(e.is_not_found(), "{e:?}");
            assert_eq!(e.path, p);
            let msg = e.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.starts_with("opening "), "{msg}");
        }
    }

    #[test]
    fn directory_is_not_a_file() {
        let dir = scratch();
        let e = prewarm(dir.path()).expect_err("a directory");
        assert!(e.is_not_a_file(), "{e:?}");
        assert!(!e.is_not_found());
        assert!(
            e.to_string().contains(&dir.path().display().to_string()),
            "{e}"
        );
    }
}
