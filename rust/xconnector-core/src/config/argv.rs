//! Reading flags from a command line the way argparse does (`--flag VALUE` or `--flag=VALUE`,
//! the last one wins), for discovery's `--service-name`/`-f` and the worker's `--block-size`.

/// The value of the last `--flag VALUE` or `--flag=VALUE` among `flags` in `argv` (whose first
/// element, the program, is skipped), with the flag as written.
pub fn flag(argv: &[String], flags: &[&str]) -> Option<(String, String)> {
    let mut found = None;
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        for flag in flags {
            if arg == flag {
                if let Some(value) = args.clone().next() {
                    found = Some(((*flag).to_owned(), value.clone()));
                }
            } else if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                found = Some(((*flag).to_owned(), value.to_owned()));
            }
        }
    }
    found
}
