//! The Redis tier's circuit breaker: closed, requests use Redis; open, they skip it at the cost of
//! one atomic load, while the prober thread alone touches Redis (a PING per interval, the interval
//! doubling per failed probe) and closes the breaker when Redis answers.
//!
//! Invariant: only `trip` opens and only `close` closes, each under the state lock, so exactly one
//! caller sees each transition (and logs it): one line when an episode starts, one when it ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The first probe after a trip, and the longest wait between probes.
const FIRST_PROBE: Duration = Duration::from_millis(100);
const MAX_PROBE: Duration = Duration::from_secs(5);
/// A breaker that trips again within this time of closing keeps its probe interval: a flapping
/// Redis is probed (and logged about) less and less often.
const SETTLED: Duration = Duration::from_secs(30);

struct State {
    opened_at: Option<Instant>,
    closed_at: Option<Instant>,
    interval: Duration,
    shutdown: bool,
}

pub struct Breaker {
    open: AtomicBool,
    trips: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            trips: AtomicU64::new(0),
            state: Mutex::new(State { opened_at: None, closed_at: None, interval: FIRST_PROBE, shutdown: false }),
            changed: Condvar::new(),
        }
    }
}

impl Breaker {
    /// The hot path's question: one atomic load.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// Opens the breaker; true for the one call that opened it (it logs the episode).
    pub fn trip(&self) -> bool {
        let mut st = self.state.lock();
        if self.open.load(Ordering::Relaxed) {
            return false;
        }
        self.open.store(true, Ordering::Release);
        self.trips.fetch_add(1, Ordering::Relaxed);
        if st.closed_at.is_none_or(|t| t.elapsed() >= SETTLED) {
            st.interval = FIRST_PROBE;
        }
        st.opened_at = Some(Instant::now());
        self.changed.notify_all();
        true
    }

    /// Closes the breaker (the prober, after a probe succeeded); returns how long it was open.
    pub fn close(&self) -> Duration {
        let mut st = self.state.lock();
        self.open.store(false, Ordering::Release);
        st.closed_at = Some(Instant::now());
        st.opened_at.take().map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// The prober's wait: until the breaker is open and a probe interval has passed. False when
    /// the tier shuts down.
    pub fn wait_to_probe(&self) -> bool {
        let mut st = self.state.lock();
        loop {
            if st.shutdown {
                return false;
            }
            if !self.open.load(Ordering::Relaxed) {
                self.changed.wait(&mut st);
                continue;
            }
            let interval = st.interval;
            let timed_out = self.changed.wait_for(&mut st, interval).timed_out();
            if timed_out && !st.shutdown && self.open.load(Ordering::Relaxed) {
                return true;
            }
        }
    }

    /// A probe failed: wait twice as long before the next one (up to `MAX_PROBE`).
    pub fn probe_failed(&self) {
        let mut st = self.state.lock();
        st.interval = (st.interval * 2).min(MAX_PROBE);
    }

    pub fn shutdown(&self) {
        self.state.lock().shutdown = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_trip_and_one_close_per_episode() {
        let b = Breaker::default();
        assert!(!b.is_open());
        assert!(b.trip());
        assert!(!b.trip() && !b.trip(), "only the first caller opens it");
        assert!(b.is_open() && b.trips() == 1);
        b.close();
        assert!(!b.is_open());
        assert!(b.trip());
        assert_eq!(b.trips(), 2);
    }

    #[test]
    fn the_prober_waits_for_an_open_breaker_and_stops_at_shutdown() {
        let b = Arc::new(Breaker::default());
        let prober = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let mut probes = 0;
                while b.wait_to_probe() {
                    probes += 1;
                    b.close();
                }
                probes
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        b.trip();
        while b.is_open() {
            std::thread::sleep(Duration::from_millis(5));
        }
        b.shutdown();
        assert_eq!(prober.join().unwrap(), 1);
    }

    #[test]
    fn failed_probes_back_off_and_a_flapping_breaker_keeps_its_pace() {
        let b = Breaker::default();
        b.trip();
        for _ in 0..10 {
            b.probe_failed();
        }
        assert_eq!(b.state.lock().interval, MAX_PROBE);
        b.close();
        b.trip(); // again within SETTLED
        assert_eq!(b.state.lock().interval, MAX_PROBE);
    }
}
