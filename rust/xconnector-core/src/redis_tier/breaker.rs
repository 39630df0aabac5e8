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
/// A breaker that trips again within this time of closing is the same episode: its probe interval
/// doubles (a Redis that answers PING but fails real calls costs a request less and less often)
/// and neither the trip nor the next close is logged.
const SETTLED: Duration = Duration::from_secs(30);

struct State {
    opened_at: Option<Instant>,
    closed_at: Option<Instant>,
    interval: Duration,
    /// The open episode was logged when it started (so its end is logged too).
    logged: bool,
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
            state: Mutex::new(State {
                opened_at: None,
                closed_at: None,
                interval: FIRST_PROBE,
                logged: false,
                shutdown: false,
            }),
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

    /// Opens the breaker: Some for the one call that opened it, true if that starts a new
    /// episode (the caller logs it). A trip soon after a close is the same episode, probed more
    /// slowly.
    pub fn trip(&self) -> Option<bool> {
        let mut st = self.state.lock();
        if self.open.load(Ordering::Relaxed) {
            return None;
        }
        self.open.store(true, Ordering::Release);
        self.trips.fetch_add(1, Ordering::Relaxed);
        let new_episode = st.closed_at.is_none_or(|t| t.elapsed() >= SETTLED);
        st.interval = if new_episode { FIRST_PROBE } else { (st.interval * 2).min(MAX_PROBE) };
        st.logged = new_episode;
        st.opened_at = Some(Instant::now());
        self.changed.notify_all();
        Some(new_episode)
    }

    /// Closes the breaker (the prober, after a probe succeeded); how long it was open, if its
    /// episode was logged (then its end is logged too).
    pub fn close(&self) -> Option<Duration> {
        let mut st = self.state.lock();
        self.open.store(false, Ordering::Release);
        st.closed_at = Some(Instant::now());
        let open_for = st.opened_at.take().map_or(Duration::ZERO, |t| t.elapsed());
        std::mem::take(&mut st.logged).then_some(open_for)
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
        assert_eq!(b.trip(), Some(true));
        assert!(b.trip().is_none() && b.trip().is_none(), "only the first caller opens it");
        assert!(b.is_open() && b.trips() == 1);
        assert!(b.close().is_some(), "the logged episode's end is logged");
        assert!(!b.is_open());
        assert_eq!(b.trip(), Some(false), "tripping again at once is the same episode: not logged");
        assert_eq!(b.trips(), 2);
        assert!(b.close().is_none());
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

    #[test]
    fn a_redis_that_answers_ping_but_fails_calls_is_probed_less_and_less_often() {
        // Every probe succeeds, every real call after it fails: the interval still grows.
        let b = Breaker::default();
        assert_eq!(b.trip(), Some(true));
        let mut seen = vec![b.state.lock().interval];
        for _ in 0..8 {
            b.close();
            assert_eq!(b.trip(), Some(false));
            seen.push(b.state.lock().interval);
        }
        assert_eq!(seen[0], FIRST_PROBE);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]) && *seen.last().unwrap() == MAX_PROBE, "{seen:?}");
    }
}
