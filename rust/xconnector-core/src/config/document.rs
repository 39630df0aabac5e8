//! Config text to a generic value: YAML (or JSON, which is YAML).

use crate::error::{CoreError, Result};

/// Parses YAML (or JSON, which is YAML) text into a generic value, with a located error.
pub fn parse_document(text: &str, source: &str) -> Result<serde_json::Value> {
    serde_yaml_ng::from_str::<serde_json::Value>(text)
        .map_err(|e| CoreError::config(format!("{source}: not valid YAML/JSON: {e}")))
}
