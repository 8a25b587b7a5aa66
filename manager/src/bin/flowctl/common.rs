//! What every subcommand shares: logging, exit codes, principals, managers.

use std::path::Path;
use std::sync::Arc;

use flow::auth::{AllowEveryone, PatternAuthorizer, PeerAuthorizer};
use flow::security::{BlessingPattern, Principal};
use flow::{Error, ErrorKind, Result};
use flow_manager::Manager;

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// 2 when a peer was refused or did not trust us, else 1.
pub(crate) fn exit_code(err: &Error) -> u8 {
    match err.kind() {
        ErrorKind::NotTrusted | ErrorKind::Auth => 2,
        _ => 1,
    }
}

/// The principal in `dir`, or an ephemeral one blessed as `name`.
pub(crate) fn principal(dir: Option<&Path>, name: &str) -> Result<Principal> {
    match dir {
        Some(dir) => Principal::load_dir(dir),
        None => Principal::with_self_blessing(name),
    }
}

/// A manager for `principal` (dial-only when it will never listen).
pub(crate) fn manager(principal: Principal, dial_only: bool) -> Manager {
    let builder = Manager::builder(principal).reveal_to_hidden_servers(true);
    if dial_only {
        builder.dial_only().build()
    } else {
        builder.build()
    }
}

/// An authorizer accepting peers matching `pattern`, or everyone.
pub(crate) fn authorizer(pattern: Option<&str>) -> Result<Arc<dyn PeerAuthorizer>> {
    Ok(match pattern {
        Some(p) => Arc::new(PatternAuthorizer::new([BlessingPattern::parse(p)?])),
        None => Arc::new(AllowEveryone),
    })
}

/// Wraps an i/o error with what was being done.
pub(crate) fn io(what: &str, err: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Network, format!("{what}: {err}"), err)
}
