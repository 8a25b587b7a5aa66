//! Flow-control accounting, free of I/O and clocks (time comes in as
//! arguments).
//!
//! Receive side ([`RecvWindow`]): each flow has a window `W`; at every moment
//! `outstanding + buffered + unreleased == W`, where `outstanding` is credit
//! the peer holds, `buffered` bytes wait for the application, and `unreleased`
//! bytes were read but not yet granted back. Credit goes back (`Release`) once
//! half the window has been read; if that happened within two round trips the
//! window doubles, up to a cap and within the connection [`Budget`].
//!
//! Send side ([`SendCredit`] and [`SharedPool`]): a flow this side opens may
//! carry its first bytes inside `OpenFlow`, paid from the pool of shared
//! tokens the peer granted in its `Setup`. The peer answers every `OpenFlow`
//! at once with the flow's own credit (its window minus what the `OpenFlow`
//! carried); when that first grant arrives the borrowed tokens go back to the
//! pool.

use std::time::{Duration, Instant};

/// The sum of all flows' receive windows, bounded.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Self {
        Budget { limit, used: 0 }
    }

    /// Bytes of window still free.
    pub(crate) fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Charges `bytes` of window; may go over the limit (the caller keeps
    /// overdrafts to `min_window`-sized windows).
    pub(crate) fn charge(&mut self, bytes: u64) {
        self.used += bytes;
    }

    /// Gives back `bytes` of window charged earlier.
    pub(crate) fn refund(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// The window for a new flow: `initial` if the budget has it, else what
    /// is left, but never less than `min` or than `already` (bytes the flow
    /// brought inside its `OpenFlow`). Charges it.
    pub(crate) fn open_window(&mut self, initial: u64, min: u64, already: u64) -> u64 {
        let window = self.available().min(initial).max(min).max(already);
        self.charge(window);
        window
    }
}

/// What the peer did wrong with credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreditExceeded {
    /// Bytes the peer sent.
    pub(crate) sent: u64,
    /// Credit it held.
    pub(crate) credit: u64,
}

/// Receive-side accounting of one flow.
#[derive(Debug, Clone)]
pub(crate) struct RecvWindow {
    window: u64,
    outstanding: u64,
    buffered: u64,
    unreleased: u64,
    last_release: Option<Instant>,
}

impl RecvWindow {
    /// A window of `window` bytes of which the peer holds all as credit.
    pub(crate) fn new(window: u64) -> Self {
        RecvWindow {
            window,
            outstanding: window,
            buffered: 0,
            unreleased: 0,
            last_release: None,
        }
    }

    /// A window for a flow the peer opened with `carried` bytes inside its
    /// `OpenFlow`, paid from the shared tokens: the window holds just those
    /// bytes, and the peer has no credit of its own until the flow is
    /// accepted and widened.
    pub(crate) fn opened_by_peer(carried: u64) -> Self {
        RecvWindow {
            window: carried,
            outstanding: 0,
            buffered: carried,
            unreleased: 0,
            last_release: None,
        }
    }

    /// Widens the window to `window` bytes (when the flow is accepted);
    /// returns the credit added for the peer.
    pub(crate) fn widen_to(&mut self, window: u64) -> u64 {
        let added = window.saturating_sub(self.window);
        self.window += added;
        self.outstanding += added;
        added
    }

    /// The current window size.
    pub(crate) fn window(&self) -> u64 {
        self.window
    }

    /// Credit the peer holds.
    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Bytes received and not yet read.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> u64 {
        self.buffered
    }

    /// `n` bytes arrived from the peer.
    pub(crate) fn on_data(&mut self, n: u64) -> Result<(), CreditExceeded> {
        if n > self.outstanding {
            return Err(CreditExceeded {
                sent: n,
                credit: self.outstanding,
            });
        }
        self.outstanding -= n;
        self.buffered += n;
        Ok(())
    }

    /// The application read `n` buffered bytes. Returns the credit to grant
    /// back now, if any: once half the window has been read, everything read
    /// so far, plus the growth of the window when auto-tuning grows it (the
    /// window doubles when half of it was read within two round trips, up to
    /// `max_window` and as far as `budget` allows). A window larger than
    /// `max_window` (the cap dropped, say because other flows became busy)
    /// shrinks: part of what was read is not granted back. `now` is asked
    /// only when credit is granted.
    pub(crate) fn on_consumed(
        &mut self,
        n: u64,
        now: impl FnOnce() -> Instant,
        rtt: Duration,
        max_window: u64,
        budget: &mut Budget,
    ) -> Option<u64> {
        debug_assert!(n <= self.buffered);
        let n = n.min(self.buffered);
        self.buffered -= n;
        self.unreleased += n;
        if self.unreleased == 0 || self.unreleased < self.window.div_ceil(2) {
            return None;
        }
        let now = now();
        if self.window > max_window {
            // Shrink by withholding credit, never below what is buffered or
            // already granted.
            let shrink = (self.window - max_window).min(self.unreleased);
            self.unreleased -= shrink;
            self.window -= shrink;
            budget.refund(shrink);
            self.last_release = Some(now);
            return Some(self.release_all()).filter(|r| *r > 0);
        }
        let mut grow = 0;
        if let Some(last) = self.last_release {
            let fast = now.saturating_duration_since(last) < rtt.saturating_mul(2);
            if fast && self.window < max_window {
                grow = (max_window - self.window)
                    .min(self.window)
                    .min(budget.available());
            }
        }
        budget.charge(grow);
        self.window += grow;
        self.outstanding += grow;
        self.last_release = Some(now);
        Some(self.release_all() + grow)
    }

    /// Everything read is granted back at once (used when the flow no longer
    /// has a reader and its bytes are thrown away). Returns the credit.
    pub(crate) fn release_all(&mut self) -> u64 {
        let release = self.unreleased;
        self.unreleased = 0;
        self.outstanding += release;
        release
    }

    /// Drops every buffered byte as if read, and returns the credit to grant
    /// back (used when the application closed the flow).
    pub(crate) fn discard(&mut self) -> u64 {
        self.unreleased += self.buffered;
        self.buffered = 0;
        self.release_all()
    }

    /// Whether the conservation invariant holds.
    #[cfg(test)]
    pub(crate) fn is_conserved(&self) -> bool {
        self.outstanding + self.buffered + self.unreleased == self.window
    }
}

/// The pool of shared tokens the peer granted for first payloads.
#[derive(Debug, Clone)]
pub(crate) struct SharedPool {
    available: u64,
}

impl SharedPool {
    pub(crate) fn new(tokens: u64) -> Self {
        SharedPool { available: tokens }
    }

    pub(crate) fn available(&self) -> u64 {
        self.available
    }
}

/// Send-side credit of one flow.
#[derive(Debug, Clone)]
pub(crate) struct SendCredit {
    credit: u64,
    borrowed: u64,
    granted: bool,
}

impl SendCredit {
    /// Credit for a flow this side opens: none of its own until the peer's
    /// first grant.
    pub(crate) fn opened_locally() -> Self {
        SendCredit {
            credit: 0,
            borrowed: 0,
            granted: false,
        }
    }

    /// Credit for a flow the peer opened, granting `initial` bytes.
    pub(crate) fn opened_by_peer(initial: u64) -> Self {
        SendCredit {
            credit: initial,
            borrowed: 0,
            granted: true,
        }
    }

    /// The credit a write could take now: own credit if granted, else (for
    /// a flow whose `OpenFlow` has not gone out, when `can_borrow`, limited
    /// to `open_room` bytes in all) what `pool` lends.
    pub(crate) fn available(&self, pool: &SharedPool, can_borrow: bool, open_room: u64) -> u64 {
        if self.granted {
            self.credit
        } else if can_borrow {
            pool.available.min(open_room.saturating_sub(self.borrowed))
        } else {
            0
        }
    }

    /// Takes up to `want` bytes of the credit [`SendCredit::available`]
    /// reports. Returns the bytes taken.
    pub(crate) fn take(
        &mut self,
        want: u64,
        pool: &mut SharedPool,
        can_borrow: bool,
        open_room: u64,
    ) -> u64 {
        let n = want.min(self.available(pool, can_borrow, open_room));
        if self.granted {
            self.credit -= n;
        } else {
            pool.available -= n;
            self.borrowed += n;
        }
        n
    }

    /// The peer granted `tokens` more bytes. The first grant of a flow this
    /// side opened returns its borrowed tokens to `pool`.
    pub(crate) fn on_release(&mut self, tokens: u64, pool: &mut SharedPool) {
        if !self.granted {
            self.granted = true;
            pool.available += self.borrowed;
            self.borrowed = 0;
        }
        self.credit = self.credit.saturating_add(tokens);
    }

    /// The flow ended before its first grant: give the borrowed tokens back
    /// (the peer's grant will never be seen, so the pool would shrink for
    /// good otherwise). Only valid once the peer can no longer grant, i.e.
    /// when the connection is closing.
    pub(crate) fn forfeit(&mut self, pool: &mut SharedPool) {
        pool.available += self.borrowed;
        self.borrowed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RTT: Duration = Duration::from_millis(10);

    #[test]
    fn release_happens_at_half_window() {
        let mut budget = Budget::new(1 << 20);
        let mut w = RecvWindow::new(1000);
        let t0 = Instant::now();
        w.on_data(1000).unwrap();
        assert_eq!(w.on_consumed(499, || t0, RTT, 1000, &mut budget), None);
        assert_eq!(w.on_consumed(1, || t0, RTT, 1000, &mut budget), Some(500));
        assert!(w.is_conserved());
        assert_eq!(w.outstanding(), 500);
    }

    #[test]
    fn credit_beyond_window_is_refused() {
        let mut w = RecvWindow::new(10);
        w.on_data(6).unwrap();
        assert_eq!(w.on_data(5), Err(CreditExceeded { sent: 5, credit: 4 }));
    }

    #[test]
    fn window_grows_when_read_fast_and_within_budget() {
        let mut budget = Budget::new(1000 + 1500);
        budget.charge(1000);
        let mut w = RecvWindow::new(1000);
        let t0 = Instant::now();
        w.on_data(1000).unwrap();
        // The first release has no earlier one to compare with: no growth.
        assert_eq!(w.on_consumed(500, || t0, RTT, 8000, &mut budget), Some(500));
        // Half a window again within 2 RTT: doubles.
        assert_eq!(
            w.on_consumed(500, || t0 + RTT, RTT, 8000, &mut budget),
            Some(1500)
        );
        assert_eq!(w.window(), 2000);
        assert!(w.is_conserved());
        // Budget only had 500 left.
        w.on_data(2000).unwrap();
        assert_eq!(
            w.on_consumed(1000, || t0 + RTT * 2, RTT, 8000, &mut budget),
            Some(1500)
        );
        assert_eq!(w.window(), 2500);
        assert_eq!(budget.available(), 0);
        // Slow reading does not grow.
        assert_eq!(
            w.on_consumed(1000, || t0 + RTT * 20, RTT, 8000, &mut budget),
            None
        );
        assert!(w.is_conserved());
    }

    #[test]
    fn a_lowered_cap_shrinks_the_window_by_withholding_credit() {
        let mut budget = Budget::new(1 << 20);
        budget.charge(8000);
        let mut w = RecvWindow::new(8000);
        let t0 = Instant::now();
        w.on_data(8000).unwrap();
        // Half read with a cap of 2000: 4000 read, 4000 of it withheld... at
        // most what was read.
        assert_eq!(w.on_consumed(4000, || t0, RTT, 2000, &mut budget), None);
        assert_eq!(w.window(), 4000);
        assert!(w.is_conserved());
        assert_eq!(
            w.on_consumed(4000, || t0, RTT, 2000, &mut budget),
            Some(2000)
        );
        assert_eq!(w.window(), 2000);
        assert_eq!(budget.used(), 2000);
        assert!(w.is_conserved());
    }

    #[test]
    fn borrowed_tokens_return_on_first_grant() {
        let mut pool = SharedPool::new(100);
        let mut a = SendCredit::opened_locally();
        assert_eq!(a.take(70, &mut pool, true, 1000), 70);
        let mut b = SendCredit::opened_locally();
        assert_eq!(b.take(70, &mut pool, true, 1000), 30);
        assert_eq!(pool.available(), 0);
        a.on_release(500, &mut pool);
        assert_eq!(pool.available(), 70);
        assert_eq!(a.credit, 500);
        // Later grants do not touch the pool.
        a.on_release(10, &mut pool);
        assert_eq!(pool.available(), 70);
        // A flow whose OpenFlow is out cannot borrow.
        assert_eq!(b.take(10, &mut pool, false, 1000), 0);
    }

    #[test]
    fn open_window_respects_budget_and_carried_bytes() {
        let mut budget = Budget::new(300);
        assert_eq!(budget.open_window(256, 16, 0), 256);
        assert_eq!(budget.open_window(256, 16, 0), 44);
        assert_eq!(budget.open_window(256, 16, 0), 16);
        assert_eq!(budget.open_window(256, 16, 100), 100);
    }

    proptest! {
        /// Any interleaving of arrivals and reads keeps the window conserved,
        /// never lets buffered bytes exceed the window, and refuses exactly
        /// the arrivals beyond credit.
        #[test]
        fn recv_window_is_conserved(ops in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..50), 1..200)) {
            let mut budget = Budget::new(64 * 1024);
            let mut w = RecvWindow::new(4096);
            budget.charge(4096);
            let mut now = Instant::now();
            for (arrive, n, dt) in ops {
                now += Duration::from_millis(dt);
                if arrive {
                    let before = w.outstanding();
                    match w.on_data(n) {
                        Ok(()) => prop_assert!(n <= before),
                        Err(e) => prop_assert_eq!(e, CreditExceeded { sent: n, credit: before }),
                    }
                } else {
                    let n = n.min(w.buffered());
                    let _ = w.on_consumed(n, || now, RTT, 64 * 1024, &mut budget);
                }
                prop_assert!(w.is_conserved());
                prop_assert!(w.buffered() <= w.window());
                prop_assert!(w.window() <= 64 * 1024);
                prop_assert!(budget.used() <= 64 * 1024);
            }
        }

        /// Shared tokens are conserved: pool plus everything borrowed is the
        /// original grant.
        #[test]
        fn shared_tokens_are_conserved(ops in proptest::collection::vec((0usize..8, 0u64..3000, any::<bool>()), 1..200)) {
            let mut pool = SharedPool::new(10_000);
            let mut flows: Vec<SendCredit> = (0..8).map(|_| SendCredit::opened_locally()).collect();
            for (i, n, grant) in ops {
                if grant {
                    flows[i].on_release(n, &mut pool);
                } else {
                    let _ = flows[i].take(n, &mut pool, true, 4096);
                    prop_assert!(flows[i].borrowed <= 4096);
                }
                let borrowed: u64 = flows.iter().map(|f| f.borrowed).sum();
                prop_assert_eq!(pool.available() + borrowed, 10_000);
            }
        }
    }
}
