//! The `xconnector` command: argument parsing, the checks, and every report it prints. The host
//! (the Python package's `xconnector.cli`) gives it its output streams, so that whoever captures
//! `sys.stdout` sees the text, and the two things only Python can do: read package metadata for
//! `version`, and draw `bench --plot` with matplotlib.
//!
//! Exit codes: 0 valid / done, 1 invalid (or a worker that cannot be read), 2 usage error
//! (including a file that does not exist or is a directory).

pub mod args;
mod bench;
mod check;
mod host;
mod migrate;
pub mod stats;

use std::io;

pub use args::{parse, BenchArgs, CheckArgs, Command, Parsed};
pub use bench::default_cache_mib;
pub use host::{Host, EXIT_INVALID, EXIT_OK, EXIT_USAGE};

/// Runs `xconnector ARGV...` (without the program name); returns the exit code.
pub fn run(argv: &[String], host: &mut dyn Host) -> io::Result<i32> {
    match parse(argv, default_cache_mib()) {
        Parsed::Help(text) => host.out(&text).map(|()| EXIT_OK),
        Parsed::Usage(text) => host.err(&text).map(|()| EXIT_USAGE),
        Parsed::Run(Command::CheckConfig(a)) => check::run(&a, host),
        Parsed::Run(Command::Stats { url }) => stats::run(&url, host),
        Parsed::Run(Command::Version) => version(host),
        Parsed::Run(Command::Bench(a)) => bench::run(&a, host),
        Parsed::Run(Command::MigrateConfig { old, output, force }) => migrate::run(&old, &output, force, host),
    }
}

fn version(host: &mut dyn Host) -> io::Result<i32> {
    let mut rows = host.versions()?;
    let native = format!("{} (hash version {})", env!("CARGO_PKG_VERSION"), crate::hashing::HASH_VERSION);
    rows.insert(rows.len().min(1), ("native module".to_owned(), Some(native)));
    let mut text = String::new();
    for (name, value) in rows {
        text += &format!("{name:<14} {}\n", value.as_deref().unwrap_or("not installed"));
    }
    host.out(&text)?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::host::Captured;
    use super::*;

    #[test]
    fn exit_codes_of_help_and_usage_errors() {
        let mut h = Captured::default();
        assert_eq!(h.run(&["--help"]), EXIT_OK);
        assert!(h.out.starts_with("usage: xconnector [-h] COMMAND ...") && h.err.is_empty());
        let mut h = Captured::default();
        assert_eq!(h.run(&[]), EXIT_USAGE);
        assert!(h.err.starts_with("usage: xconnector") && h.out.is_empty());
        assert_eq!(Captured::default().run(&["frobnicate"]), EXIT_USAGE);
    }

    #[test]
    fn version_puts_the_native_module_after_the_package() {
        let mut h = Captured {
            versions: vec![("xconnector".into(), Some("1.0.0".into())), ("vllm".into(), None)],
            ..Captured::default()
        };
        assert_eq!(h.run(&["version"]), EXIT_OK);
        let native =
            format!("native module  {} (hash version {})", env!("CARGO_PKG_VERSION"), crate::hashing::HASH_VERSION);
        assert_eq!(h.out, format!("xconnector     1.0.0\n{native}\nvllm           not installed\n"));
    }
}
