//! What only the worker's machine can tell about a valid config, checked once when XConnector
//! installs itself: the disk tier's directory can be used, the auth key's variable is set, Redis
//! answers. Quick (Redis gets [`REDIS_DEADLINE`]) and without side effects: nothing is created
//! or written. Each problem is one line naming the setting and the fix; secrets are never shown.

use std::time::Duration;

use super::schema::SdkConfig;
use super::secrets::redact_url;
use super::settings::{EngineSettings, LMCACHE};
use crate::error::CoreError;
use crate::{disk_dir, redis_tier};

/// The longest the Redis check waits for a PING's answer.
pub const REDIS_DEADLINE: Duration = Duration::from_secs(1);

/// One thing wrong on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeProblem {
    pub message: String,
    /// No engine can be built (XConnector cannot run); otherwise the engine runs without the
    /// tier in question (a disk directory it cannot use, a Redis that does not answer yet).
    pub fatal: bool,
}

/// The problems of `cfg` on this machine, reading environment variables through `env`.
pub fn runtime_problems(cfg: &SdkConfig, env: &dyn Fn(&str) -> Option<String>) -> Vec<RuntimeProblem> {
    let s = EngineSettings::from_config(cfg);
    let mut out = Vec::new();
    if let Some(d) = &s.disk {
        if let Err(e) = disk_dir::preflight(&d.path, d.shared) {
            let message = format!("{LMCACHE}.local_disk: {e} (until then XConnector runs without its disk tier)");
            out.push(RuntimeProblem { message, fatal: false });
        }
    }
    if let Some(r) = &s.redis {
        if let Err(e) = s.check_env(env) {
            out.push(RuntimeProblem { message: e.to_string(), fatal: true });
        }
        match redis_tier::ping(&r.url, r.ca_file.as_deref(), REDIS_DEADLINE) {
            Ok(()) => {}
            // What the tier would refuse to open with: no engine until it is fixed.
            Err(CoreError::Config(e)) => {
                // The tier's own messages name their setting (`remote_url ...`, `remote_ca_file ...`).
                let message = if e.starts_with("remote_") {
                    format!("{LMCACHE}.{e}")
                } else {
                    format!("{LMCACHE}.remote_url: {e}")
                };
                out.push(RuntimeProblem { message, fatal: true });
            }
            Err(e) => {
                let message = format!(
                    "{LMCACHE}.remote_url: Redis at {} did not answer a PING within {} s ({e}); check the address \
                     and that Redis is up (until it answers, XConnector serves from its local tiers)",
                    redact_url(&r.url),
                    REDIS_DEADLINE.as_secs()
                );
                out.push(RuntimeProblem { message, fatal: false });
            }
        }
    }
    out
}
