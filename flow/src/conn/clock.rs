//! The health-check clock of every connection in the process: one thread
//! that sleeps until the earliest deadline and runs what is due.
//!
//! Connection tasks arm no tokio timer for health checks. A tokio runtime
//! with any timer pending passes a timeout to every `epoll_wait` it parks
//! in, which costs the kernel a timer per park — a measurable part of a
//! small round trip. Health-check deadlines are seconds away and only ever
//! move later, so one coarse thread serves them all: each connection has
//! at most one entry, re-armed lazily when it fires (a deadline that moved
//! later fires early, finds nothing due, and is armed again).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};

/// What the clock calls when a deadline passes.
pub(crate) trait Deadline: Send + Sync + 'static {
    /// Runs what was due at `now`; returns the next deadline, if any.
    fn fire(&self, now: Instant) -> Option<Instant>;
}

/// A registration with the clock. Its owner keeps it; the clock holds it
/// only weakly, so an owner that is gone leaves behind a few bytes until
/// its deadline passes, never the owner itself.
pub(crate) struct Watch(Weak<dyn Deadline>);

impl Watch {
    /// A registration for `target` (not armed until [`arm`]).
    pub(crate) fn new(target: Weak<dyn Deadline>) -> Arc<Watch> {
        Arc::new(Watch(target))
    }
}

/// One armed deadline.
struct Due {
    at: Instant,
    watch: Weak<Watch>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    /// Earliest first in a (max-)heap.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

/// The deadlines, and what wakes the clock thread when an earlier one
/// arrives.
struct Clock {
    due: Mutex<BinaryHeap<Due>>,
    earlier: Condvar,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Arms `watch` to fire at `at`.
pub(crate) fn arm(watch: &Arc<Watch>, at: Instant) {
    let clock = CLOCK.get_or_init(|| Clock {
        due: Mutex::new(BinaryHeap::new()),
        earlier: Condvar::new(),
    });
    clock.insert(at, Arc::downgrade(watch));
    start(clock);
}

/// Starts the clock thread unless it runs. If the system cannot make a
/// thread now, the next [`arm`] tries again; the deadlines wait meanwhile.
fn start(clock: &'static Clock) {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed};
    if STARTED.load(Relaxed) || STARTED.swap(true, AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("flow-clock".into())
        .spawn(move || clock.run());
    if let Err(e) = spawned {
        tracing::warn!("cannot start the health-check clock thread: {e}");
        STARTED.store(false, Relaxed);
    }
}

impl Clock {
    fn insert(&self, at: Instant, watch: Weak<Watch>) {
        let mut due = self.due.lock();
        let earliest = due.peek().is_none_or(|top| at < top.at);
        due.push(Due { at, watch });
        drop(due);
        if earliest {
            self.earlier.notify_one();
        }
    }

    /// The clock thread: fires what is due, then sleeps until the next
    /// deadline or an earlier one arrives.
    fn run(&self) {
        let mut due = self.due.lock();
        loop {
            let now = Instant::now();
            match due.peek().map(|top| top.at) {
                None => self.earlier.wait(&mut due),
                Some(at) if at > now => {
                    self.earlier.wait_until(&mut due, at);
                }
                Some(_) => {
                    if let Some(entry) = due.pop() {
                        let next = MutexGuard::unlocked(&mut due, || fire(&entry.watch));
                        if let Some(at) = next {
                            due.push(Due {
                                at,
                                watch: entry.watch,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Fires `watch` if its owner is still there; its next deadline. A
/// firing that panics drops that owner's entry, not the clock thread.
fn fire(watch: &Weak<Watch>) -> Option<Instant> {
    let target = watch.upgrade()?.0.upgrade()?;
    let now = Instant::now();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.fire(now))).unwrap_or(None)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use super::*;

    /// Counts firings; asks to fire again `again` more times, `every`
    /// apart.
    struct Counter {
        fired: AtomicUsize,
        again: usize,
        every: Duration,
    }

    impl Deadline for Counter {
        fn fire(&self, now: Instant) -> Option<Instant> {
            let n = self.fired.fetch_add(1, SeqCst) + 1;
            (n <= self.again).then_some(now + self.every)
        }
    }

    fn new_counter(again: usize) -> (Arc<Counter>, Arc<Watch>) {
        let counter = Arc::new(Counter {
            fired: AtomicUsize::new(0),
            again,
            every: Duration::from_millis(10),
        });
        let target: Arc<dyn Deadline> = counter.clone();
        let watch = Watch::new(Arc::downgrade(&target));
        (counter, watch)
    }

    /// Waits (at most 5 s) until `cond` holds.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cond()
    }

    #[test]
    fn fires_at_the_deadline_and_again_while_asked() {
        let (counter, watch) = new_counter(2);
        let armed_at = Instant::now();
        arm(&watch, armed_at + Duration::from_millis(30));
        assert!(eventually(|| counter.fired.load(SeqCst) == 3));
        assert!(armed_at.elapsed() >= Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(counter.fired.load(SeqCst), 3, "fired after returning None");
    }

    #[test]
    fn an_earlier_deadline_is_not_held_up_by_a_later_one() {
        let (late, late_watch) = new_counter(0);
        arm(&late_watch, Instant::now() + Duration::from_secs(3600));
        let (early, early_watch) = new_counter(0);
        arm(&early_watch, Instant::now() + Duration::from_millis(20));
        assert!(eventually(|| early.fired.load(SeqCst) == 1));
        assert_eq!(late.fired.load(SeqCst), 0);
    }

    #[test]
    fn a_dropped_watch_never_fires() {
        let (counter, watch) = new_counter(0);
        arm(&watch, Instant::now() + Duration::from_millis(20));
        drop(watch);
        // A second watch armed after it, to know the first one's time has
        // passed through the clock.
        let (after, after_watch) = new_counter(0);
        arm(&after_watch, Instant::now() + Duration::from_millis(40));
        assert!(eventually(|| after.fired.load(SeqCst) == 1));
        assert_eq!(counter.fired.load(SeqCst), 0);
    }
}
