//! Telling whoever holds idle connections that the process ran out of file
//! descriptors (or socket buffers), so they can close some.
//!
//! File-descriptor limits are per process, so the hooks are too: a listener
//! that cannot accept calls every registered hook before it backs off and
//! retries. A connection manager registers one that closes its least
//! recently used idle connections.

use std::sync::{Arc, Mutex, PoisonError, Weak};

type Hook = dyn Fn() + Send + Sync;

static HOOKS: Mutex<Vec<Weak<Hook>>> = Mutex::new(Vec::new());

/// Registers `hook` to run when accepting fails for lack of resources. It
/// stays registered while the `Arc` lives.
pub fn on_resource_exhaustion(hook: &Arc<Hook>) {
    let mut hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
    hooks.retain(|h| h.strong_count() > 0);
    hooks.push(Arc::downgrade(hook));
}

/// Runs every live hook; returns how many ran.
pub fn resources_exhausted() -> usize {
    let live: Vec<Arc<Hook>> = {
        let mut hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        hooks.retain(|h| h.strong_count() > 0);
        hooks.iter().filter_map(Weak::upgrade).collect()
    };
    for hook in &live {
        hook();
    }
    live.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn hooks_run_while_alive() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let hook: Arc<Hook> = Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        on_resource_exhaustion(&hook);
        resources_exhausted();
        assert!(count.load(Ordering::SeqCst) >= 1);
        let before = count.load(Ordering::SeqCst);
        drop(hook);
        resources_exhausted();
        assert_eq!(count.load(Ordering::SeqCst), before);
    }
}
