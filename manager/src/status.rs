//! What a manager listens on, what failed, and a notification of changes.

use std::collections::HashMap;

use flow::Error;
use flow::naming::Endpoint;
use tokio::sync::watch;

/// A snapshot of a manager's listening state (Vanadium's `ListenStatus`).
#[derive(Debug, Clone)]
pub struct ListenStatus {
    /// Endpoints the manager accepts flows on, all with its routing id and
    /// blessing names (proxied ones included). When it listens nowhere, one
    /// endpoint with only the routing id, for flows back over connections it
    /// dialed.
    pub endpoints: Vec<Endpoint>,
    /// Errors listening or accepting, keyed by (protocol, address) as given
    /// to `listen`.
    pub listen_errors: HashMap<(String, String), Error>,
    /// Per proxy name: `None` when listening through it works, else why not.
    pub proxy_errors: HashMap<String, Option<Error>>,
    /// Changes after this snapshot.
    changes: watch::Receiver<u64>,
    generation: u64,
}

impl ListenStatus {
    /// Resolves at the first change after this snapshot was taken (at once
    /// if one happened already), or when the manager is gone.
    pub async fn changed(&self) {
        let mut rx = self.changes.clone();
        let generation = self.generation;
        let _ = rx.wait_for(|g| *g != generation).await;
    }
}

/// The mutable state behind [`ListenStatus`].
#[derive(Debug, Default)]
pub(crate) struct StatusState {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) proxy_endpoints: HashMap<String, Vec<Endpoint>>,
    pub(crate) listen_errors: HashMap<(String, String), Error>,
    pub(crate) proxy_errors: HashMap<String, Option<Error>>,
}

/// The state plus its change counter.
#[derive(Debug)]
pub(crate) struct StatusCell {
    state: parking_lot::Mutex<StatusState>,
    changes: watch::Sender<u64>,
}

impl StatusCell {
    pub(crate) fn new() -> Self {
        StatusCell {
            state: parking_lot::Mutex::new(StatusState::default()),
            changes: watch::channel(0).0,
        }
    }

    /// Changes the state and tells everyone watching.
    pub(crate) fn update(&self, f: impl FnOnce(&mut StatusState)) {
        f(&mut self.state.lock());
        self.changes.send_modify(|g| *g += 1);
    }

    /// A snapshot; `bidi` is the endpoint shown when nothing listens.
    pub(crate) fn snapshot(&self, bidi: &Endpoint) -> ListenStatus {
        let state = self.state.lock();
        let changes = self.changes.subscribe();
        let generation = *changes.borrow();
        let mut endpoints = state.endpoints.clone();
        let mut proxies: Vec<_> = state.proxy_endpoints.iter().collect();
        proxies.sort_by(|a, b| a.0.cmp(b.0));
        for (_, eps) in proxies {
            endpoints.extend(eps.iter().cloned());
        }
        if endpoints.is_empty() {
            endpoints.push(bidi.clone());
        }
        ListenStatus {
            endpoints,
            listen_errors: state.listen_errors.clone(),
            proxy_errors: state.proxy_errors.clone(),
            changes,
            generation,
        }
    }
}
