//! Pinned connections: kept out of idle eviction and re-dialed, with
//! jittered exponential backoff, whenever they close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flow::Result;
use flow::auth::PeerAuthorizer;
use flow::conn::Conn;
use flow::naming::Endpoint;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::manager::Manager;

/// How a pinned connection is kept.
#[derive(Debug, Clone)]
pub struct PinOptions {
    /// Channel timeout of the connection (zero: the manager's default).
    pub channel_timeout: Duration,
    /// First delay before re-dialing.
    pub min_backoff: Duration,
    /// Largest delay between re-dials.
    pub max_backoff: Duration,
}

impl Default for PinOptions {
    fn default() -> Self {
        PinOptions {
            channel_timeout: Duration::ZERO,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(10),
        }
    }
}

struct PinInner {
    current: watch::Sender<Conn>,
    unpinned: AtomicBool,
    manager: Manager,
}

/// A connection the manager keeps: [`PinnedConn::conn`] is always the
/// current one; it changes when the manager re-dials after a close.
#[derive(Clone)]
pub struct PinnedConn {
    inner: Arc<PinInner>,
}

impl std::fmt::Debug for PinnedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedConn")
            .field("conn", &*self.inner.current.borrow())
            .finish()
    }
}

impl PinnedConn {
    /// The current connection (never absent; it may be closed while a
    /// re-dial is under way).
    pub fn conn(&self) -> Conn {
        self.inner.current.borrow().clone()
    }

    /// Resolves when [`PinnedConn::conn`] changes.
    pub async fn changed(&self) {
        let mut rx = self.inner.current.subscribe();
        rx.borrow_and_update();
        let _ = rx.changed().await;
    }

    /// Returns the connection to normal eviction and stops re-dialing.
    /// Idempotent.
    pub fn unpin(&self) {
        if self.inner.unpinned.swap(true, Ordering::SeqCst) {
            return;
        }
        let conn = self.conn();
        self.inner.manager.inner.cache.lock().pin(&conn, -1);
        // Wake the keeper so it notices.
        self.inner.current.send_modify(|_| {});
    }

    /// Whether [`PinnedConn::unpin`] was called.
    pub fn is_unpinned(&self) -> bool {
        self.inner.unpinned.load(Ordering::SeqCst)
    }
}

impl Manager {
    /// Dials (or reuses) a connection to `remote` and keeps it: never
    /// evicted for idleness, re-dialed whenever it closes until unpinned.
    pub async fn pin(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        opts: PinOptions,
    ) -> Result<PinnedConn> {
        let conn = self
            .conn_for(remote, &authorizer, opts.channel_timeout, false)
            .await?;
        self.inner.cache.lock().pin(&conn, 1);
        let (current, _) = watch::channel(conn);
        let pinned = PinnedConn {
            inner: Arc::new(PinInner {
                current,
                unpinned: AtomicBool::new(false),
                manager: self.clone(),
            }),
        };
        tokio::spawn(keep(
            Arc::downgrade(&pinned.inner),
            remote.clone(),
            authorizer,
            opts,
        ));
        Ok(pinned)
    }
}

/// Waits for the pinned connection to close and dials a new one.
async fn keep(
    pin: std::sync::Weak<PinInner>,
    remote: Endpoint,
    authorizer: Arc<dyn PeerAuthorizer>,
    opts: PinOptions,
) {
    loop {
        let (conn, mut changes) = match pin.upgrade() {
            Some(p) => (p.current.borrow().clone(), p.current.subscribe()),
            None => return,
        };
        // Wait for the close, or for an unpin.
        tokio::select! {
            _ = conn.closed() => {}
            _ = changes.changed() => {}
        }
        let mut backoff = Backoff::new(opts.min_backoff, opts.max_backoff);
        loop {
            let Some(p) = pin.upgrade() else { return };
            if p.unpinned.load(Ordering::SeqCst) {
                return;
            }
            if !p.current.borrow().is_closed() {
                break;
            }
            let manager = p.manager.clone();
            drop(p);
            match manager
                .conn_for(&remote, &authorizer, opts.channel_timeout, false)
                .await
            {
                Ok(new) => {
                    let Some(p) = pin.upgrade() else { return };
                    if p.unpinned.load(Ordering::SeqCst) {
                        return;
                    }
                    manager.inner.cache.lock().pin(&new, 1);
                    p.current.send_replace(new);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, %remote, "re-dialing pinned connection failed");
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
        }
    }
}
