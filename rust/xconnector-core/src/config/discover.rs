//! Where the config comes from, in the order of DESIGN section 2. The first channel that is set
//! decides, even when it holds no `xconnector` section (then XConnector stays off and the result
//! says which channel was read): Dynamo sets `DYNAMO_SERVICE_CONFIG` from the same YAML that
//! `DYN_DEPLOYMENT_CONFIG` and `-f` name, so looking further would only find the same answer.

use std::collections::HashMap;
use std::path::Path;

use super::locate::{resolve_text, Resolved};
use super::source::{check_text, read_config_file};
use crate::error::Result;

/// The variables XConnector reads, in order.
pub const CONFIG_VARS: &[&str] = &["XCONNECTOR_CONFIG", "DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG"];
/// The service this process runs when its command line does not say (`--service-name` wins).
pub const SERVICE_VAR: &str = "XCONNECTOR_SERVICE";

/// What discovery reads: environment variables and the process's argv.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub vars: HashMap<String, String>,
    pub argv: Vec<String>,
}

impl Environment {
    /// This process's environment and arguments.
    pub fn current() -> Self {
        let vars = CONFIG_VARS
            .iter()
            .chain([&SERVICE_VAR])
            .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
            .collect();
        Self { vars, argv: std::env::args().collect() }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    fn flag(&self, flags: &[&str]) -> Option<(String, String)> {
        super::argv::flag(&self.argv, flags)
    }

    /// The Dynamo service this process runs (`--service-name VllmWorker`), if any.
    /// The last `--service-name` (argparse's rule), else `XCONNECTOR_SERVICE`. The one place
    /// this is decided: the autopatch asks the result of discovery.
    pub fn service_name(&self) -> Option<String> {
        let flag = self.flag(&["--service-name"]).map(|(_, v)| v).filter(|v| !v.is_empty());
        flag.or_else(|| self.var(SERVICE_VAR).map(str::to_owned))
    }
}

/// Finds and validates the config. `Ok` with `section: None` means "no config: stay off";
/// `Err` is a config that exists but is unreadable or invalid.
pub fn discover(env: &Environment) -> Result<Resolved> {
    let service = env.service_name();
    let service = service.as_deref();
    if let Some(value) = env.var("XCONNECTOR_CONFIG") {
        let value = value.trim();
        // A path, or (in containers, where mounting a file is more work) the YAML/JSON itself.
        if value.starts_with('{') || value.contains('\n') {
            let source = "XCONNECTOR_CONFIG (inline)";
            return resolve_text(&check_text(value.to_owned(), source)?, source, service, true, &env.argv);
        }
        let source = format!("XCONNECTOR_CONFIG={value}");
        let text = read_config_file(Path::new(value), &source)?;
        return resolve_text(&text, &source, service, true, &env.argv);
    }
    for var in ["DYNAMO_SERVICE_CONFIG", "DYN_DEPLOYMENT_CONFIG"] {
        if let Some(value) = env.var(var) {
            return resolve_text(&check_text(value.to_owned(), var)?, var, service, false, &env.argv);
        }
    }
    if let Some((flag, path)) = env.flag(&["-f", "--config-file", "--config"]) {
        let source = format!("{flag} {path}");
        let text = read_config_file(Path::new(&path), &source)?;
        return resolve_text(&text, &source, service, false, &env.argv);
    }
    Ok(Resolved::absent("none", Vec::new()))
}
