//! The disk tier's directory: created private, and trusted only when nobody else can write to it.
//!
//! KV reveals the prompts it came from, and a block file planted in the directory would be served
//! as KV (it passes the checksum, the attacker wrote both). So a private directory (the default)
//! must be owned by this user and writable by nobody else, and so must every subdirectory found
//! in it; otherwise the tier refuses to open (the engine runs without it). A directory that
//! several users' workers share on purpose is `shared`: group-writable and readable, trusted as
//! found (the group is then trusted with every prompt's KV).

use std::fs;
use std::path::{Path, PathBuf};

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};

use crate::error::{CoreError, Result};

/// Modes the tier creates: a private tier's directories 0700 and files 0600, a shared tier's
/// 0770 and 0640 (the group reads each other's blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    pub dir: u32,
    pub file: u32,
}

pub fn modes(shared: bool) -> Modes {
    if shared {
        Modes { dir: 0o770, file: 0o640 }
    } else {
        Modes { dir: 0o700, file: 0o600 }
    }
}

fn refused(dir: &Path, why: String) -> CoreError {
    CoreError::config(format!(
        "disk tier directory {}: {why}. Its blocks would be served as KV, so XConnector does not use it; \
         point local_disk at a fresh directory of your own, or set local_disk_shared: true if several \
         users' workers share it on purpose",
        dir.display()
    ))
}

/// Creates `dir` (and missing parents) and checks it can be trusted; returns its canonical path.
pub fn prepare(dir: &Path, shared: bool) -> Result<PathBuf> {
    create(dir, modes(shared).dir)?;
    // A symlink at the top is the user's choice (e.g. onto a larger disk); inside, none is followed.
    let real = fs::canonicalize(dir).map_err(|e| io(dir, "resolving", e))?;
    check(&real, shared)?;
    check_ancestors(&real)?;
    Ok(real)
}

/// Whoever can rename entries of an ancestor can swap the tier directory after it was checked:
/// no ancestor may be writable by others unless it is sticky (like /tmp).
#[cfg(unix)]
fn check_ancestors(real: &Path) -> Result<()> {
    for a in real.ancestors().skip(1) {
        let meta = fs::metadata(a).map_err(|e| io(a, "reading", e))?;
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(refused(
                real,
                format!(
                    "its parent {} is writable by every user (mode {:04o}, not sticky)",
                    a.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_ancestors(_real: &Path) -> Result<()> {
    Ok(())
}

/// Creates `dir` (and missing parents) with the tier's mode; an existing one is left as it is.
pub fn create(dir: &Path, mode: u32) -> Result<()> {
    let existed = dir.exists();
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(mode);
    b.create(dir).map_err(|e| io(dir, "creating", e))?;
    if !existed {
        set_mode(dir, mode).map_err(|e| io(dir, "setting the mode of", e))?;
    }
    Ok(())
}

/// The umask would take a shared tier's group write bit away.
pub fn set_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, mode);
        Ok(())
    }
}

fn io(dir: &Path, what: &str, e: std::io::Error) -> CoreError {
    CoreError::Io { context: format!("{what} the disk tier directory {}", dir.display()), source: e }
}

/// Whether a directory found in the tree (not followed if it is a link) can be trusted.
#[cfg(unix)]
pub fn check(dir: &Path, shared: bool) -> Result<()> {
    let meta = fs::symlink_metadata(dir).map_err(|e| io(dir, "reading", e))?;
    if meta.file_type().is_symlink() {
        return Err(refused(dir, "it is a symbolic link inside the tier".into()));
    }
    if !meta.is_dir() {
        return Err(refused(dir, "it is not a directory".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        // Not even a shared tier: anyone on the machine could plant KV.
        return Err(refused(dir, format!("its mode is {mode:04o}: every user can write to it (chmod o-w it)")));
    }
    if shared {
        return Ok(()); // the group is trusted, whoever of it owns the directory
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(refused(dir, format!("it is owned by uid {}, not by this user (uid {me})", meta.uid())));
    }
    if mode & 0o022 != 0 {
        return Err(refused(dir, format!("its mode is {mode:04o}: other users can write to it (chmod 700 it)")));
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check(_dir: &Path, _shared: bool) -> Result<()> {
    Ok(())
}

/// Whether the tier could open `dir`, checked without creating or writing anything: an existing
/// directory must pass [`check`] and the ancestor rule and be writable by this process; a missing
/// one must be creatable (its nearest existing ancestor a directory this process can write to,
/// under ancestors that pass the rule). For a check at startup; the tier checks again when it opens.
pub fn preflight(dir: &Path, shared: bool) -> Result<()> {
    let mut existing = dir;
    while fs::symlink_metadata(existing).is_err() {
        existing = match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if existing == Path::new(".") {
            break;
        }
    }
    let real = fs::canonicalize(existing).map_err(|e| io(existing, "resolving", e))?;
    if existing == dir {
        check(&real, shared)?;
        check_ancestors(&real)?;
        return writable(&real, dir);
    }
    if !real.is_dir() {
        return Err(refused(dir, format!("it cannot be created: {} is not a directory", existing.display())));
    }
    // The directory to be created would sit under `real`: `real` and its ancestors must pass.
    check_ancestors(&real.join("_"))?;
    writable(&real, dir)
}

/// `dir` (or where it would be created, `at`) is writable by this process.
#[cfg(unix)]
fn writable(at: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(at.as_os_str().as_bytes()) else {
        return Err(CoreError::config(format!("disk tier directory {}: the path holds a NUL byte", dir.display())));
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; access reads it only.
    let ok = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    if ok {
        return Ok(());
    }
    let what =
        if at == dir { "it is not writable".to_owned() } else { format!("it cannot be created in {}", at.display()) };
    Err(CoreError::config(format!(
        "disk tier directory {}: {what} by this user ({}); give the worker's user write access, or point \
         local_disk elsewhere",
        dir.display(),
        std::io::Error::last_os_error()
    )))
}

#[cfg(not(unix))]
fn writable(_at: &Path, _dir: &Path) -> Result<()> {
    Ok(())
}
