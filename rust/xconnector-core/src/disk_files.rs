//! Block files on disk, opened as untrusted: never through a link, never blocking, only when they
//! are regular files of exactly the expected size, and never read past that size. A FIFO, device,
//! link or directory where a block file should be is refused at once instead of hanging a load.
//!
//! Writes go to a temporary file named after the writing process and renamed into place, and are
//! not fsynced: the tier is a cache, and what a power loss can leave (a renamed file with missing
//! or stale data, a lost rename, a temporary file) fails the size or checksum check and is removed,
//! at the next start or at the next read, never served.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

/// What opening a block file found.
pub enum Found {
    /// A regular file of the expected size, opened for reading.
    File(fs::File),
    /// Nothing there (or it went away).
    Missing,
    /// Something that is not a block file of this size: a link, FIFO, device, directory, or a
    /// regular file of another size.
    NotABlock,
    /// Could not be opened for a reason that says nothing about the file (out of descriptors,
    /// memory, permission): a miss, and the file is left alone.
    Unreadable,
}

/// Opens `path` for reading if it is a regular file of exactly `len` bytes.
pub fn open_block(path: &Path, len: u64) -> Found {
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        // ELOOP: a symbolic link (O_NOFOLLOW); ENXIO/ENODEV: a socket or device.
        Err(e) if is_not_a_file(&e) => return Found::NotABlock,
        Err(_) => return Found::Unreadable,
    };
    match file.metadata() {
        Ok(m) if m.file_type().is_file() && m.len() == len => Found::File(file),
        _ => Found::NotABlock,
    }
}

#[cfg(unix)]
fn is_not_a_file(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO | libc::ENODEV | libc::EISDIR))
}

#[cfg(not(unix))]
fn is_not_a_file(_e: &std::io::Error) -> bool {
    false
}

/// Reads exactly `head.len() + body.len()` bytes; false if the file is shorter (it was truncated
/// after it was opened).
pub fn read_block(mut file: fs::File, head: &mut [u8], body: &mut [u8]) -> bool {
    file.read_exact(head).is_ok() && file.read_exact(body).is_ok()
}

/// Whether `len` bytes could be a block file: a regular file (not followed if a link).
pub fn is_block_file(path: &Path, len: u64) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file() && m.len() == len)
}

/// This process's temporary-file prefix: `.tmp-<pid>-<start>-`. The start time tells this
/// process's files from those of an earlier process that had the same pid (a restarted
/// container's worker usually does).
/// The pid is read on every call: a forked child writes under its own.
fn tmp_prefix() -> String {
    static START: OnceLock<u128> = OnceLock::new();
    let start =
        START.get_or_init(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!(".tmp-{}-{start:x}-", std::process::id())
}

/// Writes `header` and `data` to a new temporary file in `dir` with `mode`, then renames it to
/// `path`: readers see the whole file or none. The temporary file is removed on failure.
pub fn write_block(dir: &Path, path: &Path, mode: u32, header: &[u8], data: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!("{}{}", tmp_prefix(), SEQ.fetch_add(1, Relaxed)));
    let write = || -> std::io::Result<()> {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        opts.mode(mode).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp)?;
        f.write_all(header)?;
        f.write_all(data)?;
        drop(f);
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Temporary files left by a writer that is gone: another process that no longer runs, an earlier
/// process with this pid, or any writer that has been at it for over a minute (a block takes
/// milliseconds; this also covers writers in another pid namespace sharing the directory).
pub fn is_stale_tmp(name: &str, meta: &fs::Metadata) -> bool {
    let Some(rest) = name.strip_prefix(".tmp-") else { return false };
    let old = meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(60));
    if old {
        return true;
    }
    let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
    match pid {
        Some(pid) if pid as u32 == std::process::id() => !name.starts_with(&tmp_prefix()),
        Some(pid) => !process_alive(pid),
        None => true, // not a name we write: a leftover of some other kind
    }
}

#[cfg(unix)]
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_pid: i32) -> bool {
    true
}

/// Whether a write failed because the filesystem (or the user's quota) is full.
pub fn is_full(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
    #[cfg(not(unix))]
    {
        e.kind() == std::io::ErrorKind::StorageFull
    }
}

/// Bytes an unprivileged user can still write on the filesystem holding `dir`.
#[cfg(unix)]
pub fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; a zeroed one is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid statvfs to write into.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
pub fn available_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// Whether a directory entry is something other than a regular file or directory (a FIFO, a
/// socket, a device), which the tier never opens.
#[cfg(unix)]
pub fn is_special(t: &fs::FileType) -> bool {
    t.is_fifo() || t.is_socket() || t.is_block_device() || t.is_char_device()
}

#[cfg(not(unix))]
pub fn is_special(_t: &fs::FileType) -> bool {
    false
}
