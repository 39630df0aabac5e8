//! Saves that outlive the step that asked for them: jobs tagged with their request, run in
//! submission order on one thread, so a worker's step does not wait for its copies.
//!
//! What keeps a job's source memory valid is the caller's: a job reads blocks that the
//! inference engine must neither free nor overwrite until the job ran, so the caller asks
//! [`SaveQueue::in_flight`] before telling the engine a request's blocks may go, and
//! [`SaveQueue::flush`]es before blocks it cannot hold back (a preempted request's) are reused.
//!
//! Dropping the queue does not wait: queued jobs that have not started are dropped unrun and the
//! thread ends after the job it runs. (A job may need a lock the dropping thread holds, such as
//! Python's GIL for logging; waiting there could deadlock. Call `flush` first to run them all.)

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{CoreError, Result};

/// One save: runs once, on the queue's thread.
pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    queue: VecDeque<(String, Job)>,
    /// Jobs queued or running, by request.
    in_flight: HashMap<String, usize>,
    running: bool,
    closed: bool,
    /// Jobs run (or dropped by a panic) so far.
    done: u64,
    submitted: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    max_queued: usize,
}

/// A FIFO of save jobs and the thread that runs them (see the module).
pub struct SaveQueue {
    shared: Arc<Shared>,
}

impl SaveQueue {
    /// At most `max_queued` jobs wait at once; `submit` waits for room beyond that.
    pub fn new(max_queued: usize) -> Result<Self> {
        Self::named(max_queued, "save")
    }

    /// As [`new`](Self::new), its thread named `xconnector-{what}` (the same queue runs a
    /// worker's layer-wise loads).
    pub fn named(max_queued: usize, what: &str) -> Result<Self> {
        let shared =
            Arc::new(Shared { state: Mutex::default(), changed: Condvar::new(), max_queued: max_queued.max(1) });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("xconnector-{what}"))
            .spawn(move || run(&worker))
            .map_err(|e| CoreError::Internal(format!("cannot start the {what} thread: {e}")))?;
        Ok(Self { shared })
    }

    /// Queues `job` for `req_id`, waiting while the queue is full. False (the job dropped
    /// unrun) once the queue is closed.
    pub fn submit(&self, req_id: &str, job: Job) -> bool {
        let mut s = self.shared.state.lock();
        while s.queue.len() >= self.shared.max_queued && !s.closed {
            self.shared.changed.wait(&mut s);
        }
        self.push(&mut s, req_id, job)
    }

    /// `submit` without waiting: the job back when the queue is full (the caller may release
    /// what it holds before waiting for room with `submit`).
    pub fn try_submit(&self, req_id: &str, job: Job) -> Result<bool, Job> {
        let mut s = self.shared.state.lock();
        if s.queue.len() >= self.shared.max_queued && !s.closed {
            return Err(job);
        }
        Ok(self.push(&mut s, req_id, job))
    }

    fn push(&self, s: &mut State, req_id: &str, job: Job) -> bool {
        if s.closed {
            return false;
        }
        *s.in_flight.entry(req_id.to_owned()).or_default() += 1;
        s.submitted += 1;
        s.queue.push_back((req_id.to_owned(), job));
        self.shared.changed.notify_all();
        true
    }

    /// Whether a job of `req_id` is queued or running.
    pub fn in_flight(&self, req_id: &str) -> bool {
        self.shared.state.lock().in_flight.contains_key(req_id)
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> u64 {
        let s = self.shared.state.lock();
        s.submitted - s.done
    }

    /// Waits until every job submitted before this call has run (or was dropped by `close`).
    pub fn flush(&self) {
        let mut s = self.shared.state.lock();
        let target = s.submitted;
        while s.done < target && !(s.closed && s.queue.is_empty() && !s.running) {
            self.shared.changed.wait(&mut s);
        }
    }

    /// Closes the queue: later submits are refused; queued jobs still run unless `drop_queued`.
    pub fn close(&self, drop_queued: bool) {
        let dropped: Vec<(String, Job)> = {
            let mut s = self.shared.state.lock();
            s.closed = true;
            let dropped: Vec<_> = if drop_queued { s.queue.drain(..).collect() } else { Vec::new() };
            for (req_id, _) in &dropped {
                finish(&mut s, req_id);
            }
            self.shared.changed.notify_all();
            dropped
        };
        drop(dropped); // outside the lock: a job's captures may take locks of their own to drop
    }
}

impl Drop for SaveQueue {
    fn drop(&mut self) {
        self.close(true);
    }
}

fn finish(s: &mut State, req_id: &str) {
    s.done += 1;
    if let Some(n) = s.in_flight.get_mut(req_id) {
        *n -= 1;
        if *n == 0 {
            s.in_flight.remove(req_id);
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let (req_id, job) = {
            let mut s = shared.state.lock();
            loop {
                if let Some(next) = s.queue.pop_front() {
                    s.running = true;
                    shared.changed.notify_all(); // room for a waiting submit
                    break next;
                }
                if s.closed {
                    return;
                }
                shared.changed.wait(&mut s);
            }
        };
        // A panicking job is a bug in it; the queue goes on with the next (the job is counted
        // done, so nobody waits for it forever).
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a save job panicked; its blocks were not saved");
        }
        let mut s = shared.state.lock();
        s.running = false;
        finish(&mut s, &req_id);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// Submits a job for `req_id` that runs until the returned sender sends; returns once it runs.
    fn running_job(q: &SaveQueue, req_id: &str) -> mpsc::Sender<()> {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        q.submit(
            req_id,
            Box::new(move || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }),
        );
        started_rx.recv().unwrap();
        go_tx
    }

    #[test]
    fn jobs_run_in_order_and_flush_waits_for_them() {
        let q = SaveQueue::new(4).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..10 {
            let seen = Arc::clone(&seen);
            assert!(q.submit(&format!("r{}", i % 3), Box::new(move || seen.lock().push(i))));
        }
        q.flush();
        assert_eq!(*seen.lock(), (0..10).collect::<Vec<_>>());
        assert_eq!(q.pending(), 0);
        assert!(!q.in_flight("r0"));
    }

    #[test]
    fn a_request_is_in_flight_until_its_last_job_ran() {
        let q = SaveQueue::new(8).unwrap();
        let go_tx = running_job(&q, "a");
        q.submit("a", Box::new(|| {}));
        q.submit("b", Box::new(|| {}));
        assert!(q.in_flight("a") && q.in_flight("b"));
        assert!(!q.in_flight("c"));
        go_tx.send(()).unwrap();
        q.flush();
        assert!(!q.in_flight("a") && !q.in_flight("b"));
    }

    #[test]
    fn a_submit_to_a_full_queue_returns_once_there_is_room() {
        let q = Arc::new(SaveQueue::new(1).unwrap());
        let go_tx = running_job(&q, "a");
        q.submit("b", Box::new(|| {})); // queued: the queue is now full
        assert!(q.try_submit("x", Box::new(|| {})).is_err(), "full: the job comes back");
        let ran = Arc::new(AtomicUsize::new(0));
        let (q2, ran2) = (Arc::clone(&q), Arc::clone(&ran));
        let (submitted_tx, submitted_rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            q2.submit("c", Box::new(move || _ = ran2.fetch_add(1, Ordering::SeqCst)));
            submitted_tx.send(()).unwrap();
        });
        go_tx.send(()).unwrap();
        submitted_rx.recv().unwrap();
        t.join().unwrap();
        q.flush();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_job_is_counted_done_and_the_queue_goes_on() {
        let q = SaveQueue::new(4).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        q.submit("a", Box::new(|| panic!("boom")));
        let r = Arc::clone(&ran);
        q.submit("b", Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst)));
        q.flush();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(!q.in_flight("a"));
    }

    #[test]
    fn closing_refuses_new_jobs_and_can_drop_the_queued_ones() {
        let q = SaveQueue::new(8).unwrap();
        let go_tx = running_job(&q, "a");
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        q.submit("b", Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst)));
        q.close(true);
        assert!(!q.in_flight("b"), "a dropped job is not in flight");
        assert!(!q.submit("c", Box::new(|| {})));
        go_tx.send(()).unwrap();
        q.flush();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert!(!q.in_flight("a"));
    }
}
