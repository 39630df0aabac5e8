//! The one error type of the core. The binding maps each variant to a Python exception class.

use thiserror::Error;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum CoreError {
    /// A caller passed something the engine cannot use (sizes, token ids, buffers).
    #[error("{0}")]
    InvalidInput(String),
    /// A configuration value is out of range or inconsistent.
    #[error("{0}")]
    Config(String),
    /// A config section failed validation. `strict` says whether the section asked for
    /// `integration.strict: true` (read best-effort from what was written), so that a caller can
    /// still stop at startup as the user asked even though the section as a whole is invalid.
    #[error("{message}")]
    InvalidSection { message: String, strict: bool },
    /// A storage operation failed for a reason the caller cannot fix by changing its input.
    #[error("{0}")]
    Cache(String),
    /// A bug: an invariant broke or a panic was caught.
    #[error("internal error: {0} (this is a bug in XConnector; please report it)")]
    Internal(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidInput(msg.into())
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
}
