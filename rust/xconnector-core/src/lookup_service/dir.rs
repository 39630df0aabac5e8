//! Where the lookup sockets live: a directory only this user can enter, so no other local user
//! can bind a rank's path first (and receive every prompt) or leave a file there that turns the
//! service off.
//!
//! Invariant relied on by the server and the client: a directory that passes
//! [`check_private_dir`] is, at that moment, a real directory (not a symlink) owned by this
//! process's effective uid with no group or other permission bits, so nobody but this user (and
//! root) can create, replace or reach anything in it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

use super::sys::euid;

/// Overrides where the sockets live (a directory that must be private as well).
pub const SOCKET_DIR_ENV: &str = "XCONNECTOR_SOCKET_DIR";

/// The directory for this user's lookup sockets: `$XCONNECTOR_SOCKET_DIR`, else
/// `$XDG_RUNTIME_DIR/xconnector` when that runtime directory is usable (an absolute path to a
/// private directory of this user), else `<temp dir>/xconnector-<uid>`. Nothing is created or
/// checked here: see [`ensure_private_dir`].
pub fn socket_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(SOCKET_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if runtime.is_absolute() && check_private_dir(&runtime).is_ok() {
            return runtime.join("xconnector");
        }
    }
    std::env::temp_dir().join(format!("xconnector-{}", euid()))
}

/// The socket of rank `rank` of engine `engine_id` in `dir`: a hash of the id keeps it short
/// (Unix socket paths are limited to 107 bytes) whatever the id.
pub fn socket_path(dir: &Path, engine_id: &str, rank: u32) -> PathBuf {
    let digest = xxhash_rust::xxh3::xxh3_64(engine_id.as_bytes());
    dir.join(format!("xc-{digest:016x}-{rank}.sock"))
}

/// Creates `dir` with mode 0700 if it does not exist (its parent must), then checks it is private.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(CoreError::Io {
                context: format!(
                    "cannot create the lookup socket directory {} (set {SOCKET_DIR_ENV} to a directory of \
                     your own with mode 0700)",
                    dir.display()
                ),
                source: e,
            })
        }
    }
    check_private_dir(dir)
}

/// Ok if `dir` is a directory (a symlink is refused) owned by this user with no group or other
/// permission bits; otherwise a `PermissionDenied` error naming the path, what was found and the fix.
pub fn check_private_dir(dir: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| CoreError::Io { context: format!("lookup socket directory {}", dir.display()), source: e })?;
    let me = euid();
    let mode = meta.mode() & 0o7777;
    let ft = meta.file_type();
    let what = if ft.is_symlink() {
        "a symbolic link"
    } else if !ft.is_dir() {
        "not a directory"
    } else if meta.uid() != me {
        "owned by another user"
    } else if mode & 0o077 != 0 {
        "open to other users"
    } else {
        return Ok(());
    };
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_socket() {
        "socket"
    } else {
        "file"
    };
    Err(CoreError::Io {
        context: format!(
            "refusing the lookup socket directory {}: it is {what} ({kind} owned by uid {}, mode {mode:04o}), and \
             another local user could then read or answer the scheduler's lookups; it must be a directory \
             owned by uid {me} with mode 0700: remove it, or set {SOCKET_DIR_ENV} to a private directory \
             (mkdir -m 700)",
            dir.display(),
            meta.uid(),
        ),
        source: io::ErrorKind::PermissionDenied.into(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn denied(r: Result<()>) -> String {
        match r {
            Err(CoreError::Io { context, source }) if source.kind() == io::ErrorKind::PermissionDenied => context,
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    #[test]
    fn a_new_directory_is_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("socks");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        ensure_private_dir(&dir).unwrap(); // existing and private: fine
    }

    #[test]
    fn open_modes_symlinks_and_files_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let msg = denied(ensure_private_dir(&open));
        assert!(msg.contains("open to other users") && msg.contains("mode 0777"), "{msg}");
        assert!(msg.contains(&open.display().to_string()) && msg.contains(SOCKET_DIR_ENV), "{msg}");

        let private = tmp.path().join("private");
        ensure_private_dir(&private).unwrap();
        let link = tmp.path().join("link");
        symlink(&private, &link).unwrap();
        assert!(denied(ensure_private_dir(&link)).contains("a symbolic link"));

        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(denied(check_private_dir(&file)).contains("not a directory"));
    }

    #[test]
    fn paths_are_short_and_distinct() {
        let dir = Path::new("/run/user/1000/xconnector");
        let long = "x".repeat(500);
        let p = socket_path(dir, &long, 3);
        assert!(p.to_str().unwrap().ends_with("-3.sock") && p.as_os_str().len() < 108, "{p:?}");
        assert_ne!(socket_path(dir, "a", 0), socket_path(dir, "b", 0));
        assert_ne!(socket_path(dir, "a", 0), socket_path(dir, "a", 1));
    }
}
