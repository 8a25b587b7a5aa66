//! One accept queue over every connection: flows the peers open on any
//! listened-on, proxied or dialed connection come out of one `accept()`.
//!
//! Each connection keeps its own queue of flows waiting to be accepted
//! (bounded by its `max_pending_accepts`). The hub registers a waker with
//! each connection that puts the connection on a ready list and wakes one
//! waiting `accept()`; no task runs per connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};

use flow::conn::{Conn, Flow};
use flow::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Connections that may have flows waiting.
#[derive(Default)]
struct Ready {
    queue: VecDeque<u64>,
    queued: HashSet<u64>,
}

struct Registered {
    conn: Conn,
    waker: Waker,
}

/// The shared accept queue.
pub(crate) struct AcceptHub {
    /// Never held while a connection's lock is taken (wakers run under it).
    ready: Mutex<Ready>,
    conns: Mutex<HashMap<u64, Registered>>,
    notify: Notify,
    /// Bumped by `stop_listening`: accepts pending across it fail.
    epoch: Mutex<u64>,
    closed: Mutex<bool>,
    next_id: Mutex<u64>,
}

struct ConnWaker {
    hub: Weak<AcceptHub>,
    id: u64,
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(hub) = self.hub.upgrade() {
            hub.mark_ready(self.id);
        }
    }
}

impl AcceptHub {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(AcceptHub {
            ready: Mutex::new(Ready::default()),
            conns: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            epoch: Mutex::new(0),
            closed: Mutex::new(false),
            next_id: Mutex::new(0),
        })
    }

    fn mark_ready(&self, id: u64) {
        {
            let mut ready = self.ready.lock();
            if !ready.queued.insert(id) {
                return;
            }
            ready.queue.push_back(id);
        }
        self.notify.notify_one();
    }

    /// Adds a connection whose peer may open flows.
    pub(crate) fn add(self: &Arc<Self>, conn: Conn) {
        let id = {
            let mut next = self.next_id.lock();
            *next += 1;
            *next
        };
        let waker = Waker::from(Arc::new(ConnWaker {
            hub: Arc::downgrade(self),
            id,
        }));
        self.conns.lock().insert(id, Registered { conn, waker });
        // Poll it once to register the waker (and pick up queued flows).
        self.mark_ready(id);
    }

    /// Fails every pending `accept()` (they see [`ErrorKind::Aborted`]);
    /// later calls work again.
    pub(crate) fn interrupt(&self) {
        *self.epoch.lock() += 1;
        self.notify.notify_waiters();
    }

    /// Fails pending and later `accept()` calls for good.
    pub(crate) fn close(&self) {
        *self.closed.lock() = true;
        self.notify.notify_waiters();
    }

    /// The next flow any peer opened.
    pub(crate) async fn accept(&self) -> Result<Flow> {
        let epoch = *self.epoch.lock();
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if *self.closed.lock() {
                return Err(Error::new(ErrorKind::Aborted, "manager is closed"));
            }
            if *self.epoch.lock() != epoch {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    "stopped listening while waiting to accept",
                ));
            }
            if let Some(flow) = self.poll_ready() {
                return Ok(flow);
            }
            notified.await;
        }
    }

    /// Polls the connections on the ready list until one yields a flow.
    fn poll_ready(&self) -> Option<Flow> {
        loop {
            let id = {
                let mut ready = self.ready.lock();
                let id = ready.queue.pop_front()?;
                ready.queued.remove(&id);
                id
            };
            let (conn, waker) = match self.conns.lock().get(&id) {
                Some(r) => (r.conn.clone(), r.waker.clone()),
                None => continue,
            };
            let mut cx = Context::from_waker(&waker);
            match conn.poll_accept_flow(&mut cx) {
                Poll::Ready(Ok(flow)) => {
                    // There may be more: keep it on the list, and let another
                    // waiter look.
                    self.mark_ready(id);
                    return Some(flow);
                }
                Poll::Ready(Err(_)) => {
                    self.conns.lock().remove(&id);
                }
                Poll::Pending => {}
            }
        }
    }

    /// Forgets closed connections.
    pub(crate) fn sweep(&self) {
        self.conns.lock().retain(|_, r| !r.conn.is_closed());
    }
}
