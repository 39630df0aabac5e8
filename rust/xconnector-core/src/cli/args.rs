//! The command line of `xconnector`: its commands, their options, `--help`, and usage errors in
//! argparse's shape (`usage: ...` then `xconnector CMD: error: ...`, exit 2). Hand-written: five
//! commands with a dozen options do not need a parser crate. Like argparse, an option may be
//! written `--opt VALUE`, `--opt=VALUE`, `-oVALUE`, or as any unambiguous prefix (`--req 200`).

use std::collections::HashMap;

/// What a command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Command),
    /// `--help`: this text on standard output, exit 0.
    Help(String),
    /// A usage error: this text on standard error, exit 2.
    Usage(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    CheckConfig(CheckArgs),
    Stats { url: String },
    Version,
    Bench(BenchArgs),
    MigrateConfig { old: String, output: String, force: bool },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckArgs {
    pub file: Option<String>,
    pub service: Option<String>,
    pub json: bool,
    pub strict: bool,
    /// The worker's command line, given after `--`.
    pub worker: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchArgs {
    pub requests: usize,
    pub seed: i64,
    pub cache_mib: u64,
    pub block_kib: usize,
    pub plot: Option<String>,
}

pub const DEFAULT_STATS_URL: &str = "http://127.0.0.1:9400/metrics";

struct Opt {
    long: &'static str,
    short: Option<char>,
    /// The value's name in help; `None` for a flag.
    metavar: Option<&'static str>,
    help: &'static str,
}

struct Pos {
    name: &'static str,
    required: bool,
    help: &'static str,
}

struct Spec {
    name: &'static str,
    summary: &'static str,
    description: &'static str,
    opts: &'static [Opt],
    pos: &'static [Pos],
    epilog: &'static str,
}

const fn opt(long: &'static str, metavar: Option<&'static str>, help: &'static str) -> Opt {
    Opt { long, short: None, metavar, help }
}

const HELP: Opt = Opt { long: "help", short: Some('h'), metavar: None, help: "show this help message and exit" };

const COMMANDS: &[Spec] = &[
    Spec {
        name: "check-config",
        summary: "validate a config and show the effective values and where they came from",
        description: "Validate an XConnector config. With FILE: a Dynamo YAML (Common.xconnector), a file with an \
                      `xconnector:` key, or the section itself. Without FILE: the config this environment gives a \
                      worker (XCONNECTOR_CONFIG, DYNAMO_SERVICE_CONFIG, DYN_DEPLOYMENT_CONFIG).",
        opts: &[
            opt(
                "service",
                Some("NAME"),
                "Dynamo service whose own `xconnector` keys overlay Common's (e.g. VllmWorker)",
            ),
            opt("json", None, "print the result as JSON"),
            opt("strict", None, "exit 1 on warnings too"),
        ],
        pos: &[Pos { name: "FILE", required: false, help: "YAML or JSON file to check" }],
        epilog: "After `--`, the worker's command line (e.g. `-- python -m dynamo.vllm --block-size 32`): the \
                 settings that must fit its --block-size are checked against it. Exit codes: 0 valid, 1 invalid \
                 (or, with --strict, warnings), 2 usage error (including a FILE that does not exist).",
    },
    Spec {
        name: "stats",
        summary: "show what XConnector does in a running worker (its Prometheus endpoint)",
        description: "Reads a worker's metrics endpoint (performance.metrics_port, or the worker's own /metrics) \
                      and prints hit rate, bytes, tiers and fallbacks.",
        opts: &[],
        pos: &[Pos {
            name: "URL",
            required: false,
            help: "the metrics URL, http:// (default: http://127.0.0.1:9400/metrics)",
        }],
        epilog: "",
    },
    Spec {
        name: "version",
        summary: "versions of XConnector, its native module, vLLM, Dynamo",
        description: "Versions of XConnector, its native module, and the vLLM and Dynamo installed here (read from \
                      package metadata: nothing is imported).",
        opts: &[],
        pos: &[],
        epilog: "",
    },
    Spec {
        name: "bench",
        summary: "replay a workload with shared prefixes and report hit rate, latency, bandwidth",
        description: "Replays seeded chat, RAG and agent-loop traffic through the engine.",
        opts: &[
            opt("requests", Some("N"), "requests to replay (1500)"),
            opt("seed", Some("SEED"), "workload seed (0)"),
            opt("cache-mib", Some("MIB"), "memory budget, MiB (an eighth of this machine's memory, at most 512)"),
            opt("block-kib", Some("KIB"), "KV bytes per 16-token block, KiB (32)"),
            opt("plot", Some("PNG"), "draw hit rate and lookup latency to this file"),
        ],
        pos: &[],
        epilog: "",
    },
    Spec {
        name: "migrate-config",
        summary: "turn the earlier prototype's config into the current `xconnector:` section",
        description: "Writes the earlier prototype's config in the current schema to NEW (or standard output) and, \
                      on standard error, one line per key path for what changed or has no equivalent. \
                      docs/migrating.md explains the differences.",
        opts: &[
            Opt {
                long: "output",
                short: Some('o'),
                metavar: Some("NEW"),
                help: "where to write it (default: -, stdout)",
            },
            opt("force", None, "overwrite NEW if it exists"),
        ],
        pos: &[Pos { name: "OLD", required: true, help: "the prototype's config file" }],
        epilog: "",
    },
];

const WIDTH: usize = 80;

/// Parses `argv` (without the program name).
pub fn parse(argv: &[String], default_cache_mib: u64) -> Parsed {
    let Some(first) = argv.first() else { return Parsed::Usage(top_help()) };
    if first == "-h" || first == "--help" {
        return Parsed::Help(top_help());
    }
    let Some(spec) = COMMANDS.iter().find(|s| s.name == first) else {
        let choices: Vec<String> = COMMANDS.iter().map(|s| format!("'{}'", s.name)).collect();
        let what = if first.starts_with('-') {
            format!("unrecognized arguments: {first}")
        } else {
            format!("argument COMMAND: invalid choice: '{first}' (choose from {})", choices.join(", "))
        };
        return Parsed::Usage(format!("{}\nxconnector: error: {what}\n", top_usage()));
    };
    let mut rest = &argv[1..];
    // `check-config FILE -- WORKER COMMAND`: the worker's command line is not ours to parse.
    let mut worker = Vec::new();
    if spec.name == "check-config" {
        if let Some(at) = rest.iter().position(|a| a == "--") {
            worker = rest[at + 1..].to_vec();
            rest = &rest[..at];
        }
    }
    let m = match matches(spec, rest) {
        Ok(Some(m)) => m,
        Ok(None) => return Parsed::Help(help(spec)),
        Err(e) => return Parsed::Usage(format!("{}\nxconnector {}: error: {e}\n", usage(spec), spec.name)),
    };
    match command(spec.name, m, worker, default_cache_mib) {
        Ok(c) => Parsed::Run(c),
        Err(e) => Parsed::Usage(format!("{}\nxconnector {}: error: {e}\n", usage(spec), spec.name)),
    }
}

#[derive(Default)]
struct Matches {
    values: HashMap<&'static str, String>,
    flags: Vec<&'static str>,
    pos: Vec<String>,
}

impl Matches {
    fn flag(&self, long: &str) -> bool {
        self.flags.contains(&long)
    }

    fn value(&mut self, long: &str) -> Option<String> {
        self.values.remove(long)
    }

    fn number<T: std::str::FromStr>(&mut self, long: &str, default: T) -> Result<T, String> {
        match self.value(long) {
            None => Ok(default),
            Some(v) => {
                v.parse().map_err(|_| format!("argument --{long}: invalid value: '{v}' (expected a whole number)"))
            }
        }
    }
}

fn command(name: &str, mut m: Matches, worker: Vec<String>, default_cache_mib: u64) -> Result<Command, String> {
    let mut pos = std::mem::take(&mut m.pos).into_iter();
    Ok(match name {
        "check-config" => Command::CheckConfig(CheckArgs {
            file: pos.next(),
            service: m.value("service"),
            json: m.flag("json"),
            strict: m.flag("strict"),
            worker,
        }),
        "stats" => Command::Stats { url: pos.next().unwrap_or_else(|| DEFAULT_STATS_URL.to_owned()) },
        "version" => Command::Version,
        "bench" => Command::Bench(BenchArgs {
            requests: m.number("requests", 1500)?,
            seed: m.number("seed", 0)?,
            cache_mib: m.number("cache-mib", default_cache_mib)?,
            block_kib: m.number("block-kib", 32)?,
            plot: m.value("plot"),
        }),
        _ => Command::MigrateConfig {
            old: pos.next().unwrap_or_default(),
            output: m.value("output").unwrap_or_else(|| "-".to_owned()),
            force: m.flag("force"),
        },
    })
}

/// A negative number is a value, not an option (argparse's rule when no option looks like one).
fn is_option(arg: &str) -> bool {
    arg.len() > 1 && arg.starts_with('-') && arg.parse::<f64>().is_err()
}

/// The options and positionals of one command; `None` for `--help`.
fn matches(spec: &Spec, args: &[String]) -> Result<Option<Matches>, String> {
    let mut m = Matches::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            m.pos.extend(args.by_ref().cloned());
            break;
        }
        if !is_option(arg) {
            m.pos.push(arg.clone());
            continue;
        }
        let (o, inline) = if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            (find_long(spec, name, arg)?, inline)
        } else {
            let c = arg[1..].chars().next().unwrap_or_default();
            let o = spec.opts.iter().chain([&HELP]).find(|o| o.short == Some(c));
            let o = o.ok_or_else(|| format!("unrecognized arguments: {arg}"))?;
            let tail = &arg[1 + c.len_utf8()..];
            (o, (!tail.is_empty()).then(|| tail.trim_start_matches('=').to_owned()))
        };
        if o.long == "help" {
            return Ok(None);
        }
        match (o.metavar, inline) {
            (None, None) => m.flags.push(o.long),
            (None, Some(v)) => return Err(format!("argument --{}: ignored explicit argument '{v}'", o.long)),
            (Some(_), Some(v)) => drop(m.values.insert(o.long, v)),
            (Some(_), None) => match args.next() {
                Some(v) if !is_option(v) => drop(m.values.insert(o.long, v.clone())),
                _ => return Err(format!("argument {}: expected one argument", invocation_names(o))),
            },
        }
    }
    if m.pos.len() > spec.pos.len() {
        return Err(format!("unrecognized arguments: {}", m.pos[spec.pos.len()..].join(" ")));
    }
    let missing: Vec<&str> = spec.pos.iter().skip(m.pos.len()).filter(|p| p.required).map(|p| p.name).collect();
    if !missing.is_empty() {
        return Err(format!("the following arguments are required: {}", missing.join(", ")));
    }
    Ok(Some(m))
}

/// The option `--name` stands for: exact, or the one option it is a prefix of.
fn find_long<'s>(spec: &'s Spec, name: &str, arg: &str) -> Result<&'s Opt, String> {
    let all: Vec<&Opt> = spec.opts.iter().chain([&HELP]).collect();
    if let Some(o) = all.iter().find(|o| o.long == name) {
        return Ok(o);
    }
    let candidates: Vec<&&Opt> = all.iter().filter(|o| !name.is_empty() && o.long.starts_with(name)).collect();
    match candidates.as_slice() {
        [o] => Ok(o),
        [] => Err(format!("unrecognized arguments: {arg}")),
        many => {
            let names: Vec<String> = many.iter().map(|o| format!("--{}", o.long)).collect();
            Err(format!("ambiguous option: --{name} could match {}", names.join(", ")))
        }
    }
}

fn invocation_names(o: &Opt) -> String {
    match o.short {
        Some(c) => format!("-{c}/--{}", o.long),
        None => format!("--{}", o.long),
    }
}

fn invocation(o: &Opt) -> String {
    let long = match o.metavar {
        Some(v) => format!("--{} {v}", o.long),
        None => format!("--{}", o.long),
    };
    match (o.short, o.metavar) {
        (Some(c), Some(v)) => format!("-{c} {v}, {long}"),
        (Some(c), None) => format!("-{c}, {long}"),
        (None, _) => long,
    }
}

fn top_usage() -> String {
    "usage: xconnector [-h] COMMAND ...".to_owned()
}

fn usage(spec: &Spec) -> String {
    let mut parts = vec![format!("usage: xconnector {}", spec.name), "[-h]".to_owned()];
    for o in spec.opts {
        let name = o.short.map_or_else(|| format!("--{}", o.long), |c| format!("-{c}"));
        parts.push(match o.metavar {
            Some(v) => format!("[{name} {v}]"),
            None => format!("[{name}]"),
        });
    }
    for p in spec.pos {
        parts.push(if p.required { p.name.to_owned() } else { format!("[{}]", p.name) });
    }
    if spec.name == "check-config" {
        parts.push("[-- WORKER COMMAND ...]".to_owned());
    }
    let indent = " ".repeat(parts[0].len() + 1);
    let mut lines = vec![parts[0].clone()];
    for part in &parts[1..] {
        let last = lines.last_mut().expect("lines start with one");
        if last.len() + 1 + part.len() > WIDTH {
            lines.push(format!("{indent}{part}"));
        } else {
            last.push(' ');
            last.push_str(part);
        }
    }
    lines.join("\n")
}

fn top_help() -> String {
    let commands: Vec<(String, &str)> = COMMANDS.iter().map(|s| (s.name.to_owned(), s.summary)).collect();
    let options = [(invocation(&HELP), HELP.help)];
    let col = column(commands.iter().chain(&options));
    format!(
        "{}\n\nXConnector: KV-cache connector for Dynamo and vLLM.\n\ncommands:\n{}\noptions:\n{}\n{}",
        top_usage(),
        table(&commands, col),
        table(&options, col),
        wrap("Run `xconnector COMMAND --help` for a command's options.", WIDTH, "")
    )
}

fn help(spec: &Spec) -> String {
    let positionals: Vec<(String, &str)> = spec.pos.iter().map(|p| (p.name.to_owned(), p.help)).collect();
    let options: Vec<(String, &str)> = [&HELP].into_iter().chain(spec.opts).map(|o| (invocation(o), o.help)).collect();
    let col = column(positionals.iter().chain(&options));
    let mut out = format!("{}\n\n{}", usage(spec), wrap(spec.description, WIDTH, ""));
    if !positionals.is_empty() {
        out += &format!("\npositional arguments:\n{}", table(&positionals, col));
    }
    out += &format!("\noptions:\n{}", table(&options, col));
    if !spec.epilog.is_empty() {
        out += &format!("\n{}", wrap(spec.epilog, WIDTH, ""));
    }
    out
}

/// Where the help column starts, argparse's way: after the longest name (indented by 2, and 2
/// spaces after it), at column 24 at most.
fn column<'a>(rows: impl Iterator<Item = &'a (String, &'a str)>) -> usize {
    rows.map(|(name, _)| name.len() + 4).max().unwrap_or(0).min(24)
}

/// Two columns: names indented by 2, their help from `col` (on the next line when the name is
/// longer), wrapped to the width.
fn table(rows: &[(String, &str)], col: usize) -> String {
    let pad = " ".repeat(col);
    let mut out = String::new();
    for (name, text) in rows {
        let body = wrap(text, WIDTH - col, &pad);
        let body = body.trim_start();
        if name.len() + 4 > col {
            out += &format!("  {name}\n{pad}{body}");
        } else {
            out += &format!("  {name:<w$}{body}", w = col - 2);
        }
    }
    out
}

/// `text` wrapped at word boundaries to lines of `width` after `indent`; every line ends in '\n'.
fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out += &format!("{indent}{line}\n");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out += &format!("{indent}{line}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Parsed {
        parse(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), 512)
    }

    fn usage_error(args: &[&str]) -> String {
        match p(args) {
            Parsed::Usage(text) => text,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn check_config_takes_a_file_options_in_any_order_and_the_workers_command_line() {
        let want = CheckArgs {
            file: Some("agg.yaml".into()),
            service: Some("VllmWorker".into()),
            json: true,
            strict: false,
            worker: vec!["python".into(), "--block-size".into(), "32".into(), "--".into()],
        };
        let got =
            p(&["check-config", "--json", "agg.yaml", "--serv=VllmWorker", "--", "python", "--block-size", "32", "--"]);
        assert_eq!(got, Parsed::Run(Command::CheckConfig(want)));
        assert_eq!(p(&["check-config"]), Parsed::Run(Command::CheckConfig(CheckArgs::default())));
        // The worker's own flags are never ours, --help included.
        let Parsed::Run(Command::CheckConfig(a)) = p(&["check-config", "--", "-h"]) else { panic!() };
        assert_eq!(a.worker, ["-h"]);
    }

    #[test]
    fn bench_and_migrate_read_their_values_and_defaults() {
        let want = BenchArgs { requests: 200, seed: -3, cache_mib: 32, block_kib: 32, plot: Some("b.png".into()) };
        assert_eq!(
            p(&["bench", "--requests", "200", "--seed", "-3", "--cache-mib=32", "--plot", "b.png"]),
            Parsed::Run(Command::Bench(want))
        );
        let Parsed::Run(Command::Bench(b)) = p(&["bench"]) else { panic!() };
        assert_eq!((b.requests, b.seed, b.cache_mib, b.block_kib, b.plot), (1500, 0, 512, 32, None));
        let migrate = |old: &str, output: &str, force| {
            Parsed::Run(Command::MigrateConfig { old: old.into(), output: output.into(), force })
        };
        assert_eq!(p(&["migrate-config", "old.yaml"]), migrate("old.yaml", "-", false));
        assert_eq!(p(&["migrate-config", "-onew.yaml", "old.yaml", "--force"]), migrate("old.yaml", "new.yaml", true));
        assert_eq!(p(&["migrate-config", "old.yaml", "-o", "-"]), migrate("old.yaml", "-", false));
        assert_eq!(p(&["stats"]), Parsed::Run(Command::Stats { url: DEFAULT_STATS_URL.into() }));
        assert_eq!(p(&["version"]), Parsed::Run(Command::Version));
    }

    #[test]
    fn usage_errors_name_the_command_and_what_is_wrong() {
        let e = usage_error(&["check-config", "--no-such-option"]);
        assert!(e.starts_with("usage: xconnector check-config [-h] [--service NAME]"), "{e}");
        assert!(e.ends_with("xconnector check-config: error: unrecognized arguments: --no-such-option\n"), "{e}");
        assert!(usage_error(&["frobnicate"]).contains("invalid choice: 'frobnicate' (choose from 'check-config'"));
        assert!(usage_error(&["bench", "--requests", "many"]).contains("argument --requests: invalid value: 'many'"));
        assert!(usage_error(&["bench", "--requests", "-5"]).contains("invalid value: '-5'"));
        assert!(usage_error(&["bench", "--plot"]).contains("argument --plot: expected one argument"));
        assert!(usage_error(&["bench", "--cache"]).contains("argument --cache-mib: expected one argument"));
        assert!(usage_error(&["migrate-config"]).contains("the following arguments are required: OLD"));
        assert!(usage_error(&["migrate-config", "a", "b"]).contains("unrecognized arguments: b"));
        assert!(usage_error(&["check-config", "--json=yes"]).contains("ignored explicit argument 'yes'"));
        assert!(usage_error(&["version", "--x"]).contains("unrecognized arguments: --x"));
        // No command: the overview, as a usage error.
        assert!(usage_error(&[]).contains("check-config    validate a config"));
    }

    #[test]
    fn help_lists_every_command_and_option() {
        let Parsed::Help(top) = p(&["--help"]) else { panic!() };
        for s in COMMANDS {
            assert!(top.contains(&format!("  {:<14}", s.name)), "{top}");
        }
        for s in COMMANDS {
            let Parsed::Help(text) = p(&[s.name, "-h"]) else { panic!("{}", s.name) };
            assert!(text.starts_with(&format!("usage: xconnector {} [-h]", s.name)), "{text}");
            for o in s.opts {
                assert!(text.contains(&format!("--{}", o.long)), "{text}");
            }
            assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
            assert!(!text.contains("\n\n\n"), "{text}");
        }
        // One help column for positionals and options alike.
        let Parsed::Help(text) = p(&["check-config", "--help"]) else { panic!() };
        assert!(text.contains("\n  FILE            YAML or JSON file to check\n"), "{text}");
        let Parsed::Help(text) = p(&["migrate-config", "--help"]) else { panic!() };
        assert!(text.contains("  -o NEW, --output NEW  where to write it (default: -, stdout)\n"), "{text}");
    }
}
