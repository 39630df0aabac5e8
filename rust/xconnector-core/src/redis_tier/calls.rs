//! Calls with a deadline: the hot path hands each Redis operation to a helper thread and waits for
//! its result at most until the deadline, so no server behaviour (no reply, a reply dripping in,
//! a stalled TLS handshake, a slow name lookup) holds a request longer than that. A late call runs
//! on in its helper and its result is dropped; a call whose caller gave up before a helper took it
//! is skipped, so calls abandoned under a hung Redis never pile up to run later for nobody.
//!
//! Invariant: `idle` counts helpers waiting for work that no `wakeups` token is promised to yet;
//! a job is queued and either an idle helper is woken (its token taken) or a new helper started,
//! up to `MAX_HELPERS`; beyond that it waits for a busy helper to finish.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub type Job = Box<dyn FnOnce() + Send>;

/// Helpers at most: as many hot-path calls can wait on Redis at once.
const MAX_HELPERS: usize = 8;
/// Background jobs (deletes) queued at most; beyond, they are dropped.
const MAX_BACKGROUND: usize = 64;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    wakeups: usize,
    shutdown: bool,
}

/// A call started on a helper.
pub struct Started<T> {
    rx: Receiver<T>,
    gave_up: Arc<AtomicBool>,
}

impl<T> Started<T> {
    /// Its result if it comes by `deadline`, else None (and the call is abandoned).
    pub fn wait(self, deadline: Instant) -> Option<T> {
        self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
    }
}

impl<T> Drop for Started<T> {
    /// A call nobody waits for any more is skipped if no helper took it yet.
    fn drop(&mut self) {
        self.gave_up.store(true, Ordering::Release);
    }
}

#[derive(Default)]
pub struct Helpers {
    state: Mutex<State>,
    ready: Condvar,
}

impl Helpers {
    /// Runs `f` on a helper; its result if it comes within `limit`, else None.
    pub fn run<T: Send + 'static>(
        self: &Arc<Self>,
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        self.start(f).wait(Instant::now() + limit)
    }

    /// Starts `f` on a helper, for the caller to wait for later (or drop: then it is skipped if
    /// no helper took it yet).
    pub fn start<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce() -> T + Send + 'static) -> Started<T> {
        let (tx, rx) = sync_channel(1);
        let gave_up = Arc::new(AtomicBool::new(false));
        let skip = Arc::clone(&gave_up);
        self.spawn(Box::new(move || {
            if !skip.load(Ordering::Acquire) {
                let _ = tx.send(f()); // the caller may have stopped waiting meanwhile
            }
        }));
        Started { rx, gave_up }
    }

    /// Queues a job nobody waits for (a delete), unless `MAX_BACKGROUND` are queued already.
    pub fn spawn_background(self: &Arc<Self>, job: Job) {
        if self.state.lock().jobs.len() < MAX_BACKGROUND {
            self.spawn(job);
        }
    }

    /// Queues `job` for a helper, without waiting for it.
    pub fn spawn(self: &Arc<Self>, job: Job) {
        let mut st = self.state.lock();
        if st.shutdown {
            return;
        }
        st.jobs.push_back(job);
        if st.idle > 0 {
            st.idle -= 1;
            st.wakeups += 1;
            self.ready.notify_one();
        } else if st.threads < MAX_HELPERS {
            let me = Arc::clone(self);
            let started = std::thread::Builder::new()
                .name(format!("xconnector-redis-io-{}", st.threads))
                .spawn(move || me.work());
            if started.is_ok() {
                st.threads += 1;
            }
        }
    }

    fn work(&self) {
        loop {
            let job = {
                let mut st = self.state.lock();
                loop {
                    if let Some(job) = st.jobs.pop_front() {
                        break job;
                    }
                    if st.shutdown {
                        st.threads -= 1;
                        return;
                    }
                    st.idle += 1;
                    while st.wakeups == 0 && !st.shutdown {
                        self.ready.wait(&mut st);
                    }
                    if st.wakeups > 0 {
                        st.wakeups -= 1;
                    } else {
                        st.idle -= 1;
                    }
                }
            };
            // A panic in a job must not take its helper (and the count above) with it.
            let _ = catch_unwind(AssertUnwindSafe(job));
        }
    }

    /// Drops queued jobs; helpers exit when their current job (if any) ends.
    pub fn shutdown(&self) {
        let mut st = self.state.lock();
        st.shutdown = true;
        st.jobs.clear();
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_late_call_is_abandoned_at_its_deadline() {
        let h = Arc::new(Helpers::default());
        assert_eq!(h.run(Duration::from_secs(5), || 7), Some(7));
        let t0 = Instant::now();
        assert_eq!(h.run(Duration::from_millis(20), || std::thread::sleep(Duration::from_secs(2))), None);
        assert!(t0.elapsed() < Duration::from_secs(2));
        // Another helper serves the next call meanwhile.
        assert_eq!(h.run(Duration::from_secs(5), || 8), Some(8));
        h.shutdown();
    }

    #[test]
    fn calls_abandoned_before_a_helper_took_them_never_run() {
        let h = Arc::new(Helpers::default());
        let release = Arc::new(AtomicBool::new(false));
        let ran = Arc::new(AtomicUsize::new(0));
        // Every helper stuck (a hung Redis)...
        for _ in 0..MAX_HELPERS {
            let release = Arc::clone(&release);
            h.spawn(Box::new(move || {
                while !release.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        // ...so these calls wait in the queue until their callers give up.
        for _ in 0..20 {
            let ran = Arc::clone(&ran);
            assert_eq!(h.run(Duration::from_millis(5), move || ran.fetch_add(1, Ordering::Relaxed)), None);
        }
        release.store(true, Ordering::Release);
        assert_eq!(h.run(Duration::from_secs(30), || 9), Some(9)); // the queue has drained
        assert_eq!(ran.load(Ordering::Relaxed), 0, "abandoned calls ran later, for nobody");
        h.shutdown();
    }

    #[test]
    fn concurrent_calls_all_complete_and_helpers_are_bounded() {
        let h = Arc::new(Helpers::default());
        let done = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..32 {
                let (h, done) = (Arc::clone(&h), Arc::clone(&done));
                s.spawn(move || {
                    for i in 0..50 {
                        if h.run(Duration::from_secs(30), move || i) == Some(i) {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 32 * 50);
        assert!(h.state.lock().threads <= MAX_HELPERS);
        h.run(Duration::from_secs(5), || panic!("a job that panics")); // the helper survives
        assert_eq!(h.run(Duration::from_secs(5), || 1), Some(1));
        h.shutdown();
    }
}
