//! The one error type of flow: an [`ErrorKind`] that tells the caller what to
//! do, a message that says what happened, and an optional source chain.

use std::fmt;
use std::sync::Arc;

/// What went wrong, at the level a caller acts on.
///
/// The kinds follow Vanadium's flow error IDs, plus `Timeout` and `Canceled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Authentication failed: a bad signature, blessings that do not verify,
    /// or a key that does not match.
    Auth,
    /// The peer authenticated, but the authorizer refused it.
    NotTrusted,
    /// The network failed under an established connection.
    Network,
    /// A connection could not be established.
    DialFailed,
    /// An address could not be resolved.
    ResolveFailed,
    /// A proxy refused or failed.
    Proxy,
    /// An argument was malformed or out of range.
    BadArg,
    /// The operation is not valid in the current state.
    BadState,
    /// The operation was aborted, for example by the peer closing.
    Aborted,
    /// A deadline passed.
    Timeout,
    /// The caller canceled the operation.
    Canceled,
}

impl ErrorKind {
    /// The stable name of the kind, as used in logs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Auth => "Auth",
            ErrorKind::NotTrusted => "NotTrusted",
            ErrorKind::Network => "Network",
            ErrorKind::DialFailed => "DialFailed",
            ErrorKind::ResolveFailed => "ResolveFailed",
            ErrorKind::Proxy => "Proxy",
            ErrorKind::BadArg => "BadArg",
            ErrorKind::BadState => "BadState",
            ErrorKind::Aborted => "Aborted",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::Canceled => "Canceled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every fallible flow operation.
///
/// Cheap to clone, so one failure (say, a connection closing) can be handed to
/// every flow that was waiting on it.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    /// The underlying error itself (not the `Arc` holding it), so callers can
    /// downcast it, e.g. to a [`std::io::Error`].
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// A new error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error of `kind` saying `message`, caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `context` put in front of its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Shorthand for an [`ErrorKind::BadArg`] error.
    pub fn bad_arg(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::BadArg, message)
    }

    /// Shorthand for an [`ErrorKind::BadState`] error.
    pub fn bad_state(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::BadState, message)
    }

    /// Shorthand for an [`ErrorKind::Auth`] error.
    pub fn auth(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Auth, message)
    }

    /// Shorthand for an [`ErrorKind::NotTrusted`] error.
    pub fn not_trusted(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotTrusted, message)
    }

    /// Shorthand for an [`ErrorKind::Network`] error.
    pub fn network(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Network, message)
    }

    /// Shorthand for an [`ErrorKind::Timeout`] error.
    pub fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Timeout, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, " (caused by: {source:?})")?;
        }
        Ok(())
    }
}

impl From<flow_message::DecodeError> for Error {
    fn from(err: flow_message::DecodeError) -> Self {
        Error::with_source(ErrorKind::BadArg, "malformed input", err)
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match err.kind() {
            Io::TimedOut => ErrorKind::Timeout,
            Io::InvalidInput | Io::InvalidData => ErrorKind::BadArg,
            _ => ErrorKind::Network,
        };
        Error::with_source(kind, "i/o error", err)
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_names_kind_and_message() {
        let err = Error::bad_arg("endpoint has no protocol");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert_eq!(err.to_string(), "BadArg: endpoint has no protocol");
    }

    #[test]
    fn source_chain_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let err = Error::with_source(ErrorKind::Network, "reading frame", io);
        let source = err.source().expect("source kept");
        assert_eq!(source.to_string(), "reset by peer");
        let cloned = err.clone().context("conn 7");
        assert_eq!(cloned.to_string(), "Network: conn 7: reading frame");
        assert!(cloned.source().is_some());
    }

    #[test]
    fn sources_can_be_downcast() {
        let io = std::io::Error::from_raw_os_error(24);
        let err = Error::with_source(ErrorKind::DialFailed, "dial", io);
        let source = err.source().unwrap();
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.raw_os_error(), Some(24));
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let timed_out: Error = std::io::Error::from(std::io::ErrorKind::TimedOut).into();
        assert_eq!(timed_out.kind(), ErrorKind::Timeout);
        let reset: Error = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert_eq!(reset.kind(), ErrorKind::Network);
    }
}
