//! What the command needs from the process it runs in, and its exit codes.

use std::io;

use crate::replay::Report;

pub const EXIT_OK: i32 = 0;
pub const EXIT_INVALID: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// What the command needs from the process it runs in. An `Err` from any of these stops the
/// command and is returned by `cli::run` (a closed pipe, an exception in the host's callback).
pub trait Host {
    fn out(&mut self, text: &str) -> io::Result<()>;
    fn err(&mut self, text: &str) -> io::Result<()>;
    /// An environment variable of this process.
    fn var(&self, name: &str) -> Option<String>;
    /// Versions only the host can tell (its own package, vLLM, Dynamo, its interpreter), in the
    /// order shown; `None` for "not installed". The native module's is added after the first.
    fn versions(&mut self) -> io::Result<Vec<(String, Option<String>)>>;
    /// Draws `bench`'s hit rate and lookup latency per request to the PNG file `path`.
    fn plot(&mut self, path: &str, report: &Report) -> io::Result<()>;
}

/// A host that keeps what is written, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Captured {
    pub out: String,
    pub err: String,
    pub vars: std::collections::HashMap<String, String>,
    pub versions: Vec<(String, Option<String>)>,
    /// Each plot asked for: (path, requests in the report).
    pub plots: Vec<(String, usize)>,
}

#[cfg(test)]
impl Captured {
    /// Runs `args` against this host; the exit code.
    pub fn run(&mut self, args: &[&str]) -> i32 {
        let argv: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        super::run(&argv, self).expect("a captured host never fails")
    }
}

#[cfg(test)]
impl Host for Captured {
    fn out(&mut self, text: &str) -> io::Result<()> {
        self.out += text;
        Ok(())
    }

    fn err(&mut self, text: &str) -> io::Result<()> {
        self.err += text;
        Ok(())
    }

    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn versions(&mut self) -> io::Result<Vec<(String, Option<String>)>> {
        Ok(self.versions.clone())
    }

    fn plot(&mut self, path: &str, report: &Report) -> io::Result<()> {
        self.plots.push((path.to_owned(), report.samples.len()));
        Ok(())
    }
}
