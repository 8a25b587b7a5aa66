//! The registry of protocols: names to implementations.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use flow::transport::{FramedConn, Listener, Protocol};
use flow::{Error, Result};

use crate::memory::MemoryProtocol;
use crate::tcp::TcpProtocol;
use crate::ws::WsProtocol;
use crate::wsh::WshProtocol;

#[derive(Clone)]
struct Entry {
    protocol: Arc<dyn Protocol>,
    actual_names: Vec<String>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    /// The protocol an endpoint without one is dialed with.
    unknown: Option<String>,
}

/// Maps protocol names (`tcp`, `ws`, ...) to their implementations.
///
/// Each name comes with its *actual names*: the network names it stands for
/// (`tcp` stands for `tcp4` and `tcp6`, `wsh` for `tcp4`, `tcp6`, `ws4` and
/// `ws6`), as Vanadium's registry has them. All methods take `&self`; the
/// table sits behind a lock.
pub struct Registry {
    table: RwLock<Table>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("protocols", &self.protocols())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            table: RwLock::new(Table::default()),
        }
    }

    /// A registry holding every transport of this crate:
    ///
    /// | name | actual names |
    /// | --- | --- |
    /// | `tcp` | `tcp4`, `tcp6` |
    /// | `tcp4`, `tcp6` | itself |
    /// | `ws` | `ws4`, `ws6` |
    /// | `ws4`, `ws6` | itself |
    /// | `wsh` | `tcp4`, `tcp6`, `ws4`, `ws6` |
    /// | `wsh4` | `tcp4`, `ws4` |
    /// | `wsh6` | `tcp6`, `ws6` |
    /// | `unix` | `unix` |
    /// | `memory` | `memory` (the process-wide namespace) |
    ///
    /// Endpoints without a protocol are dialed with `wsh` (which dials tcp),
    /// as in Vanadium.
    pub fn with_defaults() -> Self {
        let registry = Registry::new();
        let tcp: Arc<dyn Protocol> = Arc::new(TcpProtocol::new());
        let ws: Arc<dyn Protocol> = Arc::new(WsProtocol::new());
        let wsh: Arc<dyn Protocol> = Arc::new(WshProtocol::new());
        registry.register("tcp", tcp.clone(), names(&["tcp4", "tcp6"]));
        registry.register("tcp4", tcp.clone(), names(&["tcp4"]));
        registry.register("tcp6", tcp, names(&["tcp6"]));
        registry.register("ws", ws.clone(), names(&["ws4", "ws6"]));
        registry.register("ws4", ws.clone(), names(&["ws4"]));
        registry.register("ws6", ws, names(&["ws6"]));
        registry.register("wsh", wsh.clone(), names(&["tcp4", "tcp6", "ws4", "ws6"]));
        registry.register("wsh4", wsh.clone(), names(&["tcp4", "ws4"]));
        registry.register("wsh6", wsh, names(&["tcp6", "ws6"]));
        #[cfg(unix)]
        registry.register(
            "unix",
            Arc::new(crate::unix::UnixProtocol::new()),
            names(&["unix"]),
        );
        registry.register(
            "memory",
            Arc::new(MemoryProtocol::shared()),
            names(&["memory"]),
        );
        // "wsh" was registered just above, so this cannot fail.
        let _ = registry.register_unknown("wsh");
        registry
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `protocol` under `name`, standing for `actual_names`.
    /// Replaces any earlier registration of `name`, and says whether it did.
    pub fn register(
        &self,
        name: &str,
        protocol: Arc<dyn Protocol>,
        actual_names: Vec<String>,
    ) -> bool {
        let entry = Entry {
            protocol,
            actual_names,
        };
        self.write()
            .entries
            .insert(name.to_string(), entry)
            .is_some()
    }

    /// Makes `name` the protocol used for endpoints that name none (looked up
    /// as the empty name). Fails with [`flow::ErrorKind::BadArg`] if `name`
    /// is not registered.
    pub fn register_unknown(&self, name: &str) -> Result<()> {
        let mut table = self.write();
        if !table.entries.contains_key(name) {
            return Err(Error::bad_arg(format!(
                "cannot use unregistered protocol {name:?} for endpoints without one"
            )));
        }
        table.unknown = Some(name.to_string());
        Ok(())
    }

    /// The protocol registered as `name` and its actual names. The empty
    /// name looks up the protocol set by [`Registry::register_unknown`].
    pub fn lookup(&self, name: &str) -> Option<(Arc<dyn Protocol>, Vec<String>)> {
        let table = self.read();
        let name = if name.is_empty() {
            table.unknown.as_deref()?
        } else {
            name
        };
        table
            .entries
            .get(name)
            .map(|e| (e.protocol.clone(), e.actual_names.clone()))
    }

    /// Every registered name, sorted.
    pub fn protocols(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// The protocol for `name` and the name to pass to it (the empty name
    /// becomes the unknown-protocol target).
    fn find(&self, name: &str) -> Result<(Arc<dyn Protocol>, String)> {
        let table = self.read();
        let actual = if name.is_empty() {
            table.unknown.clone().ok_or_else(|| {
                Error::bad_arg("no protocol given and no protocol registered for that case")
            })?
        } else {
            name.to_string()
        };
        match table.entries.get(&actual) {
            Some(entry) => Ok((entry.protocol.clone(), actual)),
            None => Err(Error::bad_arg(format!("unknown protocol {actual:?}"))),
        }
    }

    /// Dials `address` with the protocol registered as `protocol`.
    pub async fn dial(
        &self,
        protocol: &str,
        address: &str,
        timeout: Duration,
    ) -> Result<Box<dyn FramedConn>> {
        let (imp, name) = self.find(protocol)?;
        imp.dial(&name, address, timeout).await
    }

    /// Resolves `address` with the protocol registered as `protocol`.
    pub async fn resolve(&self, protocol: &str, address: &str) -> Result<(String, Vec<String>)> {
        let (imp, name) = self.find(protocol)?;
        imp.resolve(&name, address).await
    }

    /// Listens on `address` with the protocol registered as `protocol`.
    pub async fn listen(&self, protocol: &str, address: &str) -> Result<Box<dyn Listener>> {
        let (imp, name) = self.find(protocol)?;
        imp.listen(&name, address).await
    }
}

/// The process-wide registry, made with [`Registry::with_defaults`] on first
/// use.
pub fn default_registry() -> &'static Registry {
    static DEFAULT: OnceLock<Registry> = OnceLock::new();
    DEFAULT.get_or_init(Registry::with_defaults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow::ErrorKind;

    #[test]
    fn register_replaces_and_reports_it() {
        let registry = Registry::new();
        assert!(registry.protocols().is_empty());
        assert!(!registry.register("mem", Arc::new(MemoryProtocol::new()), names(&["a"])));
        assert!(registry.register("mem", Arc::new(MemoryProtocol::new()), names(&["b"])));
        let (_, actual) = registry.lookup("mem").expect("registered");
        assert_eq!(actual, names(&["b"]));
        assert!(registry.lookup("other").is_none());
    }

    #[test]
    fn unknown_protocol_target() {
        let registry = Registry::new();
        assert!(registry.lookup("").is_none());
        let err = registry.register_unknown("nope").expect_err("unregistered");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("nope"));
        registry.register("mem", Arc::new(MemoryProtocol::new()), names(&["mem"]));
        registry.register_unknown("mem").expect("registered now");
        let (_, actual) = registry.lookup("").expect("unknown target");
        assert_eq!(actual, names(&["mem"]));
    }

    #[test]
    fn defaults_hold_every_transport() {
        let registry = Registry::with_defaults();
        let mut expected = names(&[
            "memory", "tcp", "tcp4", "tcp6", "ws", "ws4", "ws6", "wsh", "wsh4", "wsh6",
        ]);
        if cfg!(unix) {
            expected.push("unix".into());
            expected.sort();
        }
        assert_eq!(registry.protocols(), expected);
        let (_, actual) = registry.lookup("wsh6").expect("wsh6");
        assert_eq!(actual, names(&["tcp6", "ws6"]));
        let (_, actual) = registry.lookup("").expect("unknown is wsh");
        assert_eq!(actual, names(&["tcp4", "tcp6", "ws4", "ws6"]));
        assert!(std::ptr::eq(default_registry(), default_registry()));
    }

    #[tokio::test]
    async fn unknown_names_are_bad_args() {
        let registry = Registry::new();
        let err = registry
            .dial("quic", "127.0.0.1:1", Duration::from_secs(1))
            .await
            .expect_err("unknown");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("quic"));
        let err = registry
            .listen("quic", "x")
            .await
            .map(drop)
            .expect_err("unknown");
        assert!(err.message().contains("quic"));
        let err = registry.resolve("", "x").await.expect_err("no unknown");
        assert_eq!(err.kind(), ErrorKind::BadArg);
    }
}
