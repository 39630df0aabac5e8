//! Reading config text from files and environment variables, with an error for each way that goes
//! wrong that says what was found and what to do.

use std::io::{ErrorKind, Read};
use std::path::Path;

use crate::error::{CoreError, Result};

/// Largest config accepted. Dynamo configs are a few KiB; anything near this is the wrong file.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Reads a config file as UTF-8 text. `source` starts every error and names the path and where it
/// came from (`XCONNECTOR_CONFIG=/etc/x.yaml`, `-f agg.yaml`, or just the path).
pub fn read_config_file(path: &Path, source: &str) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => {
            CoreError::config(format!("{source}: no such file{}; check the path", relative_hint(path)))
        }
        ErrorKind::PermissionDenied => {
            CoreError::config(format!("{source}: permission denied; make the file readable by this process's user"))
        }
        _ => CoreError::config(format!("{source}: cannot read: {e}")),
    })?;
    if meta.is_dir() {
        return Err(CoreError::config(format!(
            "{source}: is a directory; point it at a YAML file, e.g. {:?}",
            path.join("config.yaml").display().to_string()
        )));
    }
    if !meta.is_file() {
        return Err(CoreError::config(format!("{source}: is not a regular file; point it at a YAML file")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| CoreError::config(format!("{source}: cannot read: {e}")))?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(too_large(source, meta.len()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let byte = e.as_bytes()[at];
        CoreError::config(format!("{source}: is not UTF-8 text (byte 0x{byte:02x} at offset {at}); save it as UTF-8"))
    })?;
    check_text(text, source)
}

/// Checks config text from any source (file contents, an environment variable): not empty, not
/// too large. Strips a UTF-8 byte-order mark, which some editors write and YAML parsers reject.
pub fn check_text(text: String, source: &str) -> Result<String> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(too_large(source, text.len() as u64));
    }
    let text = match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    };
    if text.trim().is_empty() {
        return Err(CoreError::config(format!(
            "{source}: is empty; expected YAML (or JSON) with an `xconnector:` section, e.g. \"xconnector: {{enabled: true}}\""
        )));
    }
    Ok(text)
}

fn too_large(source: &str, len: u64) -> CoreError {
    CoreError::config(format!(
        "{source}: is {:.1} MB, more than the {} MiB a config may be; is this the right file?",
        len as f64 / 1e6,
        MAX_CONFIG_BYTES >> 20
    ))
}

fn relative_hint(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => format!(" (relative to the working directory {})", cwd.display()),
        _ => String::new(),
    }
}
