//! `xconnector migrate-config OLD [-o NEW] [--force]`: the earlier prototype's config in the
//! current schema (`crate::migrate` does the mapping). The YAML goes to NEW (or standard output)
//! and, on standard error, one line per key path for what changed or has no equivalent. NEW is
//! never overwritten without `--force`, and nothing is written when OLD cannot be migrated.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use super::host::{Host, EXIT_OK, EXIT_USAGE};
use crate::migrate::migrate_file;

pub fn run(old: &str, new: &str, force: bool, host: &mut dyn Host) -> io::Result<i32> {
    let to_stdout = new == "-";
    if !to_stdout && Path::new(new).symlink_metadata().is_ok() && !force {
        host.err(&format!("error: {new} exists; pass --force to overwrite it, or choose another -o\n"))?;
        return Ok(EXIT_USAGE);
    }
    let m = match migrate_file(Path::new(old), old) {
        Ok(m) => m,
        Err(e) => {
            host.err(&format!("error: {e}\n"))?;
            return Ok(EXIT_USAGE);
        }
    };
    let mut notes = format!("{old}: migrated to {}; {} change(s):\n", m.section, m.notes.len());
    for n in &m.notes {
        notes += &format!("  {}: {}\n", n.path, n.message);
    }
    host.err(&notes)?;
    if to_stdout {
        host.out(&m.text)?;
        return Ok(EXIT_OK);
    }
    let written = OpenOptions::new()
        .write(true)
        .create(force)
        .truncate(force)
        .create_new(!force)
        .open(new)
        .and_then(|mut f| f.write_all(m.text.as_bytes()));
    if let Err(e) = written {
        host.err(&format!("error: cannot write {new}: {e}; choose another -o\n"))?;
        return Ok(EXIT_USAGE);
    }
    host.err(&format!("wrote {new}; check it with: xconnector check-config {new}\n"))?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::super::host::Captured;
    use super::*;

    const OLD: &str = "xconnector:\n  enabled: true\n  etcd: {endpoints: [\"http://127.0.0.1:2379\"]}\n";

    #[test]
    fn writes_new_or_stdout_and_names_each_change() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.yaml");
        std::fs::write(&old, OLD).unwrap();
        let (old, new) = (old.display().to_string(), dir.path().join("new.yaml").display().to_string());
        let mut h = Captured::default();
        assert_eq!(h.run(&["migrate-config", &old, "-o", &new]), EXIT_OK, "{}", h.err);
        assert!(h.err.starts_with(&format!("{old}: migrated to xconnector; ")), "{}", h.err);
        assert!(h.err.contains("\n  xconnector.etcd.endpoints: ") && h.out.is_empty(), "{}", h.err);
        assert!(h.err.ends_with(&format!("wrote {new}; check it with: xconnector check-config {new}\n")));
        let written = std::fs::read_to_string(&new).unwrap();
        let mut h = Captured::default();
        assert_eq!(h.run(&["migrate-config", &old]), EXIT_OK);
        assert_eq!(h.out, written);
        // The result passes check-config.
        assert_eq!(Captured::default().run(&["check-config", &new, "--strict"]), EXIT_OK);
    }

    #[test]
    fn an_existing_new_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.yaml");
        std::fs::write(&old, OLD).unwrap();
        let new = dir.path().join("new.yaml");
        std::fs::write(&new, "keep me\n").unwrap();
        let (old, new_s) = (old.display().to_string(), new.display().to_string());
        let mut h = Captured::default();
        assert_eq!(h.run(&["migrate-config", &old, "-o", &new_s]), EXIT_USAGE);
        assert!(h.err.contains(&format!("{new_s} exists; pass --force")), "{}", h.err);
        assert_eq!(std::fs::read_to_string(&new).unwrap(), "keep me\n");
        assert_eq!(Captured::default().run(&["migrate-config", &old, "-o", &new_s, "--force"]), EXIT_OK);
        assert!(std::fs::read_to_string(&new).unwrap().starts_with("xconnector:"));
    }

    #[test]
    fn bad_input_and_unwritable_output_are_errors_that_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.yaml");
        std::fs::write(&old, "- enabled: true\n").unwrap();
        let (old, new) = (old.display().to_string(), dir.path().join("new.yaml"));
        let mut h = Captured::default();
        assert_eq!(h.run(&["migrate-config", &old, "-o", &new.display().to_string()]), EXIT_USAGE);
        assert!(h.err.starts_with(&format!("error: {old}: expected a mapping")), "{}", h.err);
        assert!(!new.exists() && h.out.is_empty());
        std::fs::write(&old, OLD).unwrap();
        let nowhere = dir.path().join("no-such-dir").join("new.yaml").display().to_string();
        let mut h = Captured::default();
        assert_eq!(h.run(&["migrate-config", &old, "-o", &nowhere]), EXIT_USAGE);
        assert!(h.err.contains(&format!("error: cannot write {nowhere}: ")), "{}", h.err);
    }
}
